"""MABN2d against an explicit float64 re-statement of the paper's sequential equations."""

import pytest
import torch

from mabn.norms import MABN2d

from .reference import RefMABN, isclose_report


def _run_against_reference(steps, window, warmup, renorm, channels=3, batch=2, hw=(3, 2), shift_at=None):
    layer = MABN2d(channels, window=window, warmup_iters=warmup, renorm_iters=renorm).double().train()
    ref = RefMABN(channels, window, warmup, renorm)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(channels, generator=gen, dtype=torch.float64))
    gamma, beta = layer.weight.detach().clone(), layer.bias.detach().clone()
    clipped = 0
    for step in range(1, steps + 1):
        # a drifting scale, and a jump after `shift_at`, so that r moves and is clipped at r_max
        scale = 1.0 + 0.5 * torch.sin(torch.tensor(step / 37.0, dtype=torch.float64))
        if shift_at is not None and step >= shift_at:
            scale = scale * (40.0 if step % 50 < 10 else 0.02 if step % 50 < 20 else 1.0)
        x = (torch.randn(batch, channels, *hw, generator=gen, dtype=torch.float64) + 0.3) * scale
        dy = torch.randn(batch, channels, *hw, generator=gen, dtype=torch.float64)
        xr = x.clone().requires_grad_(True)
        layer.weight.grad = layer.bias.grad = None
        y = layer(xr)
        y.backward(dy)
        y_ref, dx_ref, dg_ref, db_ref = ref.step(x, gamma, beta, dy)
        where = f"step {step}"
        isclose_report(y, y_ref, f"y at {where}")
        isclose_report(xr.grad, dx_ref, f"dL/dx at {where}")
        isclose_report(layer.weight.grad, dg_ref, f"dL/dgamma at {where}")
        isclose_report(layer.bias.grad, db_ref, f"dL/dbeta at {where}")
        isclose_report(layer.running_var, ref.v, f"running_var at {where}")
        isclose_report(layer.ring_x2, ref.ring_x2, f"ring_x2 at {where}")
        isclose_report(layer.ring_gz, ref.ring_gz, f"ring_gz at {where}")
        assert int(layer.num_batches_tracked) == ref.t
        if step > max(renorm, warmup):
            r = torch.sqrt(ref.ring_x2.mean(0) + 1e-5) / torch.sqrt(ref.v + 1e-5)
            clipped += int(((r > 5) | (r < 0.2)).any())
    return clipped


def test_paper_defaults_1300_steps():
    """window 16, warm-up 100, renorm from step 1000: all three phases, r clipped at times."""
    clipped = _run_against_reference(1300, window=16, warmup=100, renorm=1000, shift_at=1100)
    assert clipped > 0, "the test data should drive r into its clipping range"


def test_small_window_short_warmup():
    _run_against_reference(60, window=4, warmup=3, renorm=10, shift_at=30)


def test_window_one_plain_equals_autograd():
    """window 1 and r = 1: the exact gradient of y = γ·x/√(mean(x²)+ε) + β."""
    layer = MABN2d(4, window=1, warmup_iters=0, renorm_iters=10**9).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    for _ in range(5):
        x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
        x2 = x.detach().clone().requires_grad_(True)
        dy = torch.randn_like(x)
        y = layer(x)
        y.backward(dy)
        gw, gb = layer.weight.grad.clone(), layer.bias.grad.clone()
        layer.weight.grad = layer.bias.grad = None
        w, b = layer.weight.detach().clone().requires_grad_(True), layer.bias.detach().clone().requires_grad_(True)
        y2 = w.view(1, -1, 1, 1) * x2 / torch.sqrt((x2 * x2).mean(dim=(0, 2, 3), keepdim=True) + 1e-5) + b.view(1, -1, 1, 1)
        y2.backward(dy)
        isclose_report(y, y2, "y")
        isclose_report(x.grad, x2.grad, "dx")
        isclose_report(gw, w.grad, "dgamma")
        isclose_report(gb, b.grad, "dbeta")


@pytest.mark.parametrize("group_size", [None, 2])
def test_gradcheck_plain_phase(group_size):
    """gradcheck of the custom autograd Function through the layer, in its plain-batch (warm-up) phase."""
    layer = MABN2d(3, window=8, warmup_iters=10**9, renorm_iters=10**9, group_size=group_size).double()
    x = torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-7)


def test_eval_formula_and_no_state_change():
    layer = MABN2d(3).double()
    layer.train()
    for _ in range(3):
        layer(torch.randn(4, 3, 2, 2, dtype=torch.float64)).sum().backward()
    layer.eval()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    expected = layer.weight.view(1, -1, 1, 1) * x / torch.sqrt(layer.running_var.view(1, -1, 1, 1) + 1e-5) + layer.bias.view(1, -1, 1, 1)
    isclose_report(layer(x), expected, "eval output")
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_bad_arguments_named():
    with pytest.raises(ValueError, match="window.*got 0"):
        MABN2d(4, window=0)
    with pytest.raises(ValueError, match="momentum.*0.98"):
        MABN2d(4, momentum=1.98)
    with pytest.raises(ValueError, match="r_max"):
        MABN2d(4, r_max=0.5)
    with pytest.raises(ValueError, match="group_size=3 must divide the batch size 4"):
        MABN2d(4, group_size=3)(torch.randn(4, 4, 2, 2))
