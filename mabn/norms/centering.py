"""Weight-centered convolutions feeding MABN (Yan et al. 2020, Sec. 4.3), as a model transform; the same
pairing gives the convs feeding GN+WS their weight standardization (Qiao et al. 2019).

W[o] <- W[o] - mean(W[o]) over (in, kh, kw): the conv output is then ~zero-mean per channel, so the second
moment MABN normalizes by approximates the variance. Applied with ``torch.nn.utils.parametrize`` so the
stored parameter stays the raw weight (optimizer, checkpoints) and the conv always sees the centered one.
"""

from __future__ import annotations

import itertools

from torch import Tensor, nn
from torch.nn.utils import parametrize

from .registry import norm_types


class CenteredWeight(nn.Module):
    """Parametrization W -> W - mean over every axis but the output-filter axis."""

    def forward(self, weight: Tensor) -> Tensor:
        return weight - weight.mean(dim=tuple(range(1, weight.dim())), keepdim=True)


def conv_norm_pairs(model: nn.Module) -> list[tuple[str, nn.Conv2d, str, nn.Module]]:
    """(conv name, conv, norm name, norm) for every Conv2d whose output feeds a registered norm directly.

    Structural rule, as torchvision/detectron2/pycls ResNets are written: the norm is the next module after
    the conv in registration order (a child of the conv counts, as in detectron2's ``Conv2d(norm=...)``)
    and has ``num_features == conv.out_channels``. A wrapper whose class sets ``wraps_norm`` (``NormAct2d``:
    a norm and its activation, where convert_norms replaced a timm BatchNormAct2d) is looked through.
    """
    types = norm_types()
    mods = [(n, m) for n, m in model.named_modules()
            if ".parametrizations" not in n and not isinstance(m, parametrize.ParametrizationList)
            and not getattr(type(m), "wraps_norm", False)]
    pairs = []
    for (cname, conv), (nname, norm) in itertools.pairwise(mods):
        if (isinstance(conv, nn.Conv2d) and isinstance(norm, types)
                and _channels(norm) == conv.out_channels):
            pairs.append((cname, conv, nname, norm))
    return pairs


def _channels(norm: nn.Module) -> int | None:
    return getattr(norm, "num_features", None) or getattr(norm, "num_channels", None)


def center_conv_weights(model: nn.Module, norm_types_to_center: tuple[type, ...] | None = None) -> list[str]:
    """Pair every conv feeding a norm of the given types (default: every norm that pairs) with that norm.

    The conv's weight gets the norm's parametrization: CenteredWeight for MABN2d, and for a norm with a
    ``feeding_conv_parametrization()`` method (GroupNormWS: weight standardization) what it returns; a norm
    with a ``pair_feeding_conv(conv)`` method (CBN: Taylor compensation by the conv's weight) is handed the
    conv. Returns the names of the paired convs. Idempotent: an already-paired conv is left as is.
    """
    targets = norm_types_to_center or (nn.Module,)
    names = []
    for cname, conv, _, norm in conv_norm_pairs(model):
        if hasattr(norm, "pair_feeding_conv") and isinstance(norm, targets):
            norm.pair_feeding_conv(conv)
            names.append(cname)
            continue
        make = _feeding_parametrization(norm)
        if make is None or not isinstance(norm, targets):
            continue
        if not is_paired(conv):
            parametrize.register_parametrization(conv, "weight", make())
        names.append(cname)
    return names


def _feeding_parametrization(norm: nn.Module):
    from .mabn import MABN2d

    if isinstance(norm, MABN2d):
        return CenteredWeight
    return getattr(norm, "feeding_conv_parametrization", None)


def is_centered(conv: nn.Module) -> bool:
    """Whether ``conv.weight`` goes through a CenteredWeight parametrization."""
    return parametrize.is_parametrized(conv, "weight") and any(
        isinstance(p, CenteredWeight) for p in conv.parametrizations.weight)


def is_paired(conv: nn.Module) -> bool:
    """Whether ``conv.weight`` goes through a pairing parametrization (centering or standardization)."""
    from .gnws import StandardizedWeight

    return parametrize.is_parametrized(conv, "weight") and any(
        isinstance(p, (CenteredWeight, StandardizedWeight)) for p in conv.parametrizations.weight)


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
