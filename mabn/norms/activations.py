"""Norms that carry their activation (EvoNorm-S0, FRN + TLU) in ResNets: no second ReLU after them.

Such a norm replaces a norm + ReLU pair (Liu et al. 2020; Singh & Krishnan 2020). In a ResNet the activation
right after it becomes Identity, and a norm position with no ReLU after it (a residual branch's last norm, a
projection shortcut's norm) gets the norm's variant without activation; the ReLU after the residual add stays.

A block says where its norms sit by two class attributes, ``act_positions`` (norms followed by the block's
``act1``, ``act2``, ... modules) and ``tail_norms`` (norms with no activation after them): the CIFAR ResNet's
block does natively; torchvision's blocks reuse one ``self.relu``, so a block with such a norm becomes the
subclass in ``_torchvision_blocks`` (looked up only when a model holds torchvision blocks: nothing of
torchvision is imported otherwise).
"""

from __future__ import annotations

import sys

from torch import nn

from .protocol import carries_activation

__all__ = ["apply_norm_activations", "carries_activation"]


def _activation_after(norm: nn.Module) -> nn.Module:
    return nn.Identity() if carries_activation(norm) else nn.ReLU(inplace=True)


def _drop_activation(block: nn.Module, path: str) -> bool:
    parent_name, _, attr = path.rpartition(".")
    try:
        parent = block.get_submodule(parent_name) if parent_name else block
        norm = parent[int(attr)] if attr.isdigit() else getattr(parent, attr)
    except (AttributeError, IndexError, TypeError):
        return False  # e.g. no downsample
    if not carries_activation(norm):
        return False
    if attr.isdigit():
        parent[int(attr)] = norm.without_activation()
    else:
        setattr(parent, attr, norm.without_activation())
    return True


def _torchvision_classes() -> dict[type, type]:
    if "torchvision.models.resnet" not in sys.modules:  # no model of it here
        return {}
    from ._torchvision_blocks import NORM_ACT

    return NORM_ACT


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
    torchvision = _torchvision_classes()
    for block in [m for m in model.modules() if type(m) in torchvision or hasattr(type(m), "act_positions")]:
        prefix = names[block]
        plain = type(block) in torchvision
        cls = torchvision.get(type(block), type(block))
        positions = cls.act_positions
        if plain and not any(carries_activation(getattr(block, p)) for p in positions) \
                and not any(_carries_at(block, p) for p in cls.tail_norms):
            continue  # a plain torchvision block keeps torchvision's forward
        changed += [f"{prefix}.{tail}" for tail in cls.tail_norms if _drop_activation(block, tail)]
        block.__class__ = cls
        for i, pos in enumerate(positions, start=1):
            act = _activation_after(getattr(block, pos))
            current = getattr(block, f"act{i}", None)
            if type(current) is not type(act):
                setattr(block, f"act{i}", act)
                if carries_activation(getattr(block, pos)):
                    changed.append(f"{prefix}.act{i}")
    return changed


def _carries_at(block: nn.Module, path: str) -> bool:
    try:
        return carries_activation(block.get_submodule(path))
    except AttributeError:
        return False
