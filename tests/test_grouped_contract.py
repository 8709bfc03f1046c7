"""The grouped contract: one call on G·n samples == G consecutive forward/backward calls on n samples."""

import copy
import functools

import pytest
import torch

from mabn.norms import BatchNorm2d, BatchRenorm2d, MABN2d

from .reference import isclose_report

# Short schedules so that warm-up, the moving averages, renorm and the BRN ramps all switch inside the calls.
LAYERS = {
    "bn": functools.partial(BatchNorm2d, momentum=0.3),
    "brn": functools.partial(BatchRenorm2d, momentum=0.3, r_max=2.0, d_max=0.5, warmup_iters=3,
                             r_max_iters=20, d_max_iters=12),
    "mabn": functools.partial(MABN2d, window=4, warmup_iters=3, renorm_iters=6, momentum=0.2, r_max=1.5),
}
# MABN's ablation switches (every combination is pinned against the re-statement in test_mabn.py)
_MABN = LAYERS["mabn"]
LAYERS.update({
    "mabn-ema": functools.partial(_MABN, average="ema"),
    "mabn-backward-batch": functools.partial(_MABN, backward_stat="batch"),
    "mabn-both-batch-no-renorm": functools.partial(_MABN, forward_stat="batch", backward_stat="batch",
                                                   renorm=False),
    "mabn-ema-forward-batch": functools.partial(_MABN, average="ema", forward_stat="batch"),
})


def _init(layer, gen):
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=gen, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen, dtype=torch.float64))
    return layer


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("groups", [1, 3, 16])
def test_grouped_equals_sequential(name, n, groups):
    gen = torch.Generator().manual_seed(n * 100 + groups)
    channels, hw = 3, (3, 2)
    grouped = _init(LAYERS[name](channels, group_size=n).double(), gen)
    seq = copy.deepcopy(grouped)
    seq.group_size = None
    calls = 3  # several calls: state carried across calls must match too
    for call in range(calls):
        x = torch.randn(groups * n, channels, *hw, generator=gen, dtype=torch.float64) * (1 + call) + 0.2
        dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        xg = x.clone().requires_grad_(True)
        grouped.zero_grad(set_to_none=True)
        yg = grouped(xg)
        yg.backward(dy)
        ys, dxs = [], []
        seq.zero_grad(set_to_none=True)  # parameter gradients accumulate over the G calls (summed)
        for g in range(groups):
            xs = x[g * n:(g + 1) * n].clone().requires_grad_(True)
            y = seq(xs)
            y.backward(dy[g * n:(g + 1) * n])
            ys.append(y.detach())
            dxs.append(xs.grad)
        where = f"{name} n={n} G={groups} call {call}"
        isclose_report(yg, torch.cat(ys), f"output, {where}")
        isclose_report(xg.grad, torch.cat(dxs), f"input grad, {where}")
        isclose_report(grouped.weight.grad, seq.weight.grad, f"weight grad, {where}")
        isclose_report(grouped.bias.grad, seq.bias.grad, f"bias grad, {where}")
        for key, value in grouped.state_dict().items():
            other = seq.state_dict()[key]
            if value.dtype == torch.long:
                assert torch.equal(value, other), f"{key}, {where}"
            else:
                isclose_report(value, other, f"state {key}, {where}")
    assert int(grouped.num_batches_tracked) == calls * groups


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_group_size_must_divide(name):
    layer = LAYERS[name](3, group_size=4)
    with pytest.raises(ValueError, match="group_size=4 must divide the batch size 6"):
        layer(torch.randn(6, 3, 2, 2))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_bad_group_size_argument(name):
    with pytest.raises(ValueError, match="group_size must be None or a positive int, got 0"):
        LAYERS[name](3, group_size=0)
