"""Inference benchmark: ResNet-50 eval throughput with folded bn, folded mabn, and gn (which cannot fold).

    python scripts/bench_inference.py                                   # auto device, 224 px, batch 1, 32, 256
    python scripts/bench_inference.py --image-size 112 --out results/performance/inference.json

bn and mabn models are folded with ``mabn.fold.fold_norms`` (every norm becomes its conv's weight and bias:
a plain conv net); gn stays a normalization layer. Eval under torch.inference_mode, bf16 autocast with
channels_last on CUDA, float32 on CPU; the ratio is to folded bn at the same batch. The unfolded bn row shows
what folding saves.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mabn.benchmark import pick_device, pick_dtype, print_table, time_ms, write_record  # noqa: E402
from mabn.fold import fold_norms  # noqa: E402
from mabn.models import build_model  # noqa: E402
from mabn.norms import build_norm, center_conv_weights  # noqa: E402

CANDIDATES = (("bn", True), ("mabn", True), ("gn", False), ("bn", False))  # (norm, folded); first = baseline


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_eval_model(norm: str, folded: bool, model_name: str, device, channels_last: bool):
    recipe = build_norm(norm)
    model = build_model(model_name, recipe.ctor, num_classes=1000, in_channels=3)
    if recipe.weight_centering:
        center_conv_weights(model)
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
    channels_last = device.type == "cuda" if args.channels_last == "auto" else args.channels_last == "true"
    torch.manual_seed(0)
    models = {(norm, folded): build_eval_model(norm, folded, args.model, device, channels_last)
              for norm, folded in CANDIDATES}
    rows = []
    for batch in args.batches:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(batch, 3, args.image_size, args.image_size, device=device).contiguous(memory_format=fmt)
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 autocast on CUDA, float32 on CPU) | float32 | bfloat16")
    p.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batches", type=_ints, default=[1, 32, 256])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "results/performance/inference.json"))
    args = p.parse_args(argv)
    try:
        device = pick_device(args.device)
        rows = run(args)
    except ValueError as err:  # a bad setting: name it, no traceback
        p.error(str(err))
    settings = {"model": args.model, "image_size": args.image_size, "batches": args.batches,
                "repeats": args.repeats, "warmup": args.warmup,
                "dtype": str(pick_dtype(args.dtype, device)).replace("torch.", ""),
                "channels_last": device.type == "cuda" if args.channels_last == "auto" else args.channels_last == "true"}
    path = write_record(args.out, "inference", device, settings, rows)
    print_table(rows, ["norm", "folded", "batch", "ms", "img_s", "ratio"])
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
