"""Layer benchmark: forward+backward time and memory of every norm at ResNet-50's normalization shapes.

    python scripts/bench_layer.py                      # auto device; CPU: float32, GPU: bf16 + channels_last
    python scripts/bench_layer.py --batch 32 --norm-batch 2 --repeats 20 --out results/performance/layer.json

Every candidate runs forward then backward on the same input, timed one after another in this process; the
ratio is to ``torch.nn.BatchNorm2d`` at the same shape. ``naive-mabn`` is the baseline the fast MABN has to
beat: the sequential MABN equations written straightforwardly, one normalization batch at a time, eager ops,
Python-int counters (as the official layer is written); with n < batch it is called on each group in turn
(forward then backward), which is what the grouped contract says one grouped call equals. Memory is what
autograd keeps for backward (every device) and, on CUDA, the peak allocated during the step. Launches are
the kernel-launching aten ops one forward and one backward dispatch (``mabn.launches``: a TorchDispatchMode,
plus the Triton launches the fused path reports through ``note_launch``), summed over the groups for the
naive baseline; the target is at most 4 + 4 per layer for mabn, brn and grouped bn. The batch-free later
norms (ln, in, gnws, evonorm_s0, frn) are timed on the whole batch; cbn only in bench_model.py, where its
paired convs are.

``--variants fused,torch,compiled`` times bn, brn and mabn on each path (``impl="fused"``: the Triton kernels;
``impl="torch"``: the PyTorch reference path; ``compiled``: the torch path under ``torch.compile(dynamic=True)``)
instead of the default ``impl="auto"``, labelled ``mabn[fused]`` and so on. Bandwidth: each shape also times a
plain copy of x (``copy``: 2 passes); ``gb_s`` is the bytes a forward+backward must move at the least (5 passes
of x's size: x, y; dy, x, dx) over the row's time, and ``of_copy`` that over the copy's achieved bandwidth in
the same run: the share of the memory floor reached.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import Tensor, nn

from mabn.benchmark import (
    channels_last_for,
    cuda_peak_mb,
    parser,
    pick_device,
    pick_dtype,
    run_and_record,
    saved_for_backward_mb,
    time_ms,
)
from mabn.launches import LaunchCounter
from mabn.norms import build_norm
from mabn.norms.registry import NormContext

# (channels, height = width, how many of ResNet-50's 53 norm layers have this shape) at 224 px input; the
# "all" rows weight each shape's time by its count: the norm layers' share of one ResNet-50 step
RESNET50_SHAPES = [(64, 112, 1), (64, 56, 6), (256, 56, 4), (128, 56, 1), (128, 28, 7), (512, 28, 5),
                   (256, 28, 1), (256, 14, 11), (1024, 14, 7), (512, 14, 1), (512, 7, 5), (2048, 7, 4)]
SMALL_SHAPES = [(16, 8, 2), (32, 4, 1)]  # for the tests
# cbn is timed in bench_model only: its Taylor terms need the paired conv, alone it is grouped BN
BATCH_FREE = ("ln", "in", "gnws", "evonorm_s0", "frn")
VARIANTS = ("auto", "fused", "torch", "compiled")
FLOOR_PASSES = 5  # tensor passes of a norm's forward + backward at the least: x, y; dy, x, dx


class _NaiveMABNStep(torch.autograd.Function):
    """One normalization batch of MABN (Yan et al. 2020, Alg. 1-2), straight from the equations."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        layer.t += 1
        t, m = layer.t, layer.window
        chi2 = (x * x).mean(dim=(0, 2, 3))
        layer.ring_x2[t % m] = chi2
        use_sma = t > m and t >= layer.warmup_iters
        chi2_bar = layer.ring_x2.mean(dim=0) if use_sma else chi2
        std = torch.sqrt(chi2_bar + layer.eps)
        if t > max(layer.renorm_iters, layer.warmup_iters):
            r = (std / torch.sqrt(layer.running_var + layer.eps)).clamp(1 / layer.r_max, layer.r_max)
        else:
            r = torch.ones_like(std)
        layer.running_var = (1 - layer.momentum) * layer.running_var + layer.momentum * chi2_bar
        z = x / std.view(1, -1, 1, 1)
        ctx.save_for_backward(z, std, r, weight)
        ctx.layer, ctx.use_sma, ctx.t = layer, use_sma, t
        return weight.view(1, -1, 1, 1) * r.view(1, -1, 1, 1) * z + bias.view(1, -1, 1, 1)

    @staticmethod
    def backward(ctx, dy):
        z, std, r, weight = ctx.saved_tensors
        layer = ctx.layer
        g = dy * (weight * r).view(1, -1, 1, 1)
        psi = (g * z).mean(dim=(0, 2, 3))
        layer.ring_gz[ctx.t % layer.window] = psi
        psi_bar = layer.ring_gz.mean(dim=0) if ctx.use_sma else psi
        dx = (g - z * psi_bar.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        dw = (dy * z * r.view(1, -1, 1, 1)).sum(dim=(0, 2, 3))
        return dx, dw, dy.sum(dim=(0, 2, 3)), None


class NaiveMABN2d(nn.Module):
    """The straightforward eager MABN layer (one normalization batch per call): the speed baseline."""

    def __init__(self, num_features: int, *, window: int = 16, eps: float = 1e-5, momentum: float = 0.02,
                 warmup_iters: int = 100, renorm_iters: int = 1000, r_max: float = 5.0):
        super().__init__()
        self.window, self.eps, self.momentum, self.r_max = window, eps, momentum, r_max
        self.warmup_iters, self.renorm_iters = warmup_iters, renorm_iters
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.running_var = torch.ones(num_features)
        self.ring_x2 = torch.zeros(window, num_features)
        self.ring_gz = torch.zeros(window, num_features)
        self.t = 0

    def _apply(self, fn, recurse=True):  # .to(device/dtype) moves the plain-tensor state too
        super()._apply(fn, recurse)
        self.running_var, self.ring_x2 = fn(self.running_var), fn(self.ring_x2)
        self.ring_gz = fn(self.ring_gz)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return _NaiveMABNStep.apply(x, self.weight, self.bias, self)


def sequential_step(layer: nn.Module, x: Tensor, dy: Tensor, n: int) -> None:
    """Forward then backward on each consecutive group of ``n`` samples in turn (the grouped contract's
    definition); gradients accumulate into ``x.grad`` and the parameters."""
    for start in range(0, x.shape[0], n):
        layer(x[start:start + n]).backward(dy[start:start + n])


def _compiled(ctor):
    """The torch path of ``ctor``'s layer under torch.compile (dynamic shapes: one compile serves every shape)."""
    def build(channels):
        layer = ctor(channels)
        layer.forward = torch.compile(layer.forward, dynamic=True)
        return layer
    return build


def candidates(norm_batch: int, batch: int, window: int, variants=("auto",)) -> list[tuple[str, int, callable]]:
    """(label, normalization batch, constructor) for every layer timed; the first is the baseline."""
    ctx_n = NormContext(norm_batch=norm_batch, device_batch=batch)
    ctx_all = NormContext(norm_batch=batch, device_batch=batch)
    # ResNet-50 recipes (brn's and mabn's schedules at their defaults; timing runs past warm-up: see run())
    out = [("torch-bn", batch, nn.BatchNorm2d)]
    for name in ("bn", "brn", "mabn"):
        for variant in variants:
            params = {"name": name, "impl": "torch" if variant == "compiled" else variant}
            if name == "mabn":
                params["window"] = window
            label = name if variant == "auto" else f"{name}[{variant}]"
            for n, ctx in ((batch, ctx_all), (norm_batch, ctx_n))[:1 if norm_batch == batch else 2]:
                ctor = build_norm(params, ctx).ctor
                out.append((label, n, _compiled(ctor) if variant == "compiled" else ctor))
    out.append(("gn", batch, build_norm("gn").ctor))
    for name in BATCH_FREE:  # the later norms that need no batch (gnws: GN here, WS lives in the conv)
        out.append((name, batch, build_norm(name).ctor))
    out.append(("naive-mabn", batch, lambda c: NaiveMABN2d(c, window=window)))
    if norm_batch != batch:
        out.append(("naive-mabn", norm_batch, lambda c: NaiveMABN2d(c, window=window)))
    return out


def _train_step(layer: nn.Module, x: Tensor, dy: Tensor, n: int, naive: bool, device, dtype):
    """Forward then backward of one layer (the naive baseline: group by group), autocast for half types."""

    def step():
        x.grad = None
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if naive:
                sequential_step(layer, x, dy, n)
            else:
                layer(x).backward(dy)

    return step


def launches(layer: nn.Module, x: Tensor, dy: Tensor, n: int, naive: bool, device, dtype) -> tuple[int, int]:
    """Kernel launches of one forward and one backward (the naive baseline: summed over its groups)."""
    forward = backward = 0
    step = n if naive else x.shape[0]
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    for start in range(0, x.shape[0], step):
        xs = x[start:start + step].detach().requires_grad_(True)
        with LaunchCounter() as counted, amp:
            y = layer(xs)
        forward += counted.count
        with LaunchCounter() as counted:
            y.backward(dy[start:start + step])
        backward += counted.count
    return forward, backward


def _past_schedules(layer: nn.Module) -> None:
    """Time the steady state: every warm-up and ramp of brn/mabn is over (the common case of a long run)."""
    for attr in ("warmup_iters", "renorm_iters", "r_max_iters", "d_max_iters"):
        if hasattr(layer, attr):
            setattr(layer, attr, 0)


def run(args) -> list[dict]:
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    channels_last = channels_last_for(args.channels_last, device)
    shapes = RESNET50_SHAPES if args.shapes == "resnet50" else SMALL_SHAPES
    if args.batch % args.norm_batch:
        raise ValueError(f"--norm-batch {args.norm_batch} must divide --batch {args.batch}")
    variants = tuple(v for v in args.variants.split(",") if v)
    if not variants or set(variants) - set(VARIANTS):
        raise ValueError(f"--variants must be a comma-separated list of {', '.join(VARIANTS)}, got {args.variants!r}")
    if "fused" in variants and device.type != "cuda":
        raise ValueError("--variants fused needs a CUDA device (the Triton kernels; on CPU only under the "
                         "interpreter, which the tests use, not the benchmarks)")
    torch.manual_seed(0)
    rows = []
    totals: dict[tuple[str, int], dict] = {}
    layers = sum(count for *_, count in shapes)
    for channels, size, count in shapes:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(args.batch, channels, size, size, device=device, dtype=dtype)
        x = x.contiguous(memory_format=fmt)
        x.requires_grad_(True)
        dy = torch.randn_like(x)
        out = torch.empty_like(x)
        copy = time_ms(functools.partial(out.copy_, x), device, repeats=args.repeats,
                       warmup=args.warmup)["median_ms"]
        nbytes = x.numel() * x.element_size()
        copy_gbs = 2 * nbytes / copy / 1e6
        rows.append({"shape": f"{channels}x{size}x{size}", "norm": "copy", "n": None, "ms": copy,
                     "gb_s": copy_gbs, "of_copy": 1.0, "launches_fwd": None, "launches_bwd": None})
        base = None
        for label, n, ctor in candidates(args.norm_batch, args.batch, args.window, variants):
            layer = ctor(channels).to(device)
            _past_schedules(layer)
            layer.train()

            naive = label.startswith("naive")
            step = _train_step(layer, x, dy, n, naive, device, dtype)
            t = time_ms(step, device, repeats=args.repeats, warmup=args.warmup)
            forward = None if naive else functools.partial(layer, x)
            # a compiled layer launches inductor's kernels, which the aten-op counter cannot see: not counted
            fwd, bwd = (None, None) if label.endswith("[compiled]") else launches(layer, x, dy, n, naive, device,
                                                                                  dtype)
            row = {"shape": f"{channels}x{size}x{size}", "norm": label, "n": n, "ms": t["median_ms"],
                   "saved_mb": saved_for_backward_mb(forward) if forward else None,
                   "cuda_peak_mb": cuda_peak_mb(step, device), "launches_fwd": fwd, "launches_bwd": bwd}
            base = base or row["ms"]
            row["ratio"] = row["ms"] / base
            row["gb_s"] = FLOOR_PASSES * nbytes / row["ms"] / 1e6
            row["of_copy"] = row["gb_s"] / copy_gbs
            rows.append(row)
            total = totals.setdefault((label, n), {"shape": f"{args.shapes} (all {layers})", "norm": label,
                                                   "n": n, "ms": 0.0, "launches_fwd": 0, "launches_bwd": 0})
            for key in ("ms", "launches_fwd", "launches_bwd"):
                total[key] = None if row[key] is None else total[key] + count * row[key]
    base_total = totals[("torch-bn", args.batch)]["ms"]
    for total in totals.values():
        total["ratio"] = total["ms"] / base_total
        rows.append(total)
    return rows


def main(argv=None) -> int:
    p = parser(__doc__, "layer", repeats=10, warmup=3)
    p.add_argument("--batch", type=int, default=32, help="device batch")
    p.add_argument("--norm-batch", type=int, default=2, help="normalization batch n of the grouped rows")
    p.add_argument("--window", type=int, default=16, help="MABN window m (the paper's 16 at n = 2)")
    p.add_argument("--shapes", default="resnet50", choices=["resnet50", "small"])
    p.add_argument("--variants", default="auto",
                   help=f"paths of bn, brn and mabn timed, comma-separated: {', '.join(VARIANTS)}")
    args = p.parse_args(argv)
    return run_and_record(p, args, "layer", run,
                          settings=["batch", "norm_batch", "window", "shapes", "repeats", "warmup", "variants"],
                          columns=["shape", "norm", "n", "ms", "ratio", "gb_s", "of_copy", "saved_mb",
                                   "cuda_peak_mb", "launches_fwd", "launches_bwd"])


if __name__ == "__main__":
    sys.exit(main())
