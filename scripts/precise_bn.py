#!/usr/bin/env python
"""Evaluate a finished train_imagenet.py run with the treatments of its inference statistics that Wu & Johnson
compare ("Rethinking 'Batch' in BatchNorm", 2021): its running averages (EMA), PreciseBN at each estimation
batch B over N training images (mabn.precise_bn), and mini-batch statistics at test.

    python scripts/precise_bn.py runs/<run>/checkpoints/last.pt --batch 2 10 100 10000 --images 10000 \
        [--batch-stats] [--record] [--out result.json]

--batch takes B values ("n" is the run's normalization batch, "N" the number of images). --record adds the
evaluations to the run's summary.json under "evals", each with this command, the commit, the time and the
device (what results tables read); an evaluation of the same kind already recorded is replaced.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from mabn.data.loaders import build_datasets, build_loaders
from mabn.diagnostics import model_from_checkpoint
from mabn.engine import StepContext, evaluate
from mabn.entry import precise_bn_seed
from mabn.precise_bn import evaluate_statistics
from mabn.records import git_sha, hardware, write_json_atomic


def _batches(values: list[str], n: int, images: int | None) -> list[int | None]:
    out = []
    for v in values:
        if v == "n":
            out.append(n)
        elif v == "N":
            out.append(images)
        elif v.isdigit() and int(v) > 0:
            out.append(int(v))
        else:
            raise ValueError(f"--batch takes positive integers, n or N, got {v!r}")
    return out


def _key(row: dict) -> tuple:
    return row["stats"], row.get("batch"), row.get("images")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--batch", nargs="+", default=["128"], help="estimation batches B (ints, n, N)")
    parser.add_argument("--images", type=int, default=10000, help="N training images to recompute over")
    parser.add_argument("--batch-stats", action="store_true", help="also evaluate with mini-batch statistics")
    parser.add_argument("--eval-batches", type=int, default=None, help="cap the validation batches")
    parser.add_argument("--data-root", default=None, help="override the data root saved in the checkpoint")
    parser.add_argument("--record", action="store_true", help="add the evaluations to the run's summary.json")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"no such checkpoint: {args.checkpoint}")
    if args.images < 1:
        parser.error(f"--images must be >= 1, got {args.images}")
    summary_path = args.checkpoint.resolve().parent.parent / "summary.json"
    if args.record and not summary_path.is_file():
        parser.error(f"--record: {summary_path} does not exist (the run has not finished)")
    model, cfg, plan = model_from_checkpoint(args.checkpoint)
    try:
        batches = _batches(args.batch, plan.norm_batch, args.images)
    except ValueError as err:
        parser.error(str(err))
    if args.data_root:
        cfg.data.root = args.data_root
    train, val = build_datasets(cfg.data, cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    train_loader, val_loader, sampler = build_loaders(train, val, batch_size=plan.device_batch, workers=0, rank=0,
                                                      world_size=1, seed=precise_bn_seed(cfg.seed), pin_memory=False)
    ctx, criterion = StepContext(device), nn.CrossEntropyLoss()

    def run(m):
        return evaluate(m, val_loader, criterion, ctx, args.eval_batches)

    facts = {"command": " ".join(["scripts/precise_bn.py", *sys.argv[1:]]), "git_sha": git_sha(),
             "device": hardware(device), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    rows = [evaluate_statistics(model, run, stats="ema")]
    if args.batch_stats:
        rows.append(evaluate_statistics(model, run, stats="batch", group_size=plan.group_size or plan.norm_batch))
    for b in batches:
        sampler.set_epoch(0)  # every B sees the same images in the same order
        rows.append(evaluate_statistics(model, run, stats="precise", batches=train_loader, batch_size=b,
                                        max_images=args.images, device=device))
    rows = [{**r, **facts} for r in rows]
    for r in rows:
        what = {"ema": "running averages", "batch": f"mini-batch statistics (n = {r.get('batch')})",
                "precise": f"precise at B = {r.get('batch')}, N = {r.get('images')}"}[r["stats"]]
        print(f"{cfg.norm.name} n={plan.norm_batch}: top1 {r['top1']:.2f} with {what}")
    if args.record:
        summary = json.loads(summary_path.read_text())
        fresh = {_key(r) for r in rows}
        summary["evals"] = [r for r in summary.get("evals", []) if _key(r) not in fresh] + rows
        write_json_atomic(summary, summary_path)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {"checkpoint": str(args.checkpoint), "norm": cfg.norm.name, "norm_batch": plan.norm_batch,
                  "model": cfg.model.name, "evals": rows}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
