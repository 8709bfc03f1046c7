"""BatchNorm with the grouped ("ghost batch") normalization batch, and frozen BatchNorm."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _fused
from ._centered import centered_norm
from ._common import (
    check_group_size,
    check_input,
    check_momentum,
    empty_forward,
    num_groups,
    sequential_ema,
    stat_dtype,
)
from ._table import register_norm
from ._weights import CenteredWeight, parametrize_weight
from .protocol import NormLayer, centered_batch_forward, frozen_map, running_affine
from .registry import NormContext, NormRecipe


class BatchNorm2d(NormLayer, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose statistics come from groups of ``group_size`` samples of the device batch.

    One call on G·n samples equals G consecutive calls on the slices of n samples (same outputs, gradients
    and final running statistics: the grouped contract). ``group_size=None`` is plain BatchNorm2d.
    State-dict keys are those of ``nn.BatchNorm2d``, so torchvision checkpoints load unchanged. ``impl`` picks
    the fused Triton path (affine layers with running statistics) or the PyTorch one, as in ``MABN2d``.
    """

    statistic = "mean_var"

    def __init__(self, num_features: int, *, group_size: int | None = None, eps: float = 1e-5,
                 momentum: float = 0.1, affine: bool = True, impl: str = "auto", device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=check_momentum(momentum), affine=affine, device=device,
                         dtype=dtype)
        self.impl = _fused.check_impl(impl)
        self.group_size = check_group_size(group_size)

    def eval_affine(self) -> tuple[Tensor, Tensor] | None:
        if self.running_var is None:
            return None
        return running_affine(self.running_mean, self.running_var, self.weight, self.bias, self.eps)

    def batch_statistics_forward(self, x: Tensor) -> Tensor:
        return centered_batch_forward(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, type(self).__name__)
        if x.shape[0] == 0:
            return empty_forward(x, self.weight, self.bias)
        if not self.training:
            return super().forward(x)
        groups, n = num_groups(x.shape[0], self.group_size)
        count = n * x[0, 0].numel()
        if count < 2:
            raise ValueError(
                f"BatchNorm needs more than 1 value per channel in a normalization batch, got group of "
                f"{n} sample(s) of spatial size {tuple(x.shape[2:])}"
            )
        if self._fused(x):
            return _fused.FusedCentered.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                             self.num_batches_tracked, groups, self.eps, self.momentum, None)
        if groups == 1:
            return super().forward(x)
        return self._grouped_forward(x, groups, n)

    def _fused(self, x: Tensor) -> bool:
        """Whether this training call takes the fused path (``impl``; affine with running statistics only)."""
        if not (self.affine and self.track_running_stats):
            if self.impl == "fused" and not torch.compiler.is_compiling():
                raise ValueError("BatchNorm2d(impl='fused') needs affine=True and track_running_stats=True")
            return False
        tensors = [self.weight, self.bias, self.running_mean, self.running_var]
        return _fused.use_fused(self.impl, x, tensors, type(self).__name__, module=self)

    def _grouped_forward(self, x: Tensor, groups: int, n: int) -> Tensor:
        # Each group of n consecutive samples is normalized by its own statistics in one call (closed-form
        # backward, see _centered.py); the running statistics take the G group updates in order.
        ones = None if self.affine else torch.ones(self.num_features, device=x.device, dtype=stat_dtype(x))
        weight = self.weight if self.affine else ones
        bias = self.bias if self.affine else torch.zeros_like(ones)
        y, mean, var = centered_norm(x, weight, bias, groups, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                count = n * x[0, 0].numel()
                dt = mean.dtype
                _, new_mean = sequential_ema(self.running_mean.to(dt), mean, self.momentum)
                _, new_var = sequential_ema(self.running_var.to(dt), var * (count / (count - 1)), self.momentum)
                self.running_mean.copy_(new_mean)
                self.running_var.copy_(new_var)
                self.num_batches_tracked.add_(groups)
        return y


class CenteredConvBatchNorm2d(BatchNorm2d):
    """BatchNorm2d whose feeding convs get MABN's weight centering (Yan et al. 2020, Sec. 4.3: every filter
    minus its mean): ``norm=bn norm.weight_centering=true``, the ablation that tells how much of MABN's edge
    over BN is the centering. Same state dict and folding as BatchNorm2d (the centering is baked first)."""

    def pair_conv(self, conv: nn.Module) -> bool:
        return parametrize_weight(conv, CenteredWeight())


class SyncBatchNorm(NormLayer, nn.SyncBatchNorm):
    """torch's SyncBatchNorm (the synchronised baseline); an unsynchronised empty batch leaves state untouched.

    Inside a process group an empty local batch still joins the collective (other ranks wait on it), so
    there it defers to torch.
    """

    statistic = "mean_var"

    def eval_affine(self) -> tuple[Tensor, Tensor] | None:
        return running_affine(self.running_mean, self.running_var, self.weight, self.bias, self.eps)

    def batch_statistics_forward(self, x: Tensor) -> Tensor:
        return centered_batch_forward(x, self.weight, self.bias, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        syncing = self.training and dist.is_available() and dist.is_initialized()
        if x.shape[0] == 0 and not syncing:
            return empty_forward(x, self.weight, self.bias)
        return super().forward(x)


class FrozenBatchNorm2d(NormLayer, nn.Module):
    """BatchNorm with fixed statistics and affine (buffers, not parameters): y = x·scale + shift.

    Loads ``nn.BatchNorm2d`` state dicts (``num_batches_tracked`` is ignored).
    """

    statistic = "mean_var"

    def __init__(self, num_features: int, eps: float = 1e-5, *, device=None, dtype=None):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def eval_affine(self) -> tuple[Tensor, Tensor]:
        """The per-channel affine map this layer applies (in every mode)."""
        return running_affine(self.running_mean, self.running_var, self.weight, self.bias, self.eps)

    def batch_statistics_forward(self, x: Tensor) -> Tensor:
        return self(x)  # frozen: no batch statistic

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, type(self).__name__)
        scale, shift = self.eval_affine()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.view(shape).to(x.dtype) + shift.view(shape).to(x.dtype)

    @classmethod
    def from_batchnorm(cls, norm: nn.Module) -> FrozenBatchNorm2d:
        """A frozen copy of any registered norm's current eval-mode map that keeps a population statistic
        (``protocol.frozen_map``; MABN2d, whose eval centers nothing, gets mean 0)."""
        weight, bias, mean, var = frozen_map(norm)
        frozen = cls(var.numel(), eps=norm.eps, device=var.device)
        with torch.no_grad():
            frozen.weight.copy_(weight)
            frozen.bias.copy_(bias)
            if mean is not None:
                frozen.running_mean.copy_(mean)
            frozen.running_var.copy_(var)
        return frozen


@register_norm("bn", types=(BatchNorm2d, nn.BatchNorm2d),
               defaults={"eps": 1e-5, "momentum": 0.1, "impl": "auto", "weight_centering": False},
               batch_dependent=True, foldable=True, switches=("weight_centering",))
def _build_bn(p: dict, ctx: NormContext) -> NormRecipe:
    # weight_centering: MABN's centered filters in the convs feeding BN (an ablation of MABN's parts)
    cls = CenteredConvBatchNorm2d if p["weight_centering"] else BatchNorm2d
    ctor = functools.partial(cls, group_size=ctx.group_size, eps=p["eps"], momentum=p["momentum"], impl=p["impl"])
    return NormRecipe("bn", ctor, pairs_convs=bool(p["weight_centering"]), params=p)


@register_norm("syncbn", types=(nn.SyncBatchNorm,), defaults={"eps": 1e-5, "momentum": 0.1},
               batch_dependent=True, foldable=True, groupable=False)
def _build_syncbn(p: dict, ctx: NormContext) -> NormRecipe:
    # SyncBN normalizes over the whole global batch (device batch x world size); it has no group_size.
    if ctx.world_size > 1 and ctx.device_type not in (None, "cuda"):
        raise ValueError(f"syncbn across {ctx.world_size} processes needs CUDA devices (torch's SyncBatchNorm "
                         f"does not synchronise {ctx.device_type} tensors); use bn on {ctx.device_type}")
    return NormRecipe("syncbn", functools.partial(SyncBatchNorm, eps=p["eps"], momentum=p["momentum"]), params=p)


@register_norm("frozenbn", types=(FrozenBatchNorm2d,), defaults={"eps": 1e-5}, batch_dependent=False,
               foldable=True)
def _build_frozenbn(p: dict, ctx: NormContext) -> NormRecipe:
    return NormRecipe("frozenbn", functools.partial(FrozenBatchNorm2d, eps=p["eps"]), params=p)
