"""Norms that carry their activation (EvoNorm-S0, FRN + TLU) in Mask R-CNN: one activation per position.

detectron2's BasicStem, BasicBlock and BottleneckBlock call ``F.relu_`` after a norm, and the heads' convs
(``Conv2d(norm=..., activation=nn.ReLU())``) apply a ReLU after theirs: with such a norm that is a second
activation. These subclasses of the stock classes leave the ReLU out after a norm that applies its own, and
build the norm without its activation where detectron2 applies none (a residual branch's last norm, the
projection shortcut's norm, the FPN's lateral and output convs); the ReLU after the residual add stays.
This is what ``mabn.models.activations`` does to torchvision's ResNets, so an ImageNet backbone of such a
norm keeps its function (and its parameter names) in Mask R-CNN. Other norms see detectron2's forward.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch.nn.functional as F
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock
from detectron2.modeling.roi_heads import FastRCNNConvFCHead, MaskRCNNConvUpsampleHead
from torch import Tensor, nn

from mabn.models import carries_activation


def _relu_unless_carried(x: Tensor, norm: nn.Module | None) -> Tensor:
    return x if carries_activation(norm) else F.relu_(x)


def _plain(norm: nn.Module | None) -> nn.Module | None:
    """``norm`` without its activation (itself when it applies none)."""
    return norm.without_activation() if carries_activation(norm) else norm


def _built_plain(ctor, channels: int) -> nn.Module | None:
    return _plain(ctor(channels))


def without_activation(norm: Any) -> Any:
    """A detectron2 ``norm`` value for positions without activation: a constructor builds its norms without
    their activation; detectron2's names (``"BN"``, ``""``) pass unchanged."""
    return partial(_built_plain, norm) if callable(norm) else norm


def _plain_at(*convs) -> None:
    for conv in convs:
        if conv is not None:
            conv.norm = _plain(conv.norm)


class NormActStem(BasicStem):
    """detectron2's BasicStem; no ReLU after a norm that carries its activation."""

    def forward(self, x: Tensor) -> Tensor:
        x = _relu_unless_carried(self.conv1(x), self.conv1.norm)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class NormActBasicBlock(BasicBlock):
    """detectron2's BasicBlock; an activation after ``conv1``'s norm only (none after conv2's, shortcut's)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _plain_at(self.conv2, self.shortcut)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(_relu_unless_carried(self.conv1(x), self.conv1.norm))
        out += x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out)


class NormActBottleneckBlock(BottleneckBlock):
    """detectron2's BottleneckBlock; one activation after ``conv1``'s and ``conv2``'s norms, none in
    ``conv3``'s (before the residual add) and the shortcut's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _plain_at(self.conv3, self.shortcut)

    def forward(self, x: Tensor) -> Tensor:
        out = _relu_unless_carried(self.conv1(x), self.conv1.norm)
        out = self.conv3(_relu_unless_carried(self.conv2(out), self.conv2.norm))
        out += x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out)


def block_class(depth: int) -> type:
    """The residual block ``ResNet.make_default_stages`` would pick for ``depth``, as its subclass here."""
    return NormActBasicBlock if depth < 50 else NormActBottleneckBlock


def _drop_head_relus(head: nn.Module) -> None:
    # detectron2's Conv2d applies ``activation`` after ``norm`` only when it is set
    for conv in head.conv_norm_relus:
        if carries_activation(conv.norm):
            conv.activation = None


class NormActConvFCHead(FastRCNNConvFCHead):
    """detectron2's conv-fc box head; no ReLU after a conv's norm that carries its activation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _drop_head_relus(self)


class NormActMaskHead(MaskRCNNConvUpsampleHead):
    """detectron2's conv-upsample mask head; no ReLU after a conv's norm that carries its activation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _drop_head_relus(self)
