"""Recomputed statistics: closed forms for bn (grouped) and mabn; counters and rings untouched."""

import torch
from torch import nn

from mabn.norms import NormContext, build_norm
from mabn.precise_bn import recompute_norm_stats


def _net(name, n=2, device_batch=8):
    ctor = build_norm(name, NormContext(norm_batch=n, device_batch=device_batch)).ctor
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), ctor(4), nn.ReLU(), nn.Conv2d(4, 5, 1), ctor(5)).double()


def _batches(k=3, device_batch=8):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(device_batch, 3, 6, 6, generator=gen, dtype=torch.float64) * 2 + 1, None) for _ in range(k)]


def test_bn_grouped_closed_form_and_state_kept():
    net = _net("bn")
    net.train()
    for x, _ in _batches(2):
        net(x)  # some training state first
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = _batches()
    used = recompute_norm_stats(net, batches, torch.device("cpu"))
    assert used == 3
    # layer 1 sees conv(x): its mean/unbiased var per group of 2, averaged over the 12 groups
    with torch.no_grad():
        h = torch.cat([net[0](x) for x, _ in batches]).view(12, 2, 4, -1)
        var, mean = torch.var_mean(h, dim=(1, 3), correction=1)
    torch.testing.assert_close(net[1].running_mean, mean.mean(0))
    torch.testing.assert_close(net[1].running_var, var.mean(0))
    assert torch.equal(net[1].num_batches_tracked, before["1.num_batches_tracked"])
    assert torch.equal(net[0].weight, before["0.weight"])


def test_mabn_second_moment_and_rings_kept():
    net = _net("mabn")
    net.train()
    for x, _ in _batches(2):
        net(x).sum().backward()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = _batches()
    recompute_norm_stats(net, batches, torch.device("cpu"))
    with torch.no_grad():
        h = torch.cat([net[0](x) for x, _ in batches]).view(12, 2, 4, -1)
    torch.testing.assert_close(net[1].running_var, h.square().mean(dim=(1, 3)).mean(0))
    for key in ("1.ring_x2", "1.ring_gz", "1.num_batches_tracked", "4.ring_x2", "4.num_batches_tracked"):
        assert torch.equal(net.state_dict()[key], before[key]), key
    assert not torch.equal(net[4].running_var, before["4.running_var"])


def test_no_batch_dependent_layers_is_a_no_op():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), build_norm("gn").ctor(4))
    assert recompute_norm_stats(net, _batches(1), torch.device("cpu")) == 0
