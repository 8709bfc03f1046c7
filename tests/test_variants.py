"""XBNBlock and "fewer norm layers": the norms sit exactly where stated, checked by walking the modules."""

import pytest
import torch
from torch import nn

from mabn.models import build_model
from mabn.norms import (
    BatchNorm2d,
    GroupNorm,
    MABN2d,
    NormContext,
    build_norm,
    norm_types,
)
from mabn.norms.centering import is_centered


def _norms(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, norm_types())}


def _expected_gn(name, model_name):
    """The official XBNBlock positions: the stem, and per block the norm after the bottleneck's 3x3 conv
    (bn2) or, in a basic block, after its first conv (bn1)."""
    block_norm = "bn2" if model_name.startswith("resnet50") else "bn1"
    return name == "bn1" or (name.count(".") >= 2 and name.endswith(f".{block_norm}") and "downsample" not in name)


@pytest.mark.parametrize("model_name", ["resnet50_xbn", "resnet18_xbn", "cifar_resnet20_xbn"])
def test_xbnblock_puts_groupnorm_at_the_official_positions(model_name):
    ctx = NormContext(norm_batch=2, device_batch=8)
    model = build_model(model_name, build_norm("bn", ctx), num_classes=10, in_channels=3)
    norms = _norms(model)
    gn = {n for n, m in norms.items() if isinstance(m, nn.GroupNorm)}
    assert gn == {n for n in norms if _expected_gn(n, model_name)} and "bn1" in gn
    for name in gn:
        channels = norms[name].num_channels
        assert norms[name].num_groups == min(64, channels)
    assert all(type(m) is BatchNorm2d and m.group_size == 2 for n, m in norms.items() if n not in gn)
    model.train()(torch.randn(8, 3, 32, 32)).sum().backward()


def test_xbnblock_ablation_positions_and_errors():
    model = build_model("resnet50_xbn", build_norm("bn"), num_classes=10, xbn_positions=["bn3", "downsample"])
    gn = {n for n, m in _norms(model).items() if isinstance(m, nn.GroupNorm)}
    assert gn and all(n.endswith((".bn3", ".downsample.1")) for n in gn)
    assert len([n for n in gn if n.endswith("downsample.1")]) == 4  # one shortcut per stage
    with pytest.raises(ValueError, match="unknown XBNBlock position.*valid: stem, bn1, bn2, bn3, downsample"):
        build_model("resnet18_xbn", build_norm("bn"), num_classes=10, xbn_positions=["conv"])
    with pytest.raises(ValueError, match="bn3 exists only in bottleneck"):
        build_model("resnet18_xbn", build_norm("bn"), num_classes=10, xbn_positions=["bn3"])


def test_xbnblock_with_mabn_centers_only_convs_feeding_mabn():
    model = build_model("cifar_resnet20_xbn", build_norm("mabn", NormContext(norm_batch=2, device_batch=4)),
                        num_classes=10, in_channels=1)
    assert not is_centered(model.conv1) and not is_centered(model.layers[0].conv1)  # feed GroupNorm
    assert is_centered(model.layers[0].conv2) and isinstance(model.layers[0].bn2, MABN2d)


@pytest.mark.parametrize(("model_name", "until", "kept"), [
    ("cifar_resnet20", "stem", {"bn1"}),
    ("cifar_resnet20", "stage1", {"bn1"} | {f"layers.{i}.{b}" for i in range(3) for b in ("bn1", "bn2")}),
    ("resnet18", "stage1", {"bn1"} | {f"layer1.{i}.{b}" for i in range(2) for b in ("bn1", "bn2")}),
])
def test_fewer_norms_keep_only_the_early_ones_and_start_as_identity(model_name, until, kept):
    model = build_model(model_name, build_norm("bn"), num_classes=10, in_channels=1, norm_until=until)
    assert set(_norms(model)) == kept
    x = torch.randn(4, 1, 32, 32)
    model.eval()
    blocks = model.layers if model_name.startswith("cifar") else model.layer4
    later = blocks[-1]
    h = torch.randn(2, later.conv1.in_channels, 8, 8).relu()
    torch.testing.assert_close(later(h), h)  # zero-initialised last conv: the block is the identity
    model.train()(x).sum().backward()
    with pytest.raises(ValueError, match="norm_until must be one of"):
        build_model(model_name, build_norm("bn"), num_classes=10, norm_until="stage9")


def test_groupnorm_of_xbn_is_the_registry_layer():
    model = build_model("resnet18_xbn", build_norm("gn"), num_classes=10)
    assert all(isinstance(m, GroupNorm) for m in _norms(model).values())


def test_bn_with_centered_filters_is_an_ablation_row_and_folds():
    """norm=bn norm.weight_centering=true: MABN's centered filters in the convs feeding BN (the same
    parametrization), a row of its own; the state dict is bn's and folding bakes the centering."""
    from mabn.fold import fold_norms
    from mabn.models import build_model
    from mabn.norms import CenteredConvBatchNorm2d, NormContext, build_norm, norm_variant
    from mabn.norms.centering import is_centered

    ctx = NormContext(norm_batch=2, device_batch=4)
    plain = build_model("cifar_resnet8", build_norm("bn", ctx), num_classes=10, in_channels=1)
    recipe = build_norm({"name": "bn", "weight_centering": True}, ctx)
    model = build_model("cifar_resnet8", recipe, num_classes=10, in_channels=1)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(map(is_centered, convs)) == 9 and not any(map(is_centered, (m for m in plain.modules()
                                                                           if isinstance(m, torch.nn.Conv2d))))
    assert all(type(m) is CenteredConvBatchNorm2d for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert norm_variant("bn", recipe.params) == "weight_centering=true"
    assert norm_variant("bn", build_norm("bn", ctx).params) == ""
    assert {k.replace(".parametrizations.weight.original", ".weight") for k in model.state_dict()} == \
        set(plain.state_dict())
    model.train()
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
        folded = fold_norms(model)
        assert (folded(x) - expected).abs().max() <= 1e-5 * expected.abs().max()
