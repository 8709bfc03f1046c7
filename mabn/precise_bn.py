"""Recomputed inference statistics (PreciseBN; Wu & Johnson 2021, fvcore ``update_bn_stats``).

With the weights fixed, every batch-dependent norm's inference statistics become their average over N
training batches, each layer seeing its input as in training (train mode, normalization-batch statistics):
bn/brn/syncbn: running_mean/var = mean over normalization batches of the batch mean / unbiased variance;
mabn: running_var (v, the second moment) = mean of χ². All other buffers (counters, rings) are left as they
were, so training can continue unaffected.
"""

from __future__ import annotations

import torch
from torch import nn

from .dist import all_reduce_sum
from .norms import MABN2d, batch_dependent_types


def _group_stats(x: torch.Tensor, module: nn.Module):
    """Per-normalization-batch statistics (G, k, C) of a norm layer's input."""
    n = getattr(module, "group_size", None) or x.shape[0]
    xg = x.detach().float().reshape(x.shape[0] // n, n, x.shape[1], -1)
    if isinstance(module, MABN2d):
        return xg.square().mean(dim=(1, 3))[:, None]
    var, mean = torch.var_mean(xg, dim=(1, 3), correction=1)
    return torch.stack([mean, var], dim=1)


@torch.no_grad()
def recompute_norm_stats(model: nn.Module, batches, device: torch.device) -> int:
    """Replace the inference statistics of every batch-dependent norm by their average over ``batches``
    (an iterable of (images, targets)); returns the number of batches used (summed over ranks)."""
    layers = [m for m in model.modules() if isinstance(m, batch_dependent_types())]
    if not layers:
        return 0
    snapshot = {m: {k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in layers}
    sums: dict[nn.Module, torch.Tensor] = {}
    counts: dict[nn.Module, int] = {}

    def hook(module, inputs):
        if inputs[0].shape[0] == 0:
            return
        stats = _group_stats(inputs[0], module)
        sums[module] = sums.get(module, 0) + stats.sum(dim=0).double()
        counts[module] = counts.get(module, 0) + stats.shape[0]

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    was_training = model.training
    model.train()
    used = 0
    try:
        for images, _ in batches:
            model(images.to(device))
            used += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for m in layers:  # undo what the training-mode forwards did to counters, rings and running statistics
        for k, b in m.named_buffers(recurse=False):
            b.copy_(snapshot[m][k])
    for m in layers:
        if m not in sums:
            continue
        total = all_reduce_sum(torch.cat([sums[m].flatten(), torch.tensor([float(counts[m])], device=sums[m].device,
                                                                          dtype=torch.float64)]))
        avg = (total[:-1] / total[-1]).view(sums[m].shape)
        if isinstance(m, MABN2d):
            m.running_var.copy_(avg[0])
        else:
            m.running_mean.copy_(avg[0])
            m.running_var.copy_(avg[1])
    return int(all_reduce_sum(torch.tensor(float(used), device=device)).item())
