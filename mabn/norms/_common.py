"""Shared helpers of the normalization layers: argument checks, grouping and sequential EMA in closed form."""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def check_group_size(group_size: int | None) -> int | None:
    """Validate a ``group_size`` argument at construction (None = the whole device batch)."""
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be None or a positive int, got {group_size!r}")
    return group_size


def check_momentum(momentum: float) -> float:
    """PyTorch convention: the weight of the new value, in (0, 1]; the official MABN 0.98 is 0.02 here."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 < momentum <= 1.0:
        raise ValueError(
            f"momentum must be a float in (0, 1] (PyTorch convention: weight of the new value; "
            f"an official MABN/TensorFlow-style 0.98 is 0.02 here), got {momentum!r}"
        )
    return float(momentum)


def check_positive(name: str, value: float, *, integer: bool = False, allow_zero: bool = False) -> float:
    """Raise a ValueError naming ``name`` unless ``value`` is a positive (or non-negative) number."""
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or value < 0 or (value == 0 and not allow_zero):
        kind = "int" if integer else "number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be an {kind} {bound}, got {value!r}")
    return value


def num_groups(batch: int, group_size: int | None) -> tuple[int, int]:
    """Split a device batch into (G groups, n samples each); ValueError when n does not divide it."""
    if group_size is None:
        return 1, batch
    if batch % group_size != 0:
        raise ValueError(
            f"group_size={group_size} must divide the batch size {batch} "
            f"(the normalization batch must split the device batch into whole groups)"
        )
    return batch // group_size, group_size


def check_input(x: Tensor, num_features: int, layer: str) -> None:
    """Inputs are (N, C, *) with C == num_features."""
    if x.dim() < 2 or x.shape[1] != num_features:
        raise ValueError(f"{layer} expects input of shape (N, {num_features}, ...), got {tuple(x.shape)}")


def stat_dtype(x: Tensor) -> torch.dtype:
    """Statistics are computed in float32 for half/bfloat16 inputs (autocast) and in x's dtype otherwise."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def per_sample(stat: Tensor, x: Tensor) -> Tensor:
    """(G, C) per-group values -> (N, C, 1, ...) broadcastable against x (groups are consecutive samples)."""
    n = x.shape[0] // stat.shape[0]
    return stat.repeat_interleave(n, dim=0).view(*x.shape[:2], *([1] * (x.dim() - 2)))


def group_sum(per_sample_values: Tensor, groups: int) -> Tensor:
    """(N, C) per-sample values -> (G, C) sums over each group's consecutive samples."""
    return per_sample_values.view(groups, -1, per_sample_values.shape[1]).sum(dim=1)


def spatial_sum(x: Tensor) -> Tensor:
    """(N, C, *) -> (N, C): the sum over the spatial positions."""
    if x.dim() == 2:
        return x
    return x.flatten(2).sum(dim=-1) if x.is_contiguous() else x.sum(dim=tuple(range(2, x.dim())))


def spatial_sum_sq(x: Tensor) -> Tensor:
    """(N, C, *) -> (N, C): the sum of squares over the spatial positions, one fused reduction (no x² temporary)."""
    if x.dim() == 2:
        return x * x
    flat = x.flatten(2) if x.is_contiguous() else x  # contiguous: one reduction over the last dim
    return torch.linalg.vector_norm(flat, dim=-1 if flat.dim() == 3 else tuple(range(2, x.dim()))).square()


def spatial_dot(a: Tensor, b: Tensor) -> Tensor:
    """(N, C, *) x2 -> (N, C): the sum over the spatial positions of a·b."""
    if a.dim() == 2:
        return a * b
    if a.is_contiguous() and b.is_contiguous():
        return torch.linalg.vecdot(a.flatten(2), b.flatten(2))
    return (a * b).sum(dim=tuple(range(2, a.dim())))


def ema_weights(momentum: float, groups: int, device, dtype) -> tuple[Tensor, Tensor]:
    """Closed form of ``groups`` sequential EMA steps ``v <- (1-a) v + a s_g``.

    Returns (decay, mix) with shapes (G+1,) and (G+1, G) such that the value *before* step g (g = 0..G-1)
    and the final value (row G) are ``decay[g] * v0 + mix[g] @ s``. Built on ``device`` directly: a
    CPU-built tensor copied to a GPU would be a host-device synchronisation inside every forward. Cached per
    (momentum, G, device, dtype): every layer of a model asks for the same weights at every step.
    """
    if torch.compiler.is_compiling():  # traced into the graph: Dynamo would skip the cache (with a warning)
        return _ema_weights.__wrapped__(float(momentum), int(groups), torch.device(device), dtype)
    return _ema_weights(float(momentum), int(groups), torch.device(device), dtype)


@functools.lru_cache(maxsize=64)
def _ema_weights(momentum: float, groups: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    keep = 1.0 - momentum
    g = torch.arange(groups + 1, device=device, dtype=torch.float64)
    h = torch.arange(groups, device=device, dtype=torch.float64)
    expo = g[:, None] - 1 - h[None, :]
    mix = torch.where(expo >= 0, momentum * keep ** expo.clamp(min=0), torch.zeros_like(expo))
    return (keep**g).to(dtype), mix.to(dtype)


def sequential_ema(v0: Tensor, values: Tensor, momentum: float) -> tuple[Tensor, Tensor]:
    """Running value before each of G sequential EMA steps (G, C) and after the last one (C,)."""
    groups = values.shape[0]
    if groups == 1:  # the common case: no weights to build
        return v0[None], (1 - momentum) * v0 + momentum * values[0]
    decay, mix = ema_weights(momentum, groups, values.device, values.dtype)
    # elementwise, not `mix @ values`: autocast would run a matmul in bf16/fp16 and lose the statistics
    seq = decay[:, None] * v0[None] + (mix[:, :, None] * values[None]).sum(dim=1)
    return seq[:-1], seq[-1]


def empty_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """N = 0: an empty output that stays connected to the affine parameters (zero gradients), no state change."""
    if weight is None:
        return x.clone()
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * weight.view(shape).to(x.dtype) + bias.view(shape).to(x.dtype)
