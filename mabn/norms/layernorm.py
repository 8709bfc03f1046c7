"""Layer and Instance Normalization of conv features as GroupNorm(1) and GroupNorm(C) (Wu & He 2018, Sec. 3.1)."""

from __future__ import annotations

from torch import nn


class LayerNorm2d(nn.GroupNorm):
    """Layer Normalization (Ba et al. 2016) over each sample's C×H×W values, per-channel affine."""

    def __init__(self, num_channels: int, *, eps: float = 1e-5):
        super().__init__(1, num_channels, eps=eps)


class InstanceNorm2d(nn.GroupNorm):
    """Instance Normalization (Ulyanov et al. 2016) over each sample's channel's H×W values.

    Unlike ``nn.InstanceNorm2d`` it is affine and keeps no running statistics (batch-free in eval too).
    """

    def __init__(self, num_channels: int, *, eps: float = 1e-5):
        super().__init__(num_channels, num_channels, eps=eps)
