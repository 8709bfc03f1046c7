"""Every registered norm: construction through the registry, shapes, modes, state, edge cases, no host sync."""

import pytest
import torch
from torch import nn

from mabn.norms import (
    BatchNorm2d,
    BatchRenorm2d,
    FrozenBatchNorm2d,
    GroupNorm,
    MABN2d,
    NormContext,
    batch_dependent_types,
    build_norm,
    foldable_types,
    norm_types,
    registered_norms,
)

ALL = registered_norms()
CTX = NormContext(norm_batch=2, device_batch=8)


def _layer(name, channels=8):
    ctx = NormContext(device_batch=8) if name == "syncbn" else CTX
    return build_norm(name, ctx).ctor(channels)


def _snapshot(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def test_names():
    assert set(ALL) == {"bn", "gn", "brn", "mabn", "syncbn", "frozenbn",
                        "ln", "in", "gnws", "evonorm_s0", "frn", "cbn"}


@pytest.mark.parametrize("name", ALL)
def test_shapes_modes_types(name):
    layer = _layer(name)
    assert isinstance(layer, norm_types())
    assert isinstance(layer, batch_dependent_types()) == (name in {"bn", "brn", "mabn", "syncbn", "cbn"})
    assert isinstance(layer, foldable_types()) == (name in {"bn", "brn", "mabn", "syncbn", "frozenbn", "cbn"})
    x = torch.randn(8, 8, 5, 4)
    for train in (True, False):
        layer.train(train)
        y = layer(x)
        assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip(name):
    layer = _layer(name).train()
    for _ in range(3):
        layer((torch.randn(8, 8, 3, 3) * 2 + 1).requires_grad_(True)).sum().backward()
    other = _layer(name)
    other.load_state_dict(layer.state_dict())
    layer.eval(), other.eval()
    x = torch.randn(4, 8, 3, 3)
    assert torch.equal(layer(x), other(x))


@pytest.mark.parametrize("name", ALL)
def test_empty_batch_leaves_state(name):
    layer = _layer(name).train()
    layer(torch.randn(8, 8, 3, 3, requires_grad=True)).sum().backward()  # leave the initial state first
    before = _snapshot(layer)
    x = torch.randn(0, 8, 3, 3, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 8, 3, 3)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", ALL)
def test_zero_variance_channels_stay_finite(name):
    layer = _layer(name).train()
    for fill in (0.0, 3.0):
        x = torch.randn(8, 8, 3, 3)
        x[:, 0] = fill
        x.requires_grad_(True)
        y = layer(x)
        y.square().sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), f"fill={fill}"


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_low_precision(name, dtype):
    layer = _layer(name).train()
    x = torch.randn(8, 8, 4, 4).to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype and x.grad is None
    y.float().sum().backward()
    assert torch.isfinite(y.float()).all() and torch.isfinite(x.grad.float()).all()
    twin = _layer(name).train()  # same input in float32: statistics must be computed in float32
    twin(x.detach().float().requires_grad_(True)).sum().backward()
    for key, value in layer.state_dict().items():
        assert value.dtype in (torch.float32, torch.long), key
        torch.testing.assert_close(value, twin.state_dict()[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ALL)
def test_no_host_sync(name):
    """On the meta device any .item() or branch on a tensor value raises: forward and backward have none."""
    layer = _layer(name).to("meta").train()
    x = torch.randn(8, 8, 4, 4, device="meta", requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.device.type == "meta"


def test_meta_check_catches_a_sync():
    class Syncing(nn.Module):
        def forward(self, x):
            return x * 2 if x.mean() > 0 else x

    with pytest.raises(Exception, match="meta"):
        Syncing()(torch.randn(2, 2, device="meta"))


def test_unknown_name_lists_registered():
    listed = "bn, brn, cbn, evonorm_s0, frn, frozenbn, gn, gnws, in, ln, mabn, syncbn"
    with pytest.raises(ValueError, match=f"unknown norm 'mabnn'; registered norms: {listed}"):
        build_norm("mabnn")


def test_unknown_hyper_parameter_lists_valid():
    with pytest.raises(ValueError, match=r"unknown hyper-parameter\(s\) \['windw'\] for norm 'mabn'; valid: \["):
        build_norm({"name": "mabn", "windw": 4})


def test_bad_value_fails_at_build_time():
    with pytest.raises(ValueError, match="momentum"):
        build_norm({"name": "bn", "momentum": 1.5})
    with pytest.raises(ValueError, match="window"):
        build_norm({"name": "mabn", "window": 0})


def test_mabn_recipe_follows_paper_defaults():
    recipe = build_norm("mabn", NormContext(norm_batch=2, device_batch=32))
    layer = recipe.ctor(16)
    assert isinstance(layer, MABN2d) and recipe.pairs_convs and recipe.batch_dependent
    assert layer.window == 16 and layer.group_size == 2  # m = simulated batch 32 / n
    # iterations -> normalization batches (16 groups per step)
    assert layer.warmup_iters == 100 * 16 and layer.renorm_iters == 1000 * 16
    assert build_norm("mabn", NormContext(norm_batch=8, device_batch=32)).ctor(4).window == 4
    assert build_norm({"name": "mabn", "window": 3}, CTX).ctor(4).window == 3
    assert not build_norm({"name": "mabn", "weight_centering": False}).pairs_convs


def test_group_size_from_context():
    assert build_norm("bn", NormContext(norm_batch=32, device_batch=32)).ctor(4).group_size is None
    assert build_norm("bn", NormContext(norm_batch=4, device_batch=32)).ctor(4).group_size == 4
    assert isinstance(build_norm("bn", CTX).ctor(4), BatchNorm2d)
    with pytest.raises(ValueError, match=r"normalization batch 3 does not divide the device batch 32; valid .*"
                                         r"\[1, 2, 4, 8, 16, 32\]"):
        NormContext(norm_batch=3, device_batch=32)
    with pytest.raises(ValueError, match="syncbn normalizes over the global batch"):
        build_norm("syncbn", CTX)


def test_brn_schedule_scaling():
    layer = build_norm({"name": "brn", "schedule_ref_iters": 100_000}, NormContext(total_iters=10_000)).ctor(4)
    assert isinstance(layer, BatchRenorm2d)
    assert (layer.warmup_iters, layer.r_max_iters, layer.d_max_iters) == (500, 4000, 2500)
    grouped = build_norm("brn", NormContext(norm_batch=2, device_batch=8)).ctor(4)
    assert grouped.warmup_iters == 5000 * 4


def test_frozenbn_loads_batchnorm_checkpoints():
    bn = nn.BatchNorm2d(4)
    bn.train()
    bn(torch.randn(6, 4, 3, 3) + 1)
    frozen = build_norm("frozenbn").ctor(4)
    frozen.load_state_dict(bn.state_dict())
    bn.eval()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(frozen(x), bn(x))
    torch.testing.assert_close(FrozenBatchNorm2d.from_batchnorm(bn)(x), bn(x))
    assert not list(frozen.parameters())


def test_gn_caps_groups():
    assert build_norm("gn").ctor(16).num_groups == 16
    assert build_norm({"name": "gn", "num_groups": 4}).ctor(16).num_groups == 4
    with pytest.raises(ValueError, match="num_groups=3 must divide num_channels=64"):
        build_norm({"name": "gn", "num_groups": 3})  # fails when the config is built, not mid-model
    with pytest.raises(ValueError, match="num_groups=3 must divide num_channels=16"):
        GroupNorm(16, num_groups=3)


@pytest.mark.parametrize("name", ALL)
def test_restart_makes_every_norm_a_fresh_layer_with_its_population_kept(name):
    """protocol.restart (what fine-tuning from an ImageNet backbone does, d2/checkpoint.restart_norm_state):
    counters, rings and windows as a fresh layer's, population statistics and affine kept; afterwards the layer
    trains as a fresh one whose population statistics were loaded. Every registered norm: a batch-free or frozen
    one has nothing to restart and stays as it is."""
    from mabn.norms import protocol

    torch.manual_seed(0)
    ctx = NormContext(device_batch=8) if name == "syncbn" else CTX
    recipe = build_norm(name, ctx)

    def model():
        torch.manual_seed(1)
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), recipe.ctor(8))
        return recipe.prepare(net).double().train()  # cbn pairs with its conv, mabn centres it

    trained, fresh = model(), model()
    for _ in range(5):
        trained(torch.randn(8, 3, 6, 6, dtype=torch.float64)).sum().backward()
    norm = trained[1]
    before = _snapshot(norm)
    population = {id(t) for t in protocol.population(norm).values()}
    kept = {k for k, t in norm.named_buffers() if id(t) in population}
    protocol.restart(norm)
    after = norm.state_dict()
    restarted = set(after) - kept - {k for k, _ in norm.named_parameters()}
    if name in recipe_free_names():
        assert all(torch.equal(after[k], before[k]) for k in after), name
    for key in kept | {k for k, _ in norm.named_parameters()}:
        assert torch.equal(after[key], before[key]), f"{name}.{key}: kept on restart"
    fresh_state = fresh[1].state_dict()
    for key in restarted:
        assert torch.equal(after[key], fresh_state[key].to(after[key].dtype)), f"{name}.{key}: as a fresh layer's"
    # the same next steps as a fresh layer given these weights and population statistics
    fresh.load_state_dict(trained.state_dict())
    for layer in (fresh[1], trained[1]):
        protocol.restart(layer)
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(trained(x), fresh(x), rtol=0, atol=0)
    if name in ("mabn", "brn", "cbn", "bn"):
        assert int(norm.num_batches_tracked) == 2 * 8 // 2, name  # counted from 0 again, per normalization batch


def recipe_free_names():
    """The registered norms with no batch history to restart."""
    return {n for n in ALL if not build_norm(n, NormContext(device_batch=8) if n == "syncbn" else CTX).batch_dependent}
