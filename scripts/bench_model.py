"""Model benchmark: ResNet-50 training throughput and memory per norm and normalization batch.

    python scripts/bench_model.py                               # auto device, 224 px, device batch 32 and 64
    python scripts/bench_model.py --image-size 112 --batches 32,64 --out results/performance/model.json

One training step is forward, cross-entropy, backward and an SGD step (momentum, weight decay), under bf16
autocast with channels_last on CUDA and float32 on CPU. For each device batch B and normalization batch n
(grouped: B/n groups of n in one call) every norm is timed; the ratio is to bn at the same B and n. The
true-small-batch rows run device batch n itself (eager), the mode grouping replaces; ``speedup`` on the
grouped rows is their img/s over that true-small-batch row of the same norm. On CUDA each true-small-batch
row also runs with the whole step captured as one CUDA graph (``mabn.graphs.GraphedStep``, fused SGD);
``graph_speedup`` is its img/s over the eager row. ``launches`` counts the kernel-launching aten ops of one
eager step (``mabn.launches``; a graphed step launches its graph and the two input copies).

A norm may name its path, as in bench_layer.py: ``mabn[fused]`` (the Triton kernels), ``mabn[torch]`` (the
PyTorch reference path) or ``mabn[compiled]`` (the torch path, the whole model under ``torch.compile``), for
bn, brn and mabn; plain ``mabn`` is ``impl="auto"``. bn at the whole batch is ``nn.BatchNorm2d``'s own kernel
(cuDNN on a GPU) on every path but compiled.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from mabn.benchmark import (
    channels_last_for,
    cuda_peak_mb,
    int_list,
    parser,
    pick_device,
    pick_dtype,
    run_and_record,
    saved_for_backward_mb,
    time_ms,
)
from mabn.engine import StepContext
from mabn.graphs import GraphedStep
from mabn.launches import count_launches
from mabn.models import build_model
from mabn.norms import NormContext, build_norm
from mabn.optim import build_optimizer

NORMS = ("bn", "gn", "brn", "mabn", "cbn", "gnws", "evonorm_s0", "frn", "ln", "in")  # bn first: the baseline
PATHS = ("fused", "torch", "compiled")  # mabn[fused] ...: for the norms with a fused path
WITH_PATHS = ("bn", "brn", "mabn")


def parse_norm(label: str) -> tuple[str, str | None]:
    """("mabn", "fused") for "mabn[fused]", ("mabn", None) for "mabn"; ValueError naming what is valid."""
    base, _, rest = label.partition("[")
    path = rest[:-1] if rest.endswith("]") else (rest or None)
    if base not in NORMS:
        raise ValueError(f"unknown {[label]}; choose from {list(NORMS)}")
    if path is not None and (path not in PATHS or base not in WITH_PATHS or not rest.endswith("]")):
        raise ValueError(f"{label!r}: a path is one of {', '.join(PATHS)}, for {', '.join(WITH_PATHS)} only "
                         f"(as in mabn[fused])")
    return base, path


def build(norm: str, n: int, batch: int, model_name: str, device, channels_last: bool,
          capturable: bool = False):
    base, path = parse_norm(norm)
    params = base if path is None else {"name": base, "impl": "torch" if path == "compiled" else path}
    recipe = build_norm(params, NormContext(norm_batch=n, device_batch=batch, total_iters=1))
    model = build_model(model_name, recipe, num_classes=1000, in_channels=3)  # with MABN's weight centering
    for m in model.modules():  # the steady state of a long run: warm-ups and ramps are over
        for attr in ("warmup_iters", "renorm_iters", "r_max_iters", "d_max_iters"):
            if hasattr(m, attr):
                setattr(m, attr, 0)
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, {"name": "sgd", "momentum": 0.9, "weight_decay": 1e-4,
                                  "norm_weight_decay": 0.0, "nesterov": False}, 0.01, capturable=capturable)
    return (torch.compile(model) if path == "compiled" else model), opt


def measure(args, norm: str, n: int, batch: int, device, dtype, channels_last: bool, graphed: bool = False
            ) -> dict:
    model, opt = build(norm, n, batch, args.model, device, channels_last, capturable=graphed)
    compiled = norm.endswith("[compiled]")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, args.image_size, args.image_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    amp = dtype != torch.float32

    def forward():
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            return loss_fn(model(x), y)

    def step():
        loss = forward()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    warmup = args.warmup
    if graphed:  # GraphedStep's eager warm-up steps and its capture happen before the timed repeats
        ctx = StepContext(device, dtype if amp else None, channels_last)
        step, warmup = functools.partial(GraphedStep(model, opt, loss_fn, ctx), x, y), max(args.warmup, 5)
    t = time_ms(step, device, repeats=args.repeats, warmup=warmup)
    return {"norm": norm, "batch": batch, "n": n, "mode": "grouped" if n < batch else "whole batch",
            "ms": t["median_ms"], "img_s": batch / t["median_ms"] * 1e3,
            "saved_mb": saved_for_backward_mb(forward), "cuda_peak_mb": cuda_peak_mb(step, device),
            # a compiled step launches inductor's kernels, which the aten-op counter cannot see: not counted
            "launches": None if compiled else count_launches(step) + (1 if graphed else 0)}


def run(args) -> list[dict]:
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    channels_last = channels_last_for(args.channels_last, device)
    torch.manual_seed(0)
    rows = []
    for batch in args.batches:
        for n in args.norm_batches:
            if batch % n:
                raise ValueError(f"normalization batch {n} must divide the device batch {batch}")
            base = None
            for norm in args.norms:
                free = not build_norm(parse_norm(norm)[0], NormContext(device_batch=batch)).batch_dependent
                if free and n != args.norm_batches[0]:
                    continue  # batch-free: one row per device batch
                row = measure(args, norm, n, batch, device, dtype, channels_last)
                if free:
                    row["n"], row["mode"] = None, "batch-free"
                base = base if base is not None else row["ms"]  # bn comes first
                row["ratio"] = row["ms"] / base
                rows.append(row)
    small = {}
    for n in sorted(set(args.norm_batches) - set(args.batches)):
        for norm in args.small_norms:
            row = measure(args, norm, n, n, device, dtype, channels_last)
            row["mode"] = "true small batch"
            small[(norm, n)] = row
            rows.append(row)
            if device.type == "cuda" and args.graphs:
                graphed = measure(args, norm, n, n, device, dtype, channels_last, graphed=True)
                graphed["mode"] = "true small batch, CUDA graph"
                graphed["graph_speedup"] = row["ms"] / graphed["ms"]
                rows.append(graphed)
    for row in rows:
        ref = small.get((row["norm"], row["n"]))
        if ref is not None and row["mode"] == "grouped":
            row["speedup"] = row["img_s"] / ref["img_s"]
    return rows


def main(argv=None) -> int:
    p = parser(__doc__, "model", repeats=5, warmup=2)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batches", type=int_list, default=[32, 64], help="device batches, e.g. 32,64")
    p.add_argument("--norm-batches", type=int_list, default=[2, 32], help="normalization batches, e.g. 2,32")
    p.add_argument("--norms", default=",".join(NORMS), help="norms timed in whole and grouped batches; bn first")
    p.add_argument("--small-norms", default="bn,mabn", help="norms timed at true device batch n")
    p.add_argument("--graphs", default="true", choices=["true", "false"],
                   help="on CUDA, also time the true-small-batch rows as one captured CUDA graph per step")
    args = p.parse_args(argv)
    args.small_norms = [s for s in args.small_norms.split(",") if s]
    args.norms = [s for s in args.norms.split(",") if s]
    args.graphs = args.graphs == "true"
    for flag, names in (("--norms", args.norms), ("--small-norms", args.small_norms)):
        unknown = sorted({name.partition("[")[0] for name in names} - set(NORMS))  # every unknown base name
        if unknown:
            p.error(f"{flag}: unknown {unknown}; choose from {list(NORMS)}")
        for name in names:
            try:
                parse_norm(name)
            except ValueError as err:
                p.error(f"{flag}: {err}")
    if any(parse_norm(n)[1] == "fused" for n in args.norms + args.small_norms) and \
            pick_device(args.device).type != "cuda":
        p.error("--norms: a [fused] path needs a CUDA device (the Triton kernels)")
    if args.norms[:1] != ["bn"]:
        p.error(f"--norms must start with bn (the baseline of the ratios), got {','.join(args.norms)}")
    return run_and_record(p, args, "model", run,
                          settings=["model", "image_size", "batches", "norm_batches", "norms", "repeats",
                                    "warmup", "graphs"],
                          columns=["norm", "batch", "n", "mode", "ms", "img_s", "ratio", "speedup",
                                   "graph_speedup", "launches", "saved_mb", "cuda_peak_mb"])


if __name__ == "__main__":
    sys.exit(main())
