#!/usr/bin/env python
"""Estimation shift over depth (Huang et al., CVPR 2022) for train_imagenet.py checkpoints.

    python scripts/estimation_shift.py runs/*/checkpoints/last.pt --batches 100 --out results/diagnostics

For each checkpoint: the model is rebuilt from the config saved in it, every batch-dependent norm's
statistics are recomputed over --batches training batches (train mode, the run's normalization batch), and
the distance to the running statistics is reported per layer. Writes estimation_shift.json and a plot
(PNG + SVG) with one curve per checkpoint.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from mabn.data.loaders import build_datasets, build_loaders
from mabn.diagnostics import estimation_shift, model_from_checkpoint
from mabn.entry import precise_bn_seed


def label(cfg, plan) -> str:
    return f"{cfg.norm.name} n={plan.norm_batch} {cfg.model.name} seed {cfg.seed}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--batches", type=int, default=100, help="training batches to recompute statistics over")
    parser.add_argument("--out", type=Path, default=Path("results/diagnostics"))
    parser.add_argument("--data-root", default=None, help="override the data root saved in the checkpoint")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.checkpoints if not p.is_file()]
    if missing:
        parser.error(f"no such checkpoint: {', '.join(missing)}")
    results = []
    for path in args.checkpoints:
        model, cfg, plan = model_from_checkpoint(path)
        if args.data_root:
            cfg.data.root = args.data_root
        train, val = build_datasets(cfg.data, cfg.seed)
        loader, _, sampler = build_loaders(train, val, batch_size=plan.device_batch, workers=0, rank=0,
                                           world_size=1, seed=precise_bn_seed(cfg.seed), pin_memory=False)
        rows = estimation_shift(model, itertools.islice(loader, args.batches), torch.device("cpu"))
        results.append({"checkpoint": str(path), "label": label(cfg, plan), "norm": cfg.norm.name,
                        "norm_batch": plan.norm_batch, "model": cfg.model.name, "seed": cfg.seed,
                        "batches": args.batches, "layers": rows})
        last = rows[-1] if rows else {}
        print(f"{label(cfg, plan)}: {len(rows)} layers; last layer var_rel {last.get('var_rel', float('nan')):.4f} "
              f"mean_rel {last.get('mean_rel', float('nan')):.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "estimation_shift.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out / "estimation_shift")
    print(f"wrote {args.out / 'estimation_shift.json'} and estimation_shift.png/.svg")
    return 0


def plot(results: list[dict], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for res in results:
        depth = [r["depth"] for r in res["layers"]]
        axes[0].plot(depth, [r["var_rel"] for r in res["layers"]], marker=".", label=res["label"])
        with_mean = [r for r in res["layers"] if "mean_rel" in r]
        if with_mean:
            axes[1].plot([r["depth"] for r in with_mean], [r["mean_rel"] for r in with_mean], marker=".",
                         label=res["label"])
    axes[0].set(title="variance: mean |log(running / recomputed)|", xlabel="norm layer (depth)")
    axes[1].set(title="mean: mean |Δμ| / σ recomputed", xlabel="norm layer (depth)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Estimation shift: running vs recomputed statistics (final weights)")
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(stem.with_suffix(f".{ext}"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
