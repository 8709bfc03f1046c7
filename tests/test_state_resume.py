"""A layer restored from a state dict mid-warm-up or mid-renorm continues exactly like the original."""

import copy
import functools

import pytest
import torch

from mabn.norms import BatchNorm2d, BatchRenorm2d, MABN2d

MAKERS = {
    "bn": functools.partial(BatchNorm2d, group_size=2),
    "brn": functools.partial(BatchRenorm2d, group_size=2, warmup_iters=6, r_max_iters=30, d_max_iters=20),
    "mabn": functools.partial(MABN2d, group_size=2, window=4, warmup_iters=6, renorm_iters=16),
}


def _steps(layer, inputs):
    out = []
    for x, dy in inputs:
        x = x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        y.backward(dy)
        out.append((y.detach(), x.grad, layer.weight.grad.clone()))
    return out


@pytest.mark.parametrize("name", sorted(MAKERS))
@pytest.mark.parametrize("stop_after", [1, 9])  # calls of 2 groups: mid-warm-up (t=2) and mid-renorm (t=18)
def test_resume_continues_exactly(name, stop_after):
    gen = torch.Generator().manual_seed(7)
    inputs = [(torch.randn(4, 3, 2, 2, generator=gen) * (1 + i % 3), torch.randn(4, 3, 2, 2, generator=gen))
              for i in range(stop_after + 6)]
    original = MAKERS[name](3)
    _steps(original, inputs[:stop_after])
    saved = copy.deepcopy(original.state_dict())
    restored = MAKERS[name](3)
    restored.load_state_dict(saved)
    expected, got = _steps(original, inputs[stop_after:]), _steps(restored, inputs[stop_after:])
    for (y1, dx1, dw1), (y2, dx2, dw2) in zip(expected, got, strict=True):
        assert torch.equal(y1, y2) and torch.equal(dx1, dx2) and torch.equal(dw1, dw2)
    for key, value in original.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
