"""The protocol every registered norm answers; folding, PreciseBN, diagnostics, conversion, conv pairing and the
detectron2 plugin call these functions and never name a norm class.

A norm declares, once, in its own class (``NormLayer`` gives the defaults of a batch-free norm):
- ``statistic``: the population statistic it keeps for inference, "mean_var" (running_mean, running_var),
  "second_moment" (running_var holds E[x²]: MABN normalizes without centering) or None (batch-free);
  ``population()`` / ``set_population()`` read and write it as ``{"mean": ..., "var": ...}`` or
  ``{"second_moment": ...}``;
- ``eval_affine()``: the per-channel (scale, shift) of its eval mode, None when eval is no affine map;
- ``restart()``: every counter and moving-average history back to a fresh layer's (fine-tuning starts its
  warm-ups over), the population statistic and the affine parameters kept;
- ``pair_conv(conv)``: take the conv whose output it normalizes (MABN's weight centering, GN+WS's weight
  standardization, CBN's Taylor compensation); True when it paired;
- ``carries_activation`` (class) and ``applies_activation()`` (instance): it replaces norm + ReLU;
- ``batch_statistics_forward(x)``: the output with the call's own batch statistics and no state change
  (PreciseBN's estimation pass, evaluation with mini-batch statistics: ``batch_statistics``).

torch's own ``nn.BatchNorm2d`` / ``nn.SyncBatchNorm`` / ``nn.GroupNorm`` are registered types too; their
answers are the adapters at the end of this file, so a stock torch layer in a model is treated like ours.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import Tensor, nn

from ._table import batch_dependent_types

STATISTICS = ("mean_var", "second_moment")


class NormLayer:
    """Mixin of every norm layer of the project: the protocol's answers for a batch-free layer."""

    statistic: ClassVar[str | None] = None
    carries_activation: ClassVar[bool] = False
    # a layer that normalizes with something else than its batch's statistics (MABN's moving averages) hands
    # them to a tracer by reference in ``used_stats`` (None: nobody asks) on traced steps
    reports_used_statistics: ClassVar[bool] = False

    def eval_affine(self) -> tuple[Tensor, Tensor] | None:
        """(scale, shift) per channel of eval mode; None when eval depends on each sample (batch-free)."""
        return None

    def population(self) -> dict[str, Tensor]:
        """The inference statistic: {"mean", "var"}, {"second_moment"} or {} (see ``statistic``)."""
        if getattr(self, "running_var", None) is None:  # e.g. track_running_stats=False
            return {}
        if self.statistic == "mean_var":
            return {"mean": self.running_mean, "var": self.running_var}
        if self.statistic == "second_moment":
            return {"second_moment": self.running_var}
        return {}

    @torch.no_grad()
    def set_population(self, stats: dict[str, Tensor]) -> None:
        """Write the inference statistic (the keys ``population`` returns)."""
        own = self.population()
        if set(stats) != set(own):
            raise ValueError(f"{type(self).__name__} keeps {sorted(own) or 'no statistic'}, got {sorted(stats)}")
        for key, value in stats.items():
            own[key].copy_(value)

    @torch.no_grad()
    def restart(self) -> None:
        """Counters and moving-average history as a fresh layer's; nothing for a layer without them."""
        counter = getattr(self, "num_batches_tracked", None)
        if isinstance(counter, Tensor):
            counter.zero_()

    def pair_conv(self, conv: nn.Module) -> bool:
        """Take the conv whose output this layer normalizes; False: this layer does not pair."""
        return False

    def applies_activation(self) -> bool:
        """Whether this instance applies its own activation (a class that carries one may have a variant
        without, ``apply_act=False``)."""
        return self.carries_activation and bool(getattr(self, "apply_act", True))

    def batch_statistics_forward(self, x: Tensor) -> Tensor:
        """The output of a batch-free layer does not depend on other samples: its forward."""
        return self(x)


def _dims(x: Tensor) -> tuple[int, ...]:
    return (0, *range(2, x.dim()))


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def centered_batch_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """y = γ·(x − μ)/√(σ² + ε) + β with the call's own mean and biased variance (BN's training map)."""
    if x.shape[0] == 0:
        return x.clone()
    xd = x.to(_stat_dtype(x))
    var, mean = torch.var_mean(xd, dim=_dims(x), correction=0, keepdim=True)
    return _affine((xd - mean) * torch.rsqrt(var + eps), weight, bias).to(x.dtype)


def second_moment_batch_forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """y = γ·x/√(χ² + ε) + β with the call's own second moment (MABN normalizing by its batch alone)."""
    if x.shape[0] == 0:
        return x.clone()
    xd = x.to(_stat_dtype(x))
    chi2 = xd.square().mean(dim=_dims(x), keepdim=True)
    return _affine(xd * torch.rsqrt(chi2 + eps), weight, bias).to(x.dtype)


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    shape = (1, -1) + (1,) * (y.dim() - 2)
    if weight is not None:
        y = y * weight.to(y.dtype).view(shape)
    if bias is not None:
        y = y + bias.to(y.dtype).view(shape)
    return y


def running_affine(mean: Tensor | None, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                   eps: float) -> tuple[Tensor, Tensor]:
    """(scale, shift) of y = γ·(x − μ)/√(σ² + ε) + β (μ None: nothing centered, MABN's eval)."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = torch.zeros_like(scale) if mean is None else -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


# --- torch's own registered layers -------------------------------------------------------------------------


class _TorchBatchNorm(NormLayer):
    """``nn.BatchNorm2d`` / ``nn.SyncBatchNorm`` answering the protocol (a view on the module); also any other
    library's BatchNorm with ``running_mean``/``running_var`` (detectron2's, torchvision's and timm's frozen
    BatchNorms, which ``convert_norms`` reads)."""

    statistic = "mean_var"

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    def running_mean(self) -> Tensor:
        return self.module.running_mean

    @property
    def running_var(self) -> Tensor:
        return self.module.running_var

    @property
    def num_batches_tracked(self) -> Tensor | None:
        return getattr(self.module, "num_batches_tracked", None)

    def eval_affine(self) -> tuple[Tensor, Tensor] | None:
        m = self.module
        if m.running_var is None:
            return None
        return running_affine(m.running_mean, m.running_var, getattr(m, "weight", None), getattr(m, "bias", None),
                              m.eps)

    def batch_statistics_forward(self, x: Tensor) -> Tensor:
        m = self.module
        return centered_batch_forward(x, getattr(m, "weight", None), getattr(m, "bias", None), m.eps)


class _TorchBatchFree(NormLayer):
    """``nn.GroupNorm`` (and any batch-free torch norm): the protocol's defaults."""

    def __init__(self, module: nn.Module):
        self.module = module

    def batch_statistics_forward(self, x: Tensor) -> Tensor:
        return self.module(x)


def layer(module: nn.Module) -> NormLayer:
    """The protocol's answers for ``module``: the module itself for the project's layers, an adapter for
    torch's ``nn.BatchNorm2d``/``nn.SyncBatchNorm``/``nn.GroupNorm``."""
    if isinstance(module, NormLayer):
        return module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) or (
            isinstance(getattr(module, "running_mean", None), Tensor)
            and isinstance(getattr(module, "running_var", None), Tensor)):
        return _TorchBatchNorm(module)
    return _TorchBatchFree(module)


def statistic(module: nn.Module) -> str | None:
    """"mean_var", "second_moment" or None (see the module docstring)."""
    found = layer(module)
    return found.statistic if found.population() else None


def population(module: nn.Module) -> dict[str, Tensor]:
    return layer(module).population()


def set_population(module: nn.Module, stats: dict[str, Tensor]) -> None:
    layer(module).set_population(stats)


def eval_affine(module: nn.Module) -> tuple[Tensor, Tensor] | None:
    return layer(module).eval_affine()


def restart(module: nn.Module) -> None:
    layer(module).restart()


def pair_conv(module: nn.Module, conv: nn.Module) -> bool:
    return layer(module).pair_conv(conv)


def carries_activation(module: nn.Module) -> bool:
    """Whether ``module`` is a norm that applies its own activation (no ReLU belongs after it)."""
    return isinstance(module, NormLayer) and module.applies_activation()


def reports_used_statistics(module: nn.Module) -> bool:
    """Whether ``module`` hands a tracer the statistics it normalizes with (``used_stats``)."""
    return isinstance(module, NormLayer) and module.reports_used_statistics


def convert_population(stats: dict[str, Tensor], to: str | None) -> dict[str, Tensor]:
    """One statistic expressed as another: mean/var -> E[x²] = σ² + μ²; E[x²] -> a centered one is unknown."""
    if to is None or not stats:
        return {}
    have = "mean_var" if "mean" in stats else "second_moment"
    if have == to:
        return dict(stats)
    if to == "second_moment":
        return {"second_moment": stats["var"] + stats["mean"] * stats["mean"]}
    return {}  # a second moment does not say what the mean was


def population_from_moments(to: str, mean: Tensor, second_moment: Tensor) -> dict[str, Tensor]:
    """The statistic ``to`` from the exact moments E[x] and E[x²] of a layer's input (PreciseBN)."""
    if to == "second_moment":
        return {"second_moment": second_moment}
    return {"mean": mean, "var": (second_moment - mean * mean).clamp_min(0)}


@contextlib.contextmanager
def batch_statistics(modules: list[nn.Module], group_size: int | None) -> Iterator[None]:
    """Inside: each of ``modules`` normalizes every group of ``group_size`` consecutive samples of a call (None:
    the whole call; a last group may be smaller, e.g. the end of a test set) by that group's own statistics,
    changing no state; outside: as before."""

    def forward(impl: NormLayer, x: Tensor) -> Tensor:
        if group_size is None or x.shape[0] <= group_size:
            return impl.batch_statistics_forward(x)
        return torch.cat([impl.batch_statistics_forward(part) for part in x.split(group_size)])

    for m in modules:
        m.forward = functools.partial(forward, layer(m))
    try:
        yield
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)


def freeze_statistics(model: nn.Module) -> list:
    """Hold every batch-dependent norm of ``model`` at its eval map while the model trains (Wu & Johnson's
    "frozen BN": population statistics in the forward pass, affine still trained), by a forward pre-hook that
    puts the layer in eval mode before each call (``model.train()`` sets it back in between). Returns the
    hooks' handles: ``handle.remove()`` undoes it."""
    def hold(module, inputs):
        module.training = False

    return [m.register_forward_pre_hook(hold) for m in model.modules() if isinstance(m, batch_dependent_types())]


def frozen_map(module: nn.Module) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """(weight, bias, mean, var) with which y = w·(x − mean)/√(var + ε) + b is ``module``'s eval map (mean
    None: MABN's, nothing centered); a FrozenBatchNorm2d built from them computes the same."""
    stats = population(module)
    if not stats:
        raise ValueError(f"{type(module).__name__} keeps no population statistic: it has no frozen eval map")
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    var = stats.get("var", stats.get("second_moment"))
    return (torch.ones_like(var) if weight is None else weight, torch.zeros_like(var) if bias is None else bias,
            stats.get("mean"), var)


__all__ = ["STATISTICS", "NormLayer", "batch_statistics", "carries_activation", "centered_batch_forward",
           "convert_population", "eval_affine", "freeze_statistics", "frozen_map", "layer", "pair_conv", "population",
           "population_from_moments", "reports_used_statistics", "restart", "running_affine",
           "second_moment_batch_forward", "set_population", "statistic"]
