"""MABN2d against an explicit float64 re-statement of the paper's sequential equations."""

import itertools

import pytest
import torch

from mabn.norms import MABN2d

from .reference import RefMABN, isclose_report


def _run_against_reference(steps, window, warmup, renorm, channels=3, batch=2, hw=(3, 2), shift_at=None,
                           switches=None):
    switches = dict(switches or {})  # MABN2d's ablation switches (RefMABN calls renorm "renorm_on")
    layer = MABN2d(channels, window=window, warmup_iters=warmup, renorm_iters=renorm, **switches).double().train()
    renorm_on = switches.pop("renorm", True)
    ref = RefMABN(channels, window, warmup, renorm, renorm_on=renorm_on, **switches)
    averages = ("ring_x2", "ring_gz") if switches.get("average", "sma") == "sma" else ("ema_x2", "ema_gz")
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
        for name in averages:
            isclose_report(getattr(layer, name), getattr(ref, name), f"{name} at {where}")
        assert sorted(layer.state_dict()) == sorted(["weight", "bias", "running_var", "num_batches_tracked",
                                                     *averages])
        assert int(layer.num_batches_tracked) == ref.t
        if step > max(renorm, warmup):
            clipped += int(((ref.ratio > 5) | (ref.ratio < 0.2)).any())
    return clipped


def test_paper_defaults_1300_steps():
    """window 16, warm-up 100, renorm from step 1000: all three phases, r clipped at times."""
    clipped = _run_against_reference(1300, window=16, warmup=100, renorm=1000, shift_at=1100)
    assert clipped > 0, "the test data should drive r into its clipping range"


SWITCHES = list(itertools.product(("sma", "batch"), ("sma", "batch"), ("sma", "ema"), (True, False)))


@pytest.mark.parametrize("forward_stat, backward_stat, average, renorm", SWITCHES,
                         ids=["-".join(map(str, c)) for c in SWITCHES])
def test_ablation_switches_1000_steps(forward_stat, backward_stat, average, renorm):
    """Each combination of the switches, 1000 steps: plain warm-up to 50, the averages from 9, r from 600
    (clipped at times, where it is on): outputs, gradients and every buffer against the re-statement."""
    clipped = _run_against_reference(1000, window=8, warmup=50, renorm=600, shift_at=700,
                                     switches={"forward_stat": forward_stat, "backward_stat": backward_stat,
                                               "average": average, "renorm": renorm})
    assert clipped > 0, "the test data should drive r into its clipping range"


def test_switch_defaults_and_state_dict():
    """The defaults are the official layer, with its state dict; EMA state only where the EMA is used."""
    default = MABN2d(4)
    assert default.uses_default_statistics and "forward_stat" not in repr(default)
    assert list(default.state_dict()) == ["weight", "bias", "running_var", "ring_x2", "ring_gz",
                                          "num_batches_tracked"]
    ema = MABN2d(4, average="ema", renorm=False)
    assert not ema.uses_default_statistics and "average='ema', renorm=False" in repr(ema)
    assert list(ema.state_dict()) == ["weight", "bias", "running_var", "ema_x2", "ema_gz", "num_batches_tracked"]
    for key in ("forward_stat", "backward_stat"):
        assert not MABN2d(4, **{key: "batch"}).uses_default_statistics
    with pytest.raises(ValueError, match="forward_stat must be one of sma, batch, got 'ema'"):
        MABN2d(4, forward_stat="ema")
    with pytest.raises(ValueError, match="average must be one of sma, ema, got 'batch'"):
        MABN2d(4, average="batch")
    with pytest.raises(ValueError, match="renorm must be true or false"):
        MABN2d(4, renorm=1)


def test_registry_switches_validated_and_passed():
    from mabn.norms import build_norm

    layer = build_norm({"name": "mabn", "backward_stat": "batch", "average": "ema", "renorm": False}).ctor(4)
    assert (layer.forward_stat, layer.backward_stat, layer.average, layer.renorm) == ("sma", "batch", "ema", False)
    with pytest.raises(ValueError, match="norm.backward_stat must be one of sma, batch, got 'mean'"):
        build_norm({"name": "mabn", "backward_stat": "mean"})
    with pytest.raises(ValueError, match="norm.renorm must be true or false, got 'no'"):
        build_norm({"name": "mabn", "renorm": "no"})


def test_ema_reset_reseeds():
    """reset_averages with the counter at 0 (fine-tuning's restart): the EMA is seeded again by batch 1."""
    layer = MABN2d(2, window=3, average="ema").double()
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    layer(x).sum().backward()
    first = layer.ema_x2.clone()
    layer(2 * x).sum().backward()
    layer.reset_averages()
    layer.num_batches_tracked.zero_()
    layer(x).sum().backward()
    isclose_report(layer.ema_x2, first, "ema_x2 after the restart")


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
        chi2 = (x2 * x2).mean(dim=(0, 2, 3), keepdim=True)
        y2 = w.view(1, -1, 1, 1) * x2 / torch.sqrt(chi2 + 1e-5) + b.view(1, -1, 1, 1)
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
    scale = layer.weight.view(1, -1, 1, 1) / torch.sqrt(layer.running_var.view(1, -1, 1, 1) + 1e-5)
    expected = scale * x + layer.bias.view(1, -1, 1, 1)
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
