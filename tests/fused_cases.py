"""The fused Triton path (impl="fused") against the PyTorch path (the spec), on CPU through TRITON_INTERPRET=1.

Not collected by the default run: ``tests/test_fused.py`` runs this file in a subprocess whose environment
sets TRITON_INTERPRET=1 before triton is imported (``@triton.jit`` and triton's own jitted helpers pick the
interpreter when they are defined). Shapes are tiny: the interpreter is slow.
"""

import os
import sys

if "triton.language" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

from mabn.norms import _fused  # noqa: E402

from .fused_layers import batch, check, compare_state, make, step  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported (tests/test_fused.py sets it)",
                allow_module_level=True)


def fused_twin(layer):
    """A deep copy of ``layer`` running the fused path."""
    twin = copy.deepcopy(layer)
    twin.impl = "fused"
    return twin


# (group_size, batch, steps): whole batch; 1 group per call; more groups than MABN's window (3); n = 1
GROUPINGS = [(None, 4, 8), (2, 2, 8), (2, 10, 3), (1, 4, 3)]


@pytest.mark.parametrize("grouping", GROUPINGS, ids=lambda g: f"n{g[0]}-N{g[1]}")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
def test_fused_equals_torch(name, dtype, channels_last, grouping):
    group_size, n_all, steps = grouping
    if name != "mabn" and group_size == 1:
        group_size, n_all = 1, 4  # one sample of 3x3: still 9 values per channel
    ref = make(name, "torch", group_size)
    fused = fused_twin(ref)
    for i in range(steps):
        x, dy = batch((n_all, 5, 3, 3), i, dtype, channels_last)
        a, b = step(fused, x, dy), step(ref, x, dy)
        where = f"{name} {dtype} step {i}"
        check(a, b, dtype, where)
        compare_state(fused, ref, where)
    assert int(fused.num_batches_tracked) == steps * (n_all // (group_size or n_all))



@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
def test_fused_grouped_contract(name):
    """One fused call on G·n samples == G consecutive fused calls on n (G = 4 > MABN's window 3)."""
    grouped = make(name, "fused", group_size=2)
    seq = copy.deepcopy(grouped)
    seq.group_size = None
    for i in range(3):
        x, dy = batch((8, 5, 3, 3), i, torch.float32, False)
        y, dx, dw, db = step(grouped, x, dy)
        parts = [step(seq, x[g:g + 2], dy[g:g + 2]) for g in range(0, 8, 2)]
        expect = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                  sum(p[2] for p in parts), sum(p[3] for p in parts))
        check((y, dx, dw, db), expect, torch.float32, f"{name} call {i}")
        compare_state(grouped, seq, f"{name} call {i}")


@pytest.mark.parametrize("first", ["fused", "torch"])
@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
def test_state_dicts_interchangeable(name, first):
    """Train a few steps on one path, load the state dict into the other, continue: same results."""
    a = make(name, first, group_size=2)
    for i in range(3):
        step(a, *batch((4, 5, 3, 3), i, torch.float32, False))
    other = "torch" if first == "fused" else "fused"
    b = make(name, other, group_size=2)
    b.load_state_dict(a.state_dict())
    for i in range(3, 6):
        x, dy = batch((4, 5, 3, 3), i, torch.float32, False)
        check(step(b, x, dy), step(a, x, dy), torch.float32, f"{name} {first}->{other} step {i}")
        compare_state(b, a, f"{name} step {i}")


# aten ops that launch no kernel: allocations, views, metadata
NO_LAUNCH = {"empty", "empty_like", "empty_strided", "view", "_unsafe_view", "detach", "alias", "as_strided",
             "expand", "t", "transpose", "permute", "unsqueeze", "squeeze", "select", "slice", "lift_fresh",
             "_reshape_alias", "unfold"}


class _Count(TorchDispatchMode):
    """Counts dispatched aten ops that launch a kernel (compute, copies, fills)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in NO_LAUNCH:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def launches(layer, x, dy, monkeypatch):
    """(forward, backward) launches of one training step: kernel-launching aten ops + Triton launches."""
    real = _fused._launch

    def counted(*args, **kwargs):
        mode.ops.append("triton")
        with _disable_current_modes():  # what the interpreter does inside a launch is not a device op
            real(*args, **kwargs)

    monkeypatch.setattr(_fused, "_launch", counted)
    x = x.clone().requires_grad_(True)
    with _Count() as mode:
        y = layer(x)
    fwd = len(mode.ops)
    with _Count() as mode:
        y.backward(dy)
    return fwd, len(mode.ops)


@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
def test_launch_budget(name, monkeypatch):
    """The launch budget: at most 4 forward and 4 backward per layer on the fused path, state included."""
    x, dy = batch((8, 8, 4, 4), 0, torch.float32, False)
    torch_fwd, torch_bwd = launches(make(name, "torch", group_size=2, channels=8), x, dy, monkeypatch)
    fwd, bwd = launches(make(name, "fused", group_size=2, channels=8), x, dy, monkeypatch)
    assert fwd <= 4 and bwd <= 4, (name, fwd, bwd)
    assert torch_fwd + torch_bwd > fwd + bwd, (torch_fwd, torch_bwd)  # the count sees the torch path's ops
