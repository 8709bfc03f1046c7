"""Recomputed inference statistics, PreciseBN as Wu & Johnson define it ("Rethinking 'Batch' in BatchNorm",
2021, Sec. 3): with the weights fixed and the model in train mode, N training images pass in estimation batches
of B samples, chosen independently of the normalization batch n of training; every batch-dependent norm
normalizes each estimation batch by that batch's own statistics (``protocol.batch_statistics``: no moving
average, no renorm, no state change) while the exact moments of its input are summed over every sample and
position. The population statistic is then

    mean_var (bn, brn, syncbn, cbn):  E[x],  Var[x] = E[x²] − E[x]²;      second_moment (mabn):  χ² = E[x²].

Var is the population (biased) variance over the N·H·W values: it is the variance of the distribution the
layer normalizes at test time, not an estimate of a larger population from a sample, and with N·H·W in the
millions Bessel's factor N·H·W/(N·H·W − 1) would change it by under 1e-6. Averaging each batch's unbiased
variance instead (fvcore's ``update_bn_stats`` at B = n) misses the variance between batches: at small B the
recomputed statistics are too small (PAPERS.md; Table 2's B = 2 column).

cbn: during estimation each batch is normalized by its own statistics (its Taylor-compensated window would only
average k batches of the same fixed weights); its population statistic is BN's, the moments of its input.
Counters, rings and windows are restored afterwards; under DDP the sums are reduced over ranks, so every rank
ends with the same statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .dist import all_reduce_sum
from .norms import batch_dependent_types, protocol


def estimation_batches(batches: Iterable, batch_size: int | None, max_images: int | None) -> Iterator[torch.Tensor]:
    """Images of ``batches`` ((images, targets) pairs) re-cut into estimation batches of exactly ``batch_size``
    (None: as they come), at most ``max_images`` in all (None: every image). A last partial batch is dropped
    unless it is the only one."""
    pending: list[torch.Tensor] = []
    have = given = 0
    for images, _ in batches:
        if max_images is not None:
            images = images[:max_images - given]
        if images.shape[0] == 0:
            break
        given += images.shape[0]
        if batch_size is None:
            yield images
        else:
            pending.append(images)
            have += images.shape[0]
            while have >= batch_size:
                flat = torch.cat(pending)
                yield flat[:batch_size]
                pending, have = [flat[batch_size:]], have - batch_size
        if max_images is not None and given >= max_images:
            break
    if batch_size is not None and have and given == have:  # fewer images than one batch: use them all
        yield torch.cat(pending)


@torch.no_grad()
def recompute_norm_stats(model: nn.Module, batches: Iterable, device: torch.device, *,
                         batch_size: int | None = None, max_images: int | None = None) -> int:
    """Replace the population statistic of every batch-dependent norm of ``model`` by the exact moments of its
    input over ``max_images`` images of ``batches`` in estimation batches of ``batch_size`` (B; None: the
    loader's batches). Returns the number of images used, summed over ranks (0: no batch-dependent norm)."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"precise_bn batch_size must be a positive integer or None, got {batch_size!r}")
    layers = [m for m in model.modules() if isinstance(m, batch_dependent_types()) and protocol.population(m)]
    if not layers:
        return 0
    snapshot = {m: {k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in layers}
    sums: dict[nn.Module, torch.Tensor] = {}  # (3, C) float64: count, Σx, Σx² per channel

    def hook(module, inputs):
        x = inputs[0].detach()
        if x.shape[0] == 0:
            return
        flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
        add = torch.stack([torch.full_like(flat[:, 0], flat.shape[1]), flat.sum(dim=1), flat.square().sum(dim=1)])
        sums[module] = sums[module] + add if module in sums else add

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    was_training = model.training
    model.train()
    used = 0
    try:
        with protocol.batch_statistics(layers, None):
            for images in estimation_batches(batches, batch_size, max_images):
                model(images.to(device, non_blocking=True))
                used += images.shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        for m in layers:  # nothing the estimation pass did stays in counters, rings or windows
            for k, b in m.named_buffers(recurse=False):
                b.copy_(snapshot[m][k])
    for m in layers:
        own = protocol.population(m)
        channels = next(iter(own.values())).numel()
        local = sums.get(m, torch.zeros(3, channels, dtype=torch.float64, device=own[next(iter(own))].device))
        total = all_reduce_sum(local)  # every rank joins, whether or not its layer saw an image
        if float(total[0, 0]) == 0:
            continue
        mean, second = total[1] / total[0], total[2] / total[0]
        stats = protocol.population_from_moments(protocol.statistic(m), mean, second)
        protocol.set_population(m, {k: v.to(own[k].dtype) for k, v in stats.items()})
    return int(all_reduce_sum(torch.tensor(float(used), device=device)).item())


def evaluate_statistics(model: nn.Module, evaluate, *, stats: str, group_size: int | None = None,
                        batches: Iterable | None = None, batch_size: int | None = None,
                        max_images: int | None = None, device: torch.device | None = None) -> dict:
    """One evaluation of ``model`` with one treatment of its inference statistics (Wu & Johnson 2021, Sec. 3):

    - ``"ema"``: the running averages training kept (what eval mode uses);
    - ``"precise"``: recomputed on a copy over ``max_images`` images of ``batches`` at estimation batch
      ``batch_size`` (``recompute_norm_stats``); the model itself is left as it was;
    - ``"batch"``: mini-batch statistics at test, every group of ``group_size`` consecutive test samples (the
      normalization batch: a device batch split as in training; None: the whole test batch) normalized by its
      own statistics, no state changed.

    ``evaluate(model) -> metrics`` runs the validation pass. Returns the metrics with what was done."""
    if stats == "ema":
        return {"stats": "ema", **evaluate(model)}
    if stats == "batch":
        layers = [m for m in model.modules() if isinstance(m, batch_dependent_types())]
        with protocol.batch_statistics(layers, group_size):
            return {"stats": "batch", "batch": group_size, **evaluate(model)}
    if stats == "precise":
        import copy

        recomputed = copy.deepcopy(model)
        used = recompute_norm_stats(recomputed, batches, device, batch_size=batch_size, max_images=max_images)
        return {"stats": "precise", "batch": batch_size, "images": used, **evaluate(recomputed)}
    raise ValueError(f"stats must be ema, precise or batch, got {stats!r}")
