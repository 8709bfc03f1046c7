"""Layers with short schedules and the comparison helpers shared by the fused-path tests (no triton import)."""

import torch

from mabn.norms import BatchNorm2d, BatchRenorm2d, MABN2d


# Short schedules: MABN warm-up, SMA and clipped renorm, BRN warm-up and both ramps all switch within the steps.
def make(name, impl="torch", group_size=None, channels=5):
    """A layer with short schedules and random affine parameters."""
    if name == "bn":
        layer = BatchNorm2d(channels, group_size=group_size, momentum=0.3, impl=impl)
    elif name == "brn":
        layer = BatchRenorm2d(channels, group_size=group_size, momentum=0.3, r_max=1.5, d_max=0.5,
                              warmup_iters=2, r_max_iters=7, d_max_iters=5, impl=impl)
    else:
        layer = MABN2d(channels, group_size=group_size, window=3, warmup_iters=2, renorm_iters=4,
                       momentum=0.2, r_max=1.3, impl=impl)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    return layer


def step(layer, x, dy):
    """One forward + backward; (y, dx, dγ, dβ)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


def check(a, b, dtype, where):
    """Fused (a) vs torch (b) (y, dx, dγ, dβ) at the precision of ``dtype``."""
    loose = dtype == torch.bfloat16
    for label, u, v in zip(("y", "dx", "dw", "db"), a, b, strict=True):
        assert u.dtype == v.dtype and u.stride() == v.stride(), (where, label)
        tol = dict(rtol=2e-2, atol=3e-2) if loose and label in ("y", "dx") else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(u, v, **tol, msg=lambda m, n=label: f"{where} {n}: {m}")


def compare_state(fused, ref, where):
    """Every buffer equal (float32 statistics: a few ulps)."""
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, k=key: f"{where} {k}: {m}")


def batch(shape, step_no, dtype, channels_last):
    """An input whose scale changes a lot between steps (r, d hit their clips) and its upstream gradient."""
    x = (torch.randn(shape) * (1 + 2 * (step_no % 3)) + 0.5 * step_no).to(dtype)
    dy = torch.randn(shape).to(dtype)
    if channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    return x, dy
