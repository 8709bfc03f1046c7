"""Inference benchmark: ResNet-50 eval throughput with folded bn, folded mabn, and gn (which cannot fold).

    python scripts/bench_inference.py                               # auto device, 224 px, batch 1, 32, 256
    python scripts/bench_inference.py --image-size 112 --out results/performance/inference.json

bn and mabn models are folded with ``mabn.fold.fold_norms`` (every norm becomes its conv's weight and bias:
a plain conv net); gn stays a normalization layer. Eval under torch.inference_mode, bf16 autocast with
channels_last on CUDA, float32 on CPU; the ratio is to folded bn at the same batch. The unfolded bn row shows
what folding saves.
"""

from __future__ import annotations

import functools
import sys

import torch

from mabn.benchmark import (
    channels_last_for,
    int_list,
    parser,
    pick_device,
    pick_dtype,
    run_and_record,
    time_ms,
)
from mabn.fold import fold_norms
from mabn.models import build_model
from mabn.norms import build_norm

CANDIDATES = (("bn", True), ("mabn", True), ("gn", False), ("bn", False))  # (norm, folded); first = baseline


def build_eval_model(norm: str, folded: bool, model_name: str, device, channels_last: bool):
    recipe = build_norm(norm)
    model = build_model(model_name, recipe, num_classes=1000, in_channels=3)  # with MABN's weight centering
    model.eval()
    if folded:
        model, report = fold_norms(model, return_report=True)
        if report.kept:
            raise RuntimeError(f"{norm}: norm layers left unfolded: {report.kept}")
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _infer(model, x, device, dtype) -> None:
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        model(x)


def run(args) -> list[dict]:
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    channels_last = channels_last_for(args.channels_last, device)
    torch.manual_seed(0)
    models = {(norm, folded): build_eval_model(norm, folded, args.model, device, channels_last)
              for norm, folded in CANDIDATES}
    rows = []
    for batch in args.batches:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
        x = x.contiguous(memory_format=fmt)
        base = None
        for (norm, folded), model in models.items():
            infer = functools.partial(_infer, model, x, device, dtype)
            t = time_ms(infer, device, repeats=args.repeats, warmup=args.warmup)
            row = {"norm": norm, "folded": folded, "batch": batch, "ms": t["median_ms"],
                   "img_s": batch / t["median_ms"] * 1e3}
            base = base if base is not None else row["img_s"]
            row["ratio"] = row["img_s"] / base  # throughput relative to folded bn
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = parser(__doc__, "inference", repeats=10, warmup=2)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batches", type=int_list, default=[1, 32, 256])
    args = p.parse_args(argv)
    return run_and_record(p, args, "inference", run,
                          settings=["model", "image_size", "batches", "repeats", "warmup"],
                          columns=["norm", "folded", "batch", "ms", "img_s", "ratio"])


if __name__ == "__main__":
    sys.exit(main())
