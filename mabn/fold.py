"""Fold eval-mode normalization into the preceding convolution: zero inference cost for bn/brn/mabn/frozenbn."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .norms import conv_norm_pairs, foldable_types, norm_types, protocol
from .norms.centering import bake_weight_centering, unparametrize_weight

logger = logging.getLogger(__name__)


@dataclass
class FoldReport:
    """Which (conv, norm) pairs were folded and which norm layers stayed (with the reason)."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)


def eval_scale_shift(norm: nn.Module) -> tuple[Tensor, Tensor]:
    """The per-channel (scale, shift) that a foldable norm applies in eval mode (``protocol.eval_affine``)."""
    found = protocol.eval_affine(norm)
    if found is None:
        raise ValueError(f"{type(norm).__name__} has no running statistics to fold")
    return found


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


@torch.no_grad()
def fold_norms(model: nn.Module, *, inplace: bool = False, return_report: bool = False):
    """Fold every foldable norm that directly follows a conv into that conv's weight and bias.

    Weight-centering parametrizations are baked first (the folded weight is the centered one); those of convs
    feeding a norm that stays (weight standardization for GN+WS) are baked too. Norms that
    cannot fold (gn, or a norm not fed by a conv) stay in the model and are reported, never dropped. Returns
    the folded model (a copy unless ``inplace``), and the FoldReport when ``return_report``.
    """
    if model.training:
        raise ValueError("fold_norms: the model is in train mode, where its norms normalize with batch "
                         "statistics; folding bakes their eval-mode map (running statistics) into the convs: "
                         "call model.eval() first")
    model = model if inplace else copy.deepcopy(model)
    report = FoldReport()
    folded_norms = set()
    for cname, conv, nname, norm in conv_norm_pairs(model):
        if not isinstance(norm, foldable_types()):
            continue
        scale, shift = eval_scale_shift(norm)
        if parametrize.is_parametrized(conv, "weight"):
            unparametrize_weight(conv)
        weight = conv.weight
        bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
        conv.weight = nn.Parameter(weight * scale.to(weight).view(-1, *([1] * (weight.dim() - 1))))
        conv.bias = nn.Parameter(bias.to(weight) * scale.to(weight) + shift.to(weight))
        _set_child(model, nname, nn.Identity())
        folded_norms.add(nname)
        report.folded.append((cname, nname))
    bake_weight_centering(model)  # convs feeding a norm that stays (GN+WS) keep their standardized weight
    for name, module in model.named_modules():
        if isinstance(module, norm_types()) and name not in folded_norms:
            why = "not foldable" if not isinstance(module, foldable_types()) else "not directly after a conv"
            report.kept.append((name, f"{type(module).__name__}: {why}"))
    if report.kept:
        logger.warning("fold_norms kept %d norm layer(s): %s", len(report.kept),
                       ", ".join(f"{n} ({why})" for n, why in report.kept))
    return (model, report) if return_report else model
