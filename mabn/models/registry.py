"""Model registry: name -> builder(norm_ctor, num_classes, in_channels, **options); ``build_model`` applies a norm
recipe whole (its constructor and the conv parametrization it pairs with, e.g. MABN's weight centering). A
builder registered with ``wants_recipe`` (``timm``: a model built with its own BatchNorms, then converted)
gets the recipe itself instead of its constructor."""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn

from mabn.norms import NormRecipe, build_norm, convert_norms

from .activations import apply_norm_activations
from .cifar_resnet import CifarResNet
from .variants import apply_xbnblock, keep_norms_until

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_WANTS_RECIPE: set[str] = set()


def register_model(name: str, *, wants_recipe: bool = False):
    """Decorator registering a model builder under ``name``; ``wants_recipe``: it takes the NormRecipe (to
    convert a model it did not build with the constructor) instead of the constructor."""

    def deco(fn):
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = fn
        if wants_recipe:
            _WANTS_RECIPE.add(name)
        return fn

    return deco


def registered_models() -> tuple[str, ...]:
    """Every registered model name, sorted."""
    return tuple(sorted(_MODELS))


def build_model(name: str, norm: NormRecipe | str | dict, *, num_classes: int, in_channels: int = 3,
                norm_until: str = "all", **options) -> nn.Module:
    """Build a registered model whose every norm layer is the recipe's (XBNBlock models: all but their
    batch-free positions), with the convs feeding those norms parametrized as the recipe asks (weight
    centering for MABN); ``norm_until`` (stem, stage1) removes the norms after that point. ``norm`` is a
    recipe from ``build_norm`` or a norm config / name built with the registry's defaults. A norm that
    carries its activation (EvoNorm-S0, FRN + TLU) gets no ReLU after it (``apply_norm_activations``)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(registered_models())}")
    recipe = norm if isinstance(norm, NormRecipe) else build_norm(norm)
    norm_arg = recipe if name in _WANTS_RECIPE else recipe.ctor
    model = _MODELS[name](norm_arg, num_classes=num_classes, in_channels=in_channels, **options)
    keep_norms_until(model, norm_until)
    apply_norm_activations(model)
    return recipe.prepare(model)


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


@register_model("cifar_resnet8")
def _cifar_resnet8(norm_ctor, *, depth=8, **options):
    """ResNet-8 (one basic block per stage): the CPU-budget model of experiment=fmnist_cpu."""
    if depth != 8:
        raise ValueError(f"model cifar_resnet8 has depth 8, got model.depth={depth}; use model=cifar_resnet20 "
                         f"with model.depth={depth} for other depths")
    return _cifar_resnet(norm_ctor, depth=8, **options)


def _xbnblock(base: str):
    """``base`` with XBNBlock's batch-free norm: GroupNorm of 64 groups (capped at the channels), as the
    official code; ``xbn_positions`` chooses other positions for the ablations."""

    def build(norm_ctor, *, num_classes, in_channels, xbn_positions=None, xbn_groups=64, **options):
        model = _MODELS[base](norm_ctor, num_classes=num_classes, in_channels=in_channels, **options)
        apply_xbnblock(model, build_norm({"name": "gn", "num_groups": xbn_groups}).ctor, xbn_positions)
        return model

    return build


for _base in ("resnet50", "resnet18", "cifar_resnet20"):
    register_model(f"{_base}_xbn")(_xbnblock(_base))


@register_model("timm", wants_recipe=True)
def _timm_model(recipe: NormRecipe, *, num_classes, in_channels, arch, drop_rate=0.0, drop_path_rate=None):
    """Any timm model, without pretrained weights, its BatchNorm-family layers (BatchNormAct2d: with their
    activation) converted to the recipe's norm by ``convert_norms``; timm is imported only here."""
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels,
                              drop_rate=drop_rate, drop_path_rate=drop_path_rate)
    convert_norms(model, recipe)
    return model
