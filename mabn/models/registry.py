"""Model registry: name -> builder(norm_ctor, num_classes, in_channels, **options)."""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn

from .cifar_resnet import CifarResNet

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator registering a model builder under ``name``."""

    def deco(fn):
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = fn
        return fn

    return deco


def registered_models() -> tuple[str, ...]:
    """Every registered model name, sorted."""
    return tuple(sorted(_MODELS))


def build_model(name: str, norm_ctor: Callable[[int], nn.Module], *, num_classes: int, in_channels: int = 3,
                **options) -> nn.Module:
    """Build a registered model whose every norm layer is ``norm_ctor(channels)``."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(registered_models())}")
    return _MODELS[name](norm_ctor, num_classes=num_classes, in_channels=in_channels, **options)


def _torchvision_resnet(arch: str):
    def build(norm_ctor, *, num_classes, in_channels, zero_init_residual=False):
        model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes, norm_layer=norm_ctor,
                                                  zero_init_residual=zero_init_residual)
        if in_channels != 3:  # e.g. grey images: same stem, other input width
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        return model

    return build


register_model("resnet50")(_torchvision_resnet("resnet50"))
register_model("resnet18")(_torchvision_resnet("resnet18"))


@register_model("cifar_resnet20")
def _cifar_resnet(norm_ctor, *, num_classes, in_channels, depth=20, width=16, zero_init_residual=False):
    return CifarResNet(norm_ctor, depth=depth, width=width, num_classes=num_classes, in_channels=in_channels,
                       zero_init_residual=zero_init_residual)
