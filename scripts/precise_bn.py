#!/usr/bin/env python
"""Evaluate a train_imagenet.py checkpoint with its running statistics and with recomputed ones (PreciseBN).

    python scripts/precise_bn.py runs/<run>/checkpoints/last.pt --batches 200 [--out result.json]

Recomputes every batch-dependent norm's inference statistics (bn/brn/syncbn: mean and variance; mabn: the
second moment) over --batches training batches in train mode at the run's normalization batch (Wu &
Johnson 2021; mabn.precise_bn), then evaluates top-1/top-5 on the validation split both ways.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
from pathlib import Path

import torch
from torch import nn

from mabn.data.loaders import build_datasets, build_loaders
from mabn.diagnostics import model_from_checkpoint
from mabn.engine import StepContext, evaluate
from mabn.entry import precise_bn_seed
from mabn.precise_bn import recompute_norm_stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--batches", type=int, default=200, help="training batches to recompute statistics over")
    parser.add_argument("--eval-batches", type=int, default=None, help="cap the validation batches")
    parser.add_argument("--data-root", default=None, help="override the data root saved in the checkpoint")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"no such checkpoint: {args.checkpoint}")
    if args.batches < 1:
        parser.error(f"--batches must be >= 1, got {args.batches}")
    model, cfg, plan = model_from_checkpoint(args.checkpoint)
    if args.data_root:
        cfg.data.root = args.data_root
    train, val = build_datasets(cfg.data, cfg.seed)
    device_batch = plan.device_batch
    train_loader, val_loader, _ = build_loaders(train, val, batch_size=device_batch, workers=0, rank=0,
                                                world_size=1, seed=precise_bn_seed(cfg.seed), pin_memory=False)
    ctx, criterion = StepContext(torch.device("cpu")), nn.CrossEntropyLoss()
    running = evaluate(model, val_loader, criterion, ctx, args.eval_batches)
    recomputed_model = copy.deepcopy(model)
    used = recompute_norm_stats(recomputed_model, itertools.islice(train_loader, args.batches), ctx.device)
    recomputed = evaluate(recomputed_model, val_loader, criterion, ctx, args.eval_batches)
    result = {"checkpoint": str(args.checkpoint), "norm": cfg.norm.name, "norm_batch": plan.norm_batch,
              "model": cfg.model.name, "recompute_batches": used, "recompute_images": used * device_batch,
              "running": running, "recomputed": recomputed}
    print(f"{cfg.norm.name} n={plan.norm_batch}: top1 {running['top1']:.2f} with running statistics, "
          f"{recomputed['top1']:.2f} recomputed over {used} batches ({used * device_batch} images)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
