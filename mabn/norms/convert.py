"""Any model's BatchNorm-family layers to a registered norm in one call, and back to BatchNorm2d for export.

Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` and mmengine's ``revert_sync_batchnorm``, but for every
norm of the registry: torch's BatchNorm2d and SyncBatchNorm, detectron2's, torchvision's and timm's frozen
BatchNorms and timm's BatchNormAct2d become the recipe's layer, built through ``build_norm`` and paired with
their feeding convs through ``NormRecipe.prepare``. Third-party classes are looked up in ``sys.modules`` only:
a model holding one has imported its module, so nothing (detectron2, timm) is imported here.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import protocol
from .activations import apply_norm_activations
from .centering import conv_norm_pairs, is_paired, unparametrize_weight
from .registry import NormContext, NormRecipe, build_norm, foldable_types, norm_types

# Frozen BatchNorms of other libraries: (module, class); buffers weight, bias, running_mean, running_var.
_FROZEN = (("detectron2.layers.batch_norm", "FrozenBatchNorm2d"),
           ("torchvision.ops.misc", "FrozenBatchNorm2d"), ("timm.layers.norm_act", "FrozenBatchNormAct2d"))


@dataclass(frozen=True)
class Converted:
    """One replaced layer: where, from what, to what, which tensors carried over, and anything to know."""

    name: str
    old_type: str
    new_type: str
    copied: tuple[str, ...]
    note: str = ""


@dataclass(frozen=True)
class Left:
    """One norm-like layer left as it was, and why."""

    name: str
    type: str
    reason: str


@dataclass
class ConversionReport:
    """What ``convert_norms`` / ``revert_norms`` changed and what they left."""

    norm: str
    converted: list[Converted] = field(default_factory=list)
    left: list[Left] = field(default_factory=list)
    paired: list[str] = field(default_factory=list)       # convs paired with a new norm (centering, WS, CBN)
    unpaired: list[str] = field(default_factory=list)     # converted norms that pair but have no feeding conv
    baked: list[str] = field(default_factory=list)        # revert: convs whose pairing became a plain weight
    activations: list[str] = field(default_factory=list)  # apply_norm_activations' changes (ResNets)

    def __str__(self) -> str:
        lines = [f"{len(self.converted)} layer(s) -> {self.norm}, {len(self.left)} left, "
                 f"{len(self.paired)} conv(s) paired, {len(self.baked)} baked"]
        lines += [f"  {c.name}: {c.old_type} -> {c.new_type} (copied {', '.join(c.copied) or 'nothing'})"
                  f"{'; ' + c.note if c.note else ''}" for c in self.converted]
        lines += [f"  left {x.name}: {x.type}: {x.reason}" for x in self.left]
        return "\n".join(lines)


class NormAct2d(nn.Module):
    """A registry norm followed by the drop layer and activation of the timm BatchNormAct2d it replaced."""

    wraps_norm = True  # conv_norm_pairs looks through it: the conv before it feeds ``norm``

    def __init__(self, norm: nn.Module, act: nn.Module, drop: nn.Module | None = None):
        super().__init__()
        self.norm = norm
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(self.norm(x)))


_OTHER_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.RMSNorm)


def _frozen_classes() -> tuple[type, ...]:
    found = (getattr(sys.modules.get(module), attr, None) for module, attr in _FROZEN)
    return tuple(cls for cls in found if isinstance(cls, type))


def _is_ours(module: nn.Module) -> bool:
    return type(module).__module__.startswith("mabn.")


def _leave_reason(module: nn.Module) -> str | None:
    """None for a BatchNorm-family layer to convert; else why a norm-like layer stays ("" for a non-norm)."""
    if isinstance(module, NormAct2d):
        return ""  # its norm is reported on its own
    if _is_ours(module) and isinstance(module, norm_types()):
        return "already a registry norm"
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm, *_frozen_classes())):
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "not a 2d BatchNorm: the registry's norms normalize (N, C, H, W) inputs"
    kind = type(module).__name__
    # a class named like a norm counts, except timm's ConvNormAct (a conv followed by a norm)
    if isinstance(module, _OTHER_NORMS) or ("Norm" in kind and not kind.startswith("Conv")):
        return "not a BatchNorm-family layer"
    return ""


def _channels(module: nn.Module) -> int:
    return getattr(module, "num_features", None) or module.running_var.numel()


def _copy_state(src: nn.Module, new: nn.Module) -> tuple[str, ...]:
    """Copy what means the same in both layers: the affine, and the population statistic in the new layer's
    terms (``protocol.convert_population``: MABN's second moment is E[x²] = σ² + μ²)."""
    copied = []
    with torch.no_grad():
        for key in ("weight", "bias"):
            s, d = getattr(src, key, None), getattr(new, key, None)
            if isinstance(s, Tensor) and isinstance(d, Tensor):
                d.copy_(s)
                copied.append(key)
        have = protocol.population(src)
        stats = protocol.convert_population(have, protocol.statistic(new))
        if stats:
            protocol.set_population(new, stats)
            copied += ["running_mean", "running_var"] if "mean" in stats else \
                ["running_var (+ running_mean²)" if "mean" in have else "running_var"]
    return tuple(copied)


_carries_activation = protocol.carries_activation


def _with_activation(src: nn.Module, new: nn.Module) -> tuple[nn.Module, str]:
    """The new norm with the activation a timm *Act layer applied after its norm (none for a norm that
    carries its own activation; that norm's variant without activation where the layer had none)."""
    act = getattr(src, "act", None)
    if not isinstance(act, nn.Module):
        note = "carries its activation: an activation after it in the model stays" \
            if _carries_activation(new) else ""
        return new, note
    drop = getattr(src, "drop", None)
    drop = None if drop is None or isinstance(drop, nn.Identity) else drop
    if not _carries_activation(new):
        if isinstance(act, nn.Identity) and drop is None:
            return new, ""
        return NormAct2d(new, act, drop), f"followed by the layer's {type(act).__name__}"
    if isinstance(act, nn.Identity):
        new, note = new.without_activation(), "variant without activation (the layer applied none)"
    else:
        note = f"its own activation replaces the layer's {type(act).__name__}"
    return (new if drop is None else NormAct2d(new, nn.Identity(), drop)), note


def _like(new: nn.Module, src: nn.Module) -> nn.Module:
    """``new`` on ``src``'s device, floating tensors in its dtype, in its train/eval mode."""
    ref = next((t for t in (*src.parameters(), *src.buffers()) if t.is_floating_point()), None)
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype)
    return new.train(src.training)


def _build_one(recipe: NormRecipe, module: nn.Module, keep_eps: bool, name: str, model: nn.Module) -> nn.Module:
    try:
        return recipe.ctor(_channels(module), **({"eps": float(module.eps)} if keep_eps else {}))
    except ValueError as err:  # e.g. GroupNorm groups that do not divide this layer's channels
        raise ValueError(f"convert_norms: {name} ({type(module).__name__}, {_channels(module)} channels) "
                         f"cannot become {recipe.name}: {err}{_widths_hint(model, recipe)}") from err


def _widths_hint(model: nn.Module, recipe: NormRecipe) -> str:
    """The model's norm widths, and for a grouped norm the group counts that divide every one of them."""
    widths = sorted({_channels(m) for name, m in model.named_modules() if name and _leave_reason(m) is None})
    hint = f" (this model's norm widths: {', '.join(map(str, widths))}"
    if "num_groups" in recipe.params and widths:  # GroupNorm caps the groups at a layer's width
        valid = [g for g in range(1, widths[-1] + 1) if all(w % min(g, w) == 0 for w in widths)]
        shown = ", ".join(map(str, valid[:12])) + (", ..." if len(valid) > 12 else "")
        hint += f"; num_groups that suit every layer: {shown}"
    return hint + ")"


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)


def convert_norms(model: nn.Module, cfg: Mapping[str, Any] | str | NormRecipe,
                  context: NormContext | None = None, *, return_report: bool = False):
    """Replace every BatchNorm-family layer of ``model`` (in place) by the registry norm of ``cfg``; returns
    the model, as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does (``(model, report)`` with ``return_report``,
    as ``fold_norms``: the convention of the three).

    ``cfg``: a flat norm config (``{"name": "mabn", "window": 16}``, validated by ``build_norm`` before the
    model is touched) or a ``NormRecipe``. Affine parameters and running statistics are copied where they
    mean the same; a config that leaves ``eps`` unset keeps each layer's eps for the statistics norms (so
    bn -> bn is exact). Convs feeding the new norms are paired through ``recipe.prepare``.
    """
    recipe = cfg if isinstance(cfg, NormRecipe) else build_norm(cfg, context)
    keep_eps = isinstance(cfg, str) or (isinstance(cfg, Mapping) and cfg.get("eps") is None)
    keep_eps = keep_eps and protocol.statistic(recipe.ctor(1)) is not None  # a norm with BN's eps
    report = ConversionReport(recipe.name)
    replacements = []  # all built before the first is replaced: a failure leaves the model as it was
    for name, module in list(model.named_modules()):
        reason = _leave_reason(module)
        if reason is None and not name:
            reason = "the model itself is the norm: convert a module that contains it"
        if reason is not None:
            if reason:
                report.left.append(Left(name, type(module).__name__, reason))
            continue
        norm = _like(_build_one(recipe, module, keep_eps, name, model), module)
        copied = _copy_state(module, norm)
        new, note = _with_activation(module, norm)
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and not isinstance(weight, nn.Parameter):
            note = "; ".join(filter(None, [note, "was frozen (buffers): its affine is now trainable"]))
        _remember_original(new, module)
        replacements.append((name, new))
        report.converted.append(Converted(name, type(module).__name__, type(new).__name__, copied, note))
    new_norms = {}
    for name, new in replacements:
        _replace(model, name, new)
        new_norms[id(new.norm if isinstance(new, NormAct2d) else new)] = name
    recipe.prepare(model)
    _record_pairs(model, recipe, new_norms, report)
    if any(_carries_activation(m) for m in model.modules()):
        report.activations = apply_norm_activations(model)  # torchvision / CIFAR ResNet blocks
    return (model, report) if return_report else model


# the layer a converted norm replaced, kept outside the module tree (no parameters, no state-dict keys): what
# revert_norms gives back, so a reverted model loads into the original library's model strictly
_ORIGINAL = "_mabn_reverts_to"


def _remember_original(new: nn.Module, src: nn.Module) -> None:
    if type(src) is not nn.BatchNorm2d:  # timm's BatchNormAct2d, FrozenBatchNorm2d of torchvision/detectron2
        new.__dict__[_ORIGINAL] = copy.deepcopy(src)


def _original_restored(module: nn.Module, norm: nn.Module) -> tuple[nn.Module, tuple[str, ...]] | None:
    """The remembered original layer of ``module`` (a converted norm or its NormAct2d) with ``norm``'s
    eval-mode map, or None when nothing was remembered."""
    template = module.__dict__.get(_ORIGINAL)
    if template is None:
        return None
    plain, _ = _plain_batchnorm(norm)
    out = _like(copy.deepcopy(template), norm)
    copied = []
    with torch.no_grad():
        own_eps = float(getattr(out, "eps", plain.eps))
        for key, value in plain.state_dict().items():
            target = getattr(out, key, None)
            if isinstance(target, Tensor):
                if key == "running_var":  # the same map under the original layer's eps
                    value = value + plain.eps - own_eps
                target.copy_(value.to(target.dtype))
                copied.append(key)
    return out, tuple(copied)


def _record_pairs(model: nn.Module, recipe: NormRecipe, new_norms: dict[int, str],
                  report: ConversionReport) -> None:
    if not recipe.pairs_convs:  # MABN's centering, GN+WS's standardization, CBN's compensation
        return
    fed = {id(norm) for _, _, _, norm in conv_norm_pairs(model)}
    report.paired = [c for c, _, _, norm in conv_norm_pairs(model) if id(norm) in new_norms]
    report.unpaired = [name for key, name in new_norms.items() if key not in fed]


def _plain_batchnorm(norm: nn.Module) -> tuple[nn.BatchNorm2d, tuple[str, ...]]:
    """A ``nn.BatchNorm2d`` with ``norm``'s eval-mode map (MABN: mean 0, its second moment as variance)."""
    weight = getattr(norm, "weight", None)
    momentum = getattr(norm, "momentum", 0.1)
    bn = _like(nn.BatchNorm2d(_channels(norm), eps=float(norm.eps), momentum=momentum,
                              affine=weight is not None), norm)
    copied = []
    with torch.no_grad():
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            value = getattr(norm, key, None)
            if isinstance(value, Tensor) and isinstance(getattr(bn, key), Tensor):
                getattr(bn, key).copy_(value)
                copied.append(key)
    return bn, tuple(copied)


def _revertible(module: nn.Module) -> bool:
    # the registry's foldable layers and torch's SyncBatchNorm (as mmengine); never another library's
    # subclass (timm's SyncBatchNormAct would lose its activation)
    return type(module) is nn.SyncBatchNorm or (_is_ours(module) and isinstance(module, foldable_types()))


def revert_norms(model: nn.Module, *, return_report: bool = False):
    """Turn every batch-statistics registry norm (bn, brn, mabn, cbn, syncbn, frozenbn; torch SyncBatchNorm)
    into a plain ``nn.BatchNorm2d`` with the same eval output (in place), for export; returns the model
    (``(model, report)`` with ``return_report``). A norm that ``convert_norms`` put in place of another class
    (timm's ``BatchNormAct2d`` with its activation, a ``FrozenBatchNorm2d``) becomes that class again, so the
    state dict has the original model's keys.

    Convs centered for MABN get their centered weight baked in (``unparametrize_weight``); batch-free norms
    (gn, gnws, ln, in, evonorm_s0, frn) have no BatchNorm equivalent and are listed as left.
    """
    report = ConversionReport("bn (torch.nn.BatchNorm2d)")
    targets = {id(m) for m in model.modules() if _revertible(m)}
    for cname, conv, _, norm in conv_norm_pairs(model):
        if id(norm) in targets and is_paired(conv):
            unparametrize_weight(conv)
            report.baked.append(cname)
    done = set()
    for name, module in list(model.named_modules()):
        if isinstance(module, NormAct2d) and id(module.norm) in targets and name:
            restored = _original_restored(module, module.norm)
            if restored is not None:
                _replace(model, name, restored[0])
                done.add(id(module.norm))
                report.converted.append(Converted(name, f"NormAct2d({type(module.norm).__name__})",
                                                  type(restored[0]).__name__, restored[1]))
                continue
        if id(module) in targets and name and id(module) not in done:
            bn, copied = _original_restored(module, module) or _plain_batchnorm(module)
            _replace(model, name, bn)
            report.converted.append(Converted(name, type(module).__name__, type(bn).__name__, copied))
        elif isinstance(module, norm_types()) and _is_ours(module) and not _revertible(module):
            report.left.append(Left(name, type(module).__name__, "batch-free: its eval output depends on "
                                    "each sample, so no BatchNorm2d computes it"))
    return (model, report) if return_report else model
