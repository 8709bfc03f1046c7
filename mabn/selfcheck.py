"""Norm-layer self-check on real Fashion-MNIST images: ``python -m mabn.selfcheck``.

For every registered norm, a small conv net built through the registry at normalization batch 2 in a
device batch of 32 is checked on real images: the grouped contract (one call == 16 sequential calls, float64),
a short SGD run (loss must fall), and folding (eval outputs unchanged): ``make selfcheck``, about 10 s, a
check of an install on real data that trains nothing to keep.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time

import torch
from torch import nn

from .data import FashionMNIST
from .fold import fold_norms
from .norms import NormContext, batch_dependent_types, build_norm, registered_norms
from .norms.registry import entry

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


def small_net(ctor) -> nn.Module:
    """conv-norm-relu ×2, global pooling, linear: enough layers for a contract and a fold to mean something."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), ctor(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), ctor(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def _set_group_size(model: nn.Module, value) -> None:
    for m in model.modules():
        if hasattr(m, "group_size"):
            m.group_size = value


def grouped_contract_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int) -> float:
    """Max abs difference (outputs, input and parameter grads) between one grouped call and G sequential ones."""
    grouped, seq = copy.deepcopy(model).double().train(), copy.deepcopy(model).double().train()
    _set_group_size(seq, None)
    x = x.double()
    loss = nn.CrossEntropyLoss(reduction="sum")
    xg = x.clone().requires_grad_(True)
    out_g = grouped(xg)
    loss(out_g, y).backward()
    outs, grads = [], []
    for i in range(0, len(x), n):
        xs = x[i:i + n].clone().requires_grad_(True)
        out = seq(xs)
        loss(out, y[i:i + n]).backward()
        outs.append(out.detach())
        grads.append(xs.grad)
    errs = [(out_g.detach() - torch.cat(outs)).abs().max(), (xg.grad - torch.cat(grads)).abs().max()]
    errs += [(p.grad - q.grad).abs().max() for p, q in zip(grouped.parameters(), seq.parameters(), strict=True)]
    return max(float(e) for e in errs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--steps", type=int, default=60, help="SGD steps per norm")
    args = parser.parse_args(argv)
    logging.getLogger("mabn.fold").setLevel(logging.ERROR)  # the table reports what stays unfolded
    torch.manual_seed(0)
    data = FashionMNIST(args.root, split="train")
    images = (data.images[:4096].float() / 255 - FMNIST_MEAN) / FMNIST_STD
    labels = data.labels[:4096]
    device_batch, n = 32, 2
    print(f"Fashion-MNIST from {data.root}: {len(data)} training images; device batch {device_batch}, "
          f"normalization batch {n}; torch {torch.__version__}")
    print(f"{'norm':9s} {'grouped==sequential':>20s} {'loss first->last':>18s} {'fold rel.err':>13s} {'time':>6s}  ok")
    failed = []
    for name in registered_norms():
        start = time.perf_counter()
        groupable = entry(name).groupable  # syncbn normalizes whole batches only
        ctx = NormContext(norm_batch=n if groupable else None, device_batch=device_batch)
        recipe = build_norm(name, ctx)
        model = small_net(recipe.ctor)
        recipe.prepare(model)
        contract = "n/a"
        ok = True
        if any(isinstance(m, batch_dependent_types()) and getattr(m, "group_size", None) for m in model.modules()):
            err = grouped_contract_error(model, images[:device_batch], labels[:device_batch], n)
            contract = f"max err {err:.1e}"
            ok &= err < 1e-9
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses = []
        model.train()
        for _ in range(args.steps):
            idx = torch.randint(0, len(images), (device_batch,))
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
        ok &= last < first
        model.eval()
        folded, report = fold_norms(model, return_report=True)
        with torch.no_grad():
            ref = model(images[:256])
            rel = float((folded(images[:256]) - ref).abs().max() / ref.abs().max())
        fold = f"{rel:.1e}" if report.folded else "not foldable"
        ok &= rel <= 1e-5
        print(f"{name:9s} {contract:>20s} {first:8.3f}->{last:6.3f} {fold:>13s} {time.perf_counter() - start:5.1f}s  "
              f"{'ok' if ok else 'FAIL'}")
        if not ok:
            failed.append(name)
    if failed:
        print(f"self-check FAILED for: {', '.join(failed)}")
        return 1
    print("self-check passed: every registered norm trains on real images, keeps the grouped contract and folds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
