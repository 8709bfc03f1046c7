"""BatchRenorm2d against Ioffe 2017's equations; BatchNorm2d against torch's BatchNorm2d."""

import pytest
import torch
from torch import nn

from mabn.norms import BatchNorm2d, BatchRenorm2d

from .reference import RefBRN, isclose_report


def _randomize_affine(*layers):
    w = torch.rand(layers[0].weight.shape, dtype=torch.float64) + 0.5
    b = torch.randn(layers[0].bias.shape, dtype=torch.float64)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(w)
            layer.bias.copy_(b)


def test_brn_against_reference_through_schedule():
    """Outputs, gradients and running statistics over warm-up, both ramps and after, with clipping."""
    kw = dict(r_max=2.0, d_max=0.5, warmup_iters=5, r_max_iters=30, d_max_iters=20)
    layer = BatchRenorm2d(3, momentum=0.1, **kw).double()
    ref = RefBRN(3, kw["r_max"], kw["d_max"], kw["warmup_iters"], kw["r_max_iters"], kw["d_max_iters"])
    _randomize_affine(layer)
    gamma = layer.weight.detach().clone().requires_grad_(True)
    beta = layer.bias.detach().clone().requires_grad_(True)
    for step in range(1, 41):
        scale = 3.0 if step % 7 == 0 else 1.0  # occasional outliers so that r and d are clipped
        x = torch.randn(4, 3, 3, 3, dtype=torch.float64) * scale + (step % 5) * 0.3
        dy = torch.randn_like(x)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        gamma.grad = beta.grad = None
        y1 = layer(x1)
        y1.backward(dy)
        y2 = ref.forward(x2, gamma, beta)
        y2.backward(dy)
        isclose_report(y1, y2, f"y step {step}")
        isclose_report(x1.grad, x2.grad, f"dx step {step}")
        isclose_report(layer.weight.grad, gamma.grad, f"dgamma step {step}")
        isclose_report(layer.bias.grad, beta.grad, f"dbeta step {step}")
        isclose_report(layer.running_mean, ref.mu, f"running_mean step {step}")
        isclose_report(layer.running_var, ref.var, f"running_var step {step}")


def test_brn_schedule_values():
    layer = BatchRenorm2d(2, r_max=3.0, d_max=5.0, warmup_iters=5000, r_max_iters=40000, d_max_iters=25000)
    r, d = layer.clip_limits(torch.tensor([1, 5000, 22500, 15000, 40000, 10**6]))
    torch.testing.assert_close(r, torch.tensor([1.0, 1.0, 2.0, 1 + 2 * 10000 / 35000, 3.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(d, torch.tensor([0.0, 0.0, 5.0 * 17500 / 20000, 2.5, 5.0, 5.0], dtype=torch.float64))


@pytest.mark.parametrize("group_size", [None, 2])
def test_brn_without_renorm_equals_bn(group_size):
    """r_max = 1, d_max = 0: Batch Renormalization is BatchNorm in training (outputs, grads, statistics)."""
    brn = BatchRenorm2d(3, r_max=1.0, d_max=0.0, warmup_iters=0, r_max_iters=0, d_max_iters=0,
                        group_size=group_size).double()
    bn = BatchNorm2d(3, group_size=group_size).double()
    _randomize_affine(brn, bn)
    for step in range(6):
        x = torch.randn(6 if group_size else 5, 3, 4, 4, dtype=torch.float64) * 2 + step
        dy = torch.randn_like(x)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        for m in (brn, bn):
            m.zero_grad(set_to_none=True)
        y1, y2 = brn(x1), bn(x2)
        y1.backward(dy)
        y2.backward(dy)
        isclose_report(y1, y2, f"y step {step}")
        isclose_report(x1.grad, x2.grad, f"dx step {step}")
        isclose_report(brn.weight.grad, bn.weight.grad, f"dgamma step {step}")
        isclose_report(brn.bias.grad, bn.bias.grad, f"dbeta step {step}")
        isclose_report(brn.running_mean, bn.running_mean, f"running_mean step {step}")
        isclose_report(brn.running_var, bn.running_var, f"running_var step {step}")
    brn.eval(), bn.eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    isclose_report(brn(x), bn(x), "eval output")


def test_bn_plain_is_torch_batchnorm():
    ours, theirs = BatchNorm2d(4).double(), nn.BatchNorm2d(4).double()
    _randomize_affine(ours, theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for _ in range(3):
        x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
        isclose_report(ours(x), theirs(x), "train output")
    ours.eval(), theirs.eval()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    isclose_report(ours(x), theirs(x), "eval output")
    ours.load_state_dict(theirs.state_dict())


def test_bn_single_value_per_channel_is_an_error():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNorm2d(2, group_size=1)(torch.randn(4, 2, 1, 1))
