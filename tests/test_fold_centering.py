"""fold_norms (eval outputs unchanged, gn reported) and the weight-centered conv transform."""

import copy

import pytest
import torch
import torchvision
from torch import nn

from mabn.fold import fold_norms
from mabn.norms import MABN2d, NormContext, bake_weight_centering, build_norm, center_conv_weights

FOLDABLE = ["bn", "brn", "mabn", "frozenbn", "syncbn"]


def _trained_resnet(name):
    """A torchvision ResNet-18 built through the registry, a few training steps so statistics are not trivial."""
    ctx = NormContext(device_batch=4) if name == "syncbn" else NormContext(norm_batch=2, device_batch=4)
    recipe = build_norm(name, ctx)
    model = torchvision.models.resnet18(norm_layer=recipe.ctor, num_classes=10)
    if recipe.pairs_convs:
        center_conv_weights(model)
    if name == "frozenbn":  # give the frozen statistics something to fold
        for m in model.modules():
            if hasattr(m, "running_var") and not isinstance(m, nn.Linear):
                m.running_var.uniform_(0.5, 2.0), m.running_mean.normal_()
                m.weight.uniform_(0.5, 1.5), m.bias.normal_()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32) + 0.5), torch.randint(0, 10, (4,))).backward()
        opt.step()
    return model.eval()


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", FOLDABLE)
def test_fold_matches_eval_output(name):
    model = _trained_resnet(name)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        folded, report = fold_norms(model, return_report=True)
        got = folded(x)
    assert _rel_err(got, expected) <= 1e-5
    assert len(report.folded) == 20 and not report.kept
    assert not any(isinstance(m, (MABN2d, nn.BatchNorm2d)) for m in folded.modules())
    with torch.no_grad():  # the original is untouched and still runs (the deepcopy/parametrize trap)
        assert torch.equal(model(x), expected)


def test_gn_is_reported_not_dropped():
    model = _trained_resnet("gn")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        folded, report = fold_norms(model, return_report=True)
        assert torch.equal(folded(x), model(x))
    assert not report.folded and len(report.kept) == 20
    assert all("GroupNorm: not foldable" in why for _, why in report.kept)


def test_inplace_fold_bakes_centering():
    model = _trained_resnet("mabn")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        folded = fold_norms(model, inplace=True)
        assert folded is model
        assert _rel_err(model(x), expected) <= 1e-5


def test_centering_applies_to_convs_feeding_mabn_only():
    model = _trained_resnet("mabn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(center_conv_weights(model)) == len(convs) == 20  # idempotent: already centered
    for conv in convs:
        w = conv.weight
        torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.zeros(w.shape[0]), atol=1e-6, rtol=0)
        assert not torch.allclose(conv.parametrizations.weight.original.mean(dim=(1, 2, 3)), torch.zeros(w.shape[0]))
    assert any(k.endswith("parametrizations.weight.original") for k in model.state_dict())
    bn_model = torchvision.models.resnet18(norm_layer=build_norm("bn").ctor)
    assert center_conv_weights(bn_model) == []


def test_centered_conv_output_is_zero_mean():
    conv = nn.Conv2d(3, 8, 3, bias=False)
    seq = nn.Sequential(conv, MABN2d(8))
    center_conv_weights(seq)
    x = torch.randn(16, 3, 9, 9) + 2.0  # a large input mean: an uncentered conv output would carry it
    out = conv(x)
    assert out.mean(dim=(0, 2, 3)).abs().max() < 0.1 * out.std()


def test_bake_keeps_outputs_and_plain_weights():
    model = _trained_resnet("mabn")
    baked = bake_weight_centering(copy.deepcopy(model))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(baked(x), model(x), rtol=1e-6, atol=1e-6)
    assert not any("parametrizations" in k for k in baked.state_dict())
    for conv in (m for m in baked.modules() if isinstance(m, nn.Conv2d)):
        assert type(conv) is nn.Conv2d
