"""PreciseBN as Wu & Johnson define it: population moments at an estimation batch B chosen apart from n.

float64 throughout: the recomputed statistic of every batch-dependent norm equals the exact moments of its
input over all N images, where that input is what the layers before it give when each normalizes an
estimation batch of B by that batch's own statistics; counters, rings and windows are left as they were.
"""

import pytest
import torch
from torch import nn

from mabn.norms import NormContext, build_norm, protocol
from mabn.precise_bn import estimation_batches, recompute_norm_stats

# every batch-dependent norm, with MABN's ablation switches (each keeps the same population statistic)
CASES = ["bn", "brn", "mabn", "cbn", "syncbn", {"name": "mabn", "forward_stat": "batch"},
         {"name": "mabn", "average": "ema"}, {"name": "mabn", "renorm": False, "backward_stat": "batch"}]


def _net(cfg, n=2, device_batch=8):
    ctx = NormContext(device_batch=device_batch) if cfg == "syncbn" else NormContext(norm_batch=n,
                                                                                      device_batch=device_batch)
    recipe = build_norm(cfg, ctx)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), recipe.ctor(4), nn.ReLU(), nn.Conv2d(4, 5, 1, bias=False),
                        recipe.ctor(5)).double()
    recipe.prepare(net)
    return net


def _batches(k=3, device_batch=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # per-image offsets: the variance between images is what averaging per-batch variances misses
    return [(torch.randn(device_batch, 3, 6, 6, generator=gen, dtype=torch.float64) * 2
             + torch.randn(device_batch, 1, 1, 1, generator=gen, dtype=torch.float64) * 6 + 1, None)
            for _ in range(k)]


def _train(net, steps=3):
    net.train()
    for x, _ in _batches(steps, seed=1):
        net(x).sum().backward()


def _moments(h):
    """The exact statistic of each kind over every sample and position: E[x], E[x²] − E[x]², E[x²]."""
    mean = h.mean(dim=(0, 2, 3))
    second = h.square().mean(dim=(0, 2, 3))
    return {"mean": mean, "var": second - mean * mean, "second_moment": second}


def _normalized(norm, h):
    """``norm`` applied to h by h's own statistics (centered, or the second moment for MABN)."""
    w, b = norm.weight.view(1, -1, 1, 1), norm.bias.view(1, -1, 1, 1)
    if protocol.statistic(norm) == "second_moment":
        return h / torch.sqrt(h.square().mean(dim=(0, 2, 3), keepdim=True) + norm.eps) * w + b
    var, mean = torch.var_mean(h, dim=(0, 2, 3), correction=0, keepdim=True)
    return (h - mean) / torch.sqrt(var + norm.eps) * w + b


def _expected(net, images, batch_size):
    """Population statistics of both norms, by hand: every B-chunk normalized by its own statistics."""
    with torch.no_grad():
        h1 = net[0](images)
        h2 = torch.cat([net[3](torch.relu(_normalized(net[1], part))) for part in h1.split(batch_size)])
    return [{k: v for k, v in _moments(h).items() if k in protocol.population(norm)}
            for h, norm in ((h1, net[1]), (h2, net[4]))]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: c if isinstance(c, str) else "-".join(map(str, c.values())))
def test_recomputed_statistics_are_the_population_moments_at_estimation_batch_b(cfg):
    net = _net(cfg)
    _train(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = _batches(3)  # 24 images; B = 4, N = 20: re-cut across loader batches, the last 4 left out
    used = recompute_norm_stats(net, batches, torch.device("cpu"), batch_size=4, max_images=20)
    assert used == 20
    images = torch.cat([x for x, _ in batches])[:20]
    for norm, expected in zip((net[1], net[4]), _expected(net, images, 4), strict=True):
        got = protocol.population(norm)
        assert set(got) == set(expected)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-12, atol=1e-12)
    population = {id(t) for norm in (net[1], net[4]) for t in protocol.population(norm).values()}
    for key, value in net.state_dict().items():  # all else as it was: weights, counters, rings, windows
        if id(net.state_dict(keep_vars=True)[key]) not in population:
            assert torch.equal(value, before[key]), key


def test_the_estimation_batch_is_independent_of_n_and_changes_only_what_follows_a_norm():
    """A first norm sees conv(x) whatever B is; the second sees what B-batch normalization made of it."""
    stats = {}
    for b in (2, 24):
        torch.manual_seed(0)  # the same weights both times
        net = _net("bn", n=2)
        _train(net)
        recompute_norm_stats(net, _batches(3), torch.device("cpu"), batch_size=b)
        stats[b] = [protocol.population(net[i])["var"].clone() for i in (1, 4)]
    torch.testing.assert_close(stats[2][0], stats[24][0], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(stats[2][1], stats[24][1], rtol=1e-3)


def test_variance_is_the_population_one_and_not_the_average_of_batch_variances():
    """The convention: the biased variance over all N·H·W values (Bessel's factor N·H·W/(N·H·W − 1) is not
    applied); and the per-image offsets make the average of per-batch variances far too small."""
    net = _net("bn", n=2)
    batches = _batches(3)
    recompute_norm_stats(net, batches, torch.device("cpu"), batch_size=2)
    with torch.no_grad():
        h = net[0](torch.cat([x for x, _ in batches]))
    got = protocol.population(net[1])["var"]
    biased = h.var(dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(got, biased, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, h.transpose(0, 1).reshape(4, -1).var(dim=1, correction=1), rtol=1e-4)
    per_pair = h.view(12, 2, 4, -1).var(dim=(1, 3), correction=1).mean(0)  # what averaging at B = n = 2 gives
    assert per_pair.sum() < 0.7 * got.sum(), (per_pair, got)


def test_estimation_batches_recut_and_cap():
    batches = [(torch.zeros(8, 1), None), (torch.zeros(8, 1), None), (torch.zeros(8, 1), None)]
    assert [b.shape[0] for b in estimation_batches(batches, 10, None)] == [10, 10]  # the last 4 dropped
    assert [b.shape[0] for b in estimation_batches(batches, 10, 15)] == [10]
    assert [b.shape[0] for b in estimation_batches(batches, None, 12)] == [8, 4]
    assert [b.shape[0] for b in estimation_batches(batches, 100, None)] == [24]  # fewer than B: one batch
    assert [b.shape[0] for b in estimation_batches(batches, 3, None)] == [3] * 8


def test_bad_estimation_batch_and_no_batch_dependent_layer():
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        recompute_norm_stats(_net("bn"), _batches(1), torch.device("cpu"), batch_size=0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), build_norm("gn").ctor(4))
    assert recompute_norm_stats(net, _batches(1), torch.device("cpu")) == 0


def test_batch_statistics_mode_changes_no_state_and_splits_a_last_smaller_group():
    net = _net("mabn", n=2)
    _train(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    layers = [net[1], net[4]]
    with torch.no_grad(), protocol.batch_statistics(layers, 2):
        y = net.eval()(x)
    with torch.no_grad():
        h = [net[0](part) for part in x.split(2)]
        expect = torch.cat([_normalized(net[4], net[3](torch.relu(_normalized(net[1], p)))) for p in h])
    torch.testing.assert_close(y, expect)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert "forward" not in net[1].__dict__  # the layers' own forward is back
