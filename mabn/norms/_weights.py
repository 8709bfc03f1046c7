"""The weight parametrizations with which a norm pairs its feeding conv (``NormLayer.pair_conv``): MABN's
weight centering (Yan et al. 2020, Sec. 4.3) and GN+WS's weight standardization (Qiao et al. 2019).

Applied with ``torch.nn.utils.parametrize``: the stored parameter stays the raw weight (optimizer, checkpoints)
and the conv always sees the transformed one; baking it into a plain weight is one call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._common import check_positive


class CenteredWeight(nn.Module):
    """W -> W − mean over every axis but the output-filter axis: the conv output is ~zero-mean per channel, so
    the second moment MABN normalizes by approximates the variance."""

    def forward(self, weight: Tensor) -> Tensor:
        return weight - weight.mean(dim=tuple(range(1, weight.dim())), keepdim=True)


class StandardizedWeight(nn.Module):
    """W -> (W − mean) / (std + eps), statistics over all axes but the output-filter axis (Qiao et al. 2019,
    Eq. 5-6). The official code (joe-siyuan-qiao/WeightStandardization) uses torch's unbiased std and adds ε
    outside the square root; so does this."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = float(check_positive("ws_eps", eps, allow_zero=True))

    def extra_repr(self) -> str:
        return f"eps={self.eps}"

    def forward(self, weight: Tensor) -> Tensor:
        dims = tuple(range(1, weight.dim()))
        fan_in = weight[0].numel() if weight.shape[0] else 1
        # unbiased as the official code, except for a single-value filter whose unbiased std is undefined
        std, mean = torch.std_mean(weight, dim=dims, correction=1 if fan_in > 1 else 0, keepdim=True)
        return (weight - mean) / (std + self.eps)


PAIRINGS = (CenteredWeight, StandardizedWeight)


def parametrize_weight(conv: nn.Module, parametrization: nn.Module) -> bool:
    """Give ``conv.weight`` the pairing ``parametrization`` unless it has one already (idempotent); True."""
    if not is_paired(conv):
        parametrize.register_parametrization(conv, "weight", parametrization)
    return True


def is_centered(conv: nn.Module) -> bool:
    """Whether ``conv.weight`` goes through a CenteredWeight parametrization."""
    return parametrize.is_parametrized(conv, "weight") and any(
        isinstance(p, CenteredWeight) for p in conv.parametrizations.weight)


def is_paired(conv: nn.Module) -> bool:
    """Whether ``conv.weight`` goes through a pairing parametrization (centering or standardization)."""
    return parametrize.is_parametrized(conv, "weight") and any(
        isinstance(p, PAIRINGS) for p in conv.parametrizations.weight)


def bake_weight_centering(model: nn.Module) -> nn.Module:
    """Replace each pairing parametrization (centering, standardization) by a plain weight of its values."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and is_paired(module):
            unparametrize_weight(module)
    return model


def unparametrize_weight(conv: nn.Module) -> None:
    """``remove_parametrizations(conv, "weight", leave_parametrized=True)``, safe on deep copies.

    torch's version deletes the ``weight`` property from the generated ``Parametrized*`` class, which a
    ``copy.deepcopy`` of the module shares with the original: removing it from a copy breaks the original.
    Here only the instance changes: it gets its plain class back and a plain Parameter.
    """
    if set(conv.parametrizations.keys()) != {"weight"}:
        raise ValueError(f"{type(conv).__name__} has parametrizations other than weight: "
                         f"{sorted(conv.parametrizations.keys())}")
    weight = conv.weight.detach().clone()
    conv.__class__ = conv.__class__.__bases__[0]
    del conv.parametrizations
    conv.weight = nn.Parameter(weight)
