"""LN, IN, GN+WS, EvoNorm-S0, FRN+TLU: float64 against the papers' equations, pairing, activations, training."""

import copy

import pytest
import torch
from torch import nn

from mabn.fold import fold_norms
from mabn.models import build_model, carries_activation
from mabn.norms import (
    EvoNormS0,
    FilterResponseNorm2d,
    GroupNormWS,
    StandardizedWeight,
    bake_weight_centering,
    build_norm,
    center_conv_weights,
)

from .reference import ref_evonorm_s0, ref_frn_tlu, ref_group_norm, ref_weight_standardization

NEW = ["ln", "in", "gnws", "evonorm_s0", "frn", "cbn"]


def _randomize(layer, gen):
    """Non-trivial parameters, so a swapped γ/β/v/τ would show."""
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5 if p.dim() else p)
        if getattr(layer, "bias", None) is not None:
            layer.bias.normal_(generator=gen)
        if getattr(layer, "tau", None) is not None:
            layer.tau.normal_(generator=gen)
    return layer


def _check_against(layer, ref, x, params):
    """Output and gradients (x and every named parameter) of ``layer`` equal those of ``ref(x, *params)``."""
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = layer(x1)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y.backward(dy)
    leaves = [p.detach().clone().requires_grad_(True) for p in params.values()]
    y_ref = ref(x2, *leaves)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"forward: {m}")
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-11, msg=lambda m: f"dx: {m}")
    for (name, p), leaf in zip(params.items(), leaves, strict=True):
        torch.testing.assert_close(p.grad, leaf.grad, rtol=1e-9, atol=1e-11,
                                   msg=lambda m, n=name: f"d{n}: {m}")


def _x(shape=(3, 8, 5, 4)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 + 0.5


@pytest.mark.parametrize("name,groups", [("ln", 1), ("in", 8), ("gn", 4)])
def test_ln_in_are_group_norms(name, groups):
    cfg = {"name": name, "num_groups": 4} if name == "gn" else name
    layer = _randomize(build_norm(cfg).ctor(8).double(), torch.Generator().manual_seed(2))
    assert layer.num_groups == groups

    def ref(x, gamma, beta):
        return ref_group_norm(x, groups, gamma, beta, 1e-5)

    _check_against(layer, ref, _x(), {"weight": layer.weight, "bias": layer.bias})


def test_gnws_equals_standardized_conv_then_group_norm():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False).double()
    norm = _randomize(build_norm({"name": "gnws", "num_groups": 4, "ws_eps": 1e-3}).ctor(8).double(),
                      torch.Generator().manual_seed(3))
    net = nn.Sequential(conv, norm)
    assert center_conv_weights(net) == ["0"]
    raw = conv.parametrizations.weight.original

    def ref(x, w, gamma, beta):
        out = nn.functional.conv2d(x, ref_weight_standardization(w, 1e-3), padding=1)
        return ref_group_norm(out, 4, gamma, beta, 1e-5)

    _check_against(net, ref, _x((2, 3, 6, 5)), {"raw weight": raw, "weight": norm.weight, "bias": norm.bias})


def test_weight_standardization_statistics_and_gradcheck():
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64) * 3 + 1
    ws = StandardizedWeight(eps=0.0)(w)
    zeros = torch.zeros(6, dtype=torch.float64)
    torch.testing.assert_close(ws.mean(dim=(1, 2, 3)), zeros, atol=1e-12, rtol=0)
    torch.testing.assert_close(ws.flatten(1).std(dim=1), torch.ones(6, dtype=torch.float64))
    small = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(StandardizedWeight(1e-5), (small,))
    assert torch.isfinite(StandardizedWeight(1e-5)(torch.zeros(2, 3, 1, 1))).all()  # zero filters stay finite


@pytest.mark.parametrize("channels,groups", [(8, 4), (64, 32), (48, 24), (6, 6)])
def test_evonorm_s0_matches_paper(channels, groups):
    layer = _randomize(EvoNormS0(channels, num_groups=32 if channels != 8 else 4).double(),
                       torch.Generator().manual_seed(4))
    assert layer.num_groups == groups  # official rule: the largest divisor of C not above 32

    def ref(x, gamma, beta, v):
        return ref_evonorm_s0(x, groups, v, gamma, beta, 1e-5)

    params = {"weight": layer.weight, "bias": layer.bias, "v": layer.v}
    _check_against(layer, ref, _x((2, channels, 3, 4)), params)


def test_evonorm_s0_without_activation_is_affine():
    layer = _randomize(EvoNormS0(8).double(), torch.Generator().manual_seed(5))
    plain = layer.without_activation()
    assert not plain.apply_act and plain.v is None and "v" not in plain.state_dict()
    assert plain.weight.dtype == torch.float64 and torch.equal(plain.weight, layer.weight)
    x = _x()
    torch.testing.assert_close(plain(x), x * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1))


@pytest.mark.parametrize("tlu", [True, False])
@pytest.mark.parametrize("learnable_eps", [False, True])
def test_frn_tlu_matches_paper(tlu, learnable_eps):
    layer = FilterResponseNorm2d(8, eps=1e-3, learnable_eps=learnable_eps).double()
    layer = _randomize(layer, torch.Generator().manual_seed(6))
    if learnable_eps:
        with torch.no_grad():
            layer.eps.fill_(-0.3)  # used as |eps|
    if not tlu:
        layer = layer.without_activation()
    params = {"weight": layer.weight, "bias": layer.bias}
    params.update({"tau": layer.tau} if tlu else {})
    params.update({"eps": layer.eps} if learnable_eps else {})

    def ref(x, gamma, beta, *rest):
        tau = rest[0] if tlu else None
        eps = rest[-1] if learnable_eps else 1e-3
        return ref_frn_tlu(x, gamma, beta, tau, eps, tlu=tlu)

    _check_against(layer, ref, _x(), params)


def test_frn_on_1x1_maps_and_gradcheck():
    layer = FilterResponseNorm2d(4, eps=1e-2, learnable_eps=True).double()
    x = torch.randn(3, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    assert layer(torch.randn(3, 4, dtype=torch.float64)).shape == (3, 4)  # (N, C): ν² is x² itself


def _leaf_calls(model, x):
    """The leaf modules in the order a forward calls them (a module reused N times appears N times)."""
    calls, handles = [], []
    for m in model.modules():
        if not list(m.children()):
            handles.append(m.register_forward_hook(lambda mod, i, o: calls.append(mod)))
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return calls


def _positions(model):
    """(activation positions, positions without activation) of a ResNet: norm modules by block layout."""
    act, plain = [model.bn1], []
    for block in model.modules():
        if hasattr(block, "conv1") and hasattr(block, "downsample"):
            is_bottleneck = hasattr(block, "bn3")
            act += [block.bn1, block.bn2] if is_bottleneck else [block.bn1]
            plain.append(block.bn3 if is_bottleneck else block.bn2)
            if block.downsample is not None:
                plain.append(block.downsample[1])
    return act, plain


MODELS = [("resnet18", {}), ("resnet50", {}), ("cifar_resnet20", {}), ("resnet50_xbn", {}),
          ("cifar_resnet20", {"norm_until": "stem"})]


@pytest.mark.parametrize("norm", ["evonorm_s0", "frn", "bn"])
@pytest.mark.parametrize("model_name,opts", MODELS)
def test_one_activation_per_position(norm, model_name, opts):
    model = build_model(model_name, build_norm(norm), num_classes=3, in_channels=1, **opts)
    act, plain = _positions(model)
    assert not any(carries_activation(n) for n in plain)  # no TLU / swish where BN had no ReLU after it
    calls = _leaf_calls(model, torch.randn(2, 1, 32, 32))
    blocks = len(plain) - sum(1 for m in model.modules() if getattr(m, "downsample", None) is not None)
    relus = [m for m in calls if isinstance(m, nn.ReLU)]
    followed_by_relu = {id(a) for a, b in zip(calls, calls[1:], strict=False) if isinstance(b, nn.ReLU)}
    for n in act:
        # exactly one activation: the norm's own, or the ReLU right after a norm that has none
        assert carries_activation(n) != (id(n) in followed_by_relu), f"{type(n).__name__} at an act position"
    assert len(relus) == blocks + sum(not carries_activation(n) for n in act)  # + one post-add ReLU per block
    if norm == "bn":
        assert not any("NormAct" in type(m).__name__ for m in model.modules())
    else:
        assert any(carries_activation(n) for n in act)


def test_activation_positions_survive_a_state_dict_round_trip():
    a = build_model("resnet18", build_norm("frn"), num_classes=3)
    b = build_model("resnet18", build_norm("frn"), num_classes=3)
    b.load_state_dict(a.state_dict())  # same keys: act1/act2 hold no state, plain positions have no tau
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a.eval()(x), b.eval()(x))


def test_gnws_pairs_every_conv_bakes_and_folds_as_kept():
    recipe = build_norm("gnws")
    model = build_model("resnet18", recipe, num_classes=3)
    assert recipe.pairs_convs
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(center_conv_weights(model)) == len(convs) == 20
    for conv in convs:
        w = conv.weight.flatten(1)
        torch.testing.assert_close(w.mean(dim=1), torch.zeros(w.shape[0]), atol=1e-5, rtol=0)
        torch.testing.assert_close(w.std(dim=1), torch.ones(w.shape[0]), atol=1e-3, rtol=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x)
        baked = bake_weight_centering(copy.deepcopy(model))
        torch.testing.assert_close(baked(x), expected, rtol=1e-6, atol=1e-6)
        folded, report = fold_norms(model, return_report=True)
        torch.testing.assert_close(folded(x), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(x), expected)  # the original keeps its parametrizations
    assert not report.folded and len(report.kept) == 20
    assert all("GroupNormWS: not foldable" in why for _, why in report.kept)
    assert not any("parametrizations" in k for k in folded.state_dict())


@pytest.mark.parametrize("name", NEW)
def test_tiny_model_trains(name):
    torch.manual_seed(0)
    recipe = build_norm(name)
    model = build_model("cifar_resnet8", recipe, num_classes=4, in_channels=1, width=8)  # convs paired
    images = torch.randn(16, 1, 12, 12)
    labels = torch.arange(16) % 4
    images += labels.view(-1, 1, 1, 1).float() * 0.5  # a learnable class signal
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    losses = []
    model.train()
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)) and sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses


def test_gnws_layer_validates():
    with pytest.raises(ValueError, match="ws_eps"):
        build_norm({"name": "gnws", "ws_eps": -1.0})
    assert isinstance(build_norm("gnws").ctor(16), GroupNormWS)


@pytest.mark.parametrize("name", NEW)
def test_compiled_and_channels_last_equal_eager(name):
    """fullgraph torch.compile (aot_eager: no C++ toolchain needed) and channels_last inputs change nothing."""
    cfg = {"name": "frn", "learnable_eps": True} if name == "frn" else name
    layer = _randomize(build_norm(cfg).ctor(64).train(), torch.Generator().manual_seed(7))
    x = torch.randn(4, 64, 6, 6)
    dy = torch.randn_like(x)

    def run(fn, inp):
        layer.zero_grad()
        inp = inp.clone().requires_grad_(True)
        fn(inp).backward(dy)
        return [inp.grad] + [p.grad.clone() for p in layer.parameters()]

    eager = run(layer, x)
    compiled = run(torch.compile(layer, fullgraph=True, backend="aot_eager"), x)
    channels_last = run(layer, x.to(memory_format=torch.channels_last))
    for a, b, c in zip(eager, compiled, channels_last, strict=True):
        torch.testing.assert_close(b, a)
        torch.testing.assert_close(c, a)
