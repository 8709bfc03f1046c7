"""Norms that carry their activation (EvoNorm-S0, FRN + TLU) in ResNets: no second ReLU after them.

Such a norm replaces a norm + ReLU pair (Liu et al. 2020; Singh & Krishnan 2020). In a built ResNet the ReLU
right after it becomes Identity, and a norm position with no ReLU after it (a residual branch's last norm, a
projection shortcut's norm) gets the norm's variant without activation; the ReLU after the residual add stays.
torchvision's blocks reuse one ``self.relu`` for every position, so a block with such a norm gets a forward
with one activation module per position (``act1``, ``act2``) beside the post-add ``relu``; its state dict is
unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock as TVBasicBlock
from torchvision.models.resnet import Bottleneck

from .cifar_resnet import BasicBlock as CifarBasicBlock


def carries_activation(norm: nn.Module) -> bool:
    """Whether ``norm`` applies its own activation (its class declares it and this instance applies it)."""
    return bool(getattr(type(norm), "carries_activation", False)) and bool(getattr(norm, "apply_act", False))


def _basic_forward(self, x: Tensor) -> Tensor:
    out = self.act1(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class NormActBasicBlock(TVBasicBlock):
    """torchvision's BasicBlock with its own activation after ``bn1`` (ReLU, or Identity after such a norm)."""

    forward = _basic_forward


class NormActCifarBlock(CifarBasicBlock):
    """The CIFAR ResNet's BasicBlock with its own activation after ``bn1``."""

    forward = _basic_forward


class NormActBottleneck(Bottleneck):
    """torchvision's Bottleneck with its own activations after ``bn1`` and ``bn2``."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


_NORM_ACT = {Bottleneck: NormActBottleneck, TVBasicBlock: NormActBasicBlock,
             CifarBasicBlock: NormActCifarBlock}
_ACT_POSITIONS = {NormActBottleneck: ("bn1", "bn2"), NormActBasicBlock: ("bn1",), NormActCifarBlock: ("bn1",)}


def _activation_after(norm: nn.Module) -> nn.Module:
    return nn.Identity() if carries_activation(norm) else nn.ReLU(inplace=True)


def _drop_activation(parent: nn.Module, attr: str | int) -> bool:
    norm = parent[attr] if isinstance(attr, int) else getattr(parent, attr)
    if not carries_activation(norm):
        return False
    if isinstance(attr, int):
        parent[attr] = norm.without_activation()
    else:
        setattr(parent, attr, norm.without_activation())
    return True


def apply_norm_activations(model: nn.Module) -> list[str]:
    """Give every norm that carries its activation exactly one activation per position (in place).

    Acts on torchvision ResNets and the CIFAR ResNet (stem ``bn1`` + ``relu``, basic and bottleneck blocks).
    Idempotent; a model without such norms is left unchanged. Returns what changed, by module name.
    """
    names = {m: n for n, m in model.named_modules()}
    changed = []
    stem = getattr(model, "bn1", None)
    if stem is not None and isinstance(getattr(model, "relu", None), nn.ReLU) and carries_activation(stem):
        model.relu = nn.Identity()  # the model-level ReLU is applied once, after the stem's norm
        changed.append("relu")
    blocks = [m for m in model.modules() if type(m) in _NORM_ACT or type(m) in _ACT_POSITIONS]
    for block in blocks:
        prefix = names[block]
        tail = "bn3" if isinstance(block, Bottleneck) else "bn2"
        if _drop_activation(block, tail):
            changed.append(f"{prefix}.{tail}")
        if block.downsample is not None and _drop_activation(block.downsample, 1):
            changed.append(f"{prefix}.downsample.1")
        positions = _ACT_POSITIONS[_NORM_ACT.get(type(block), type(block))]
        if type(block) in _NORM_ACT and not any(carries_activation(getattr(block, p)) for p in positions):
            continue  # a plain block keeps torchvision's forward
        block.__class__ = _NORM_ACT.get(type(block), type(block))
        for i, pos in enumerate(positions, start=1):
            setattr(block, f"act{i}", _activation_after(getattr(block, pos)))
            if carries_activation(getattr(block, pos)):
                changed.append(f"{prefix}.act{i}")
    return changed
