"""The fast paths of the norm layers (closed-form backwards, fused reductions) against autograd and float64.

The reference-equation tests (test_mabn, test_brn_bn, test_grouped_contract) run through the same code; these
add what a fused path can get wrong on its own: gradients against finite differences, memory layouts other
than contiguous NCHW, inputs far from zero, half-precision inputs, affine-free BatchNorm.
"""

import pytest
import torch
import torch.nn.functional as F

from mabn.norms import BatchNorm2d, BatchRenorm2d, MABN2d
from mabn.norms._centered import centered_norm

from .reference import isclose_report


def _layers(group_size):
    brn = BatchRenorm2d(4, group_size=group_size, r_max=1.5, d_max=0.5, warmup_iters=0, r_max_iters=0,
                        d_max_iters=0)
    mabn = MABN2d(4, group_size=group_size, window=2, warmup_iters=0, renorm_iters=0)
    return {"bn": BatchNorm2d(4, group_size=group_size), "brn": brn, "mabn": mabn}


@pytest.mark.parametrize("groups", [1, 3])
def test_centered_norm_gradcheck_with_constant_r_d(groups):
    r = torch.rand(groups, 4, dtype=torch.float64) + 0.5
    d = torch.randn(groups, 4, dtype=torch.float64)
    x = (torch.randn(2 * groups, 4, 3, 3, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_(True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return centered_norm(x, w, b, groups, 1e-5, lambda mean, var: (r, d))[0]

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-7)

    # and the same function written with autograd ops
    def plain(x, w, b):
        xg = x.view(groups, 2, 4, 9)
        mean = xg.mean(dim=(1, 3), keepdim=True)
        var = xg.var(dim=(1, 3), keepdim=True, correction=0)
        xhat = (xg - mean) / torch.sqrt(var + 1e-5) * r.view(groups, 1, 4, 1) + d.view(groups, 1, 4, 1)
        return (xhat * w.view(1, 1, 4, 1) + b.view(1, 1, 4, 1)).view_as(x)

    isclose_report(f(x, w, b), plain(x, w, b), "centered_norm output")


@pytest.mark.parametrize("group_size", [None, 2])
@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
def test_channels_last_equals_contiguous(name, group_size):
    torch.manual_seed(0)
    a, b = _layers(group_size)[name], _layers(group_size)[name]
    for step in range(3):
        x = torch.randn(4, 4, 5, 5) * 2 + step
        dy = torch.randn_like(x)
        x1 = x.clone().requires_grad_(True)
        x2 = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
        a(x1).backward(dy)
        b(x2).backward(dy.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-4, atol=1e-4)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("name", ["bn", "brn"])
def test_grouped_statistics_keep_precision_far_from_zero(name):
    """A two-pass variance: float32 inputs at mean 1e4, std 1 normalize about as well as torch's own
    batch_norm does (E[x²] − E[x]² in float32 would be off by O(1) there)."""
    torch.manual_seed(0)
    layer32, layer64 = _layers(2)[name], _layers(2)[name].double()
    x = (torch.randn(4, 4, 6, 6, dtype=torch.float64) + 1e4).float()
    y32, y64 = layer32(x), layer64(x.double())
    native = torch.cat([F.batch_norm(g, None, None, training=True, eps=1e-5) for g in x.split(2)])
    ours_err, native_err = (y32.double() - y64).abs().max(), (native.double() - y64).abs().max()
    assert ours_err <= 2 * native_err + 1e-4, (ours_err, native_err)
    torch.testing.assert_close(layer32.running_var.double(), layer64.running_var, rtol=1e-4, atol=1e-4)


def test_grouped_bn_without_affine():
    layer = BatchNorm2d(4, group_size=2, affine=False)
    x = torch.randn(4, 4, 3, 3, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    xg = x.detach().view(2, 2, 4, 9)
    var = xg.var(dim=(1, 3), keepdim=True, correction=0)
    expected = (xg - xg.mean(dim=(1, 3), keepdim=True)) / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(y, expected.view_as(x), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
def test_bfloat16_inputs_follow_float32(name):
    """Half inputs (as under autocast): statistics in float32, output and gradients in the input dtype."""
    torch.manual_seed(0)
    a, b = _layers(2)[name], _layers(2)[name]
    x = torch.randn(4, 4, 5, 5)
    dy = torch.randn_like(x)
    x1, x2 = x.clone().requires_grad_(True), x.bfloat16().requires_grad_(True)
    y1, y2 = a(x1), b(x2)
    y1.backward(dy)
    y2.backward(dy.bfloat16())
    assert y2.dtype == torch.bfloat16 and x2.grad.dtype == torch.bfloat16
    torch.testing.assert_close(y2.float(), y1, rtol=0.05, atol=0.05)
    torch.testing.assert_close(x2.grad.float(), x1.grad, rtol=0.1, atol=0.1)
