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



# Split reductions (the plan's chunk count K forced; rows per group = n x 9 positions): uneven chunks, one row
# per chunk, n = 1, more chunks than rows (the last chunks empty). (group_size, batch, K)
SPLITS = [(2, 4, 4), (2, 4, 18), (1, 4, 4), (2, 4, 25), (None, 4, 7)]


# float32 over every split and layout; bfloat16 (a float32 merge of bfloat16 loads) on the uneven split
SPLIT_CASES = [(torch.float32, cl, split) for split in SPLITS for cl in (False, True)] + \
    [(torch.bfloat16, cl, SPLITS[0]) for cl in (False, True)]


def _split_id(value) -> str:
    if isinstance(value, tuple):
        return "n{}-N{}-K{}".format(*value)
    return {torch.float32: "f32", torch.bfloat16: "bf16"}.get(value) or ("nhwc" if value else "nchw")


@pytest.mark.parametrize("dtype, channels_last, split", SPLIT_CASES, ids=_split_id)
@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
def test_split_reductions_equal_torch(name, dtype, channels_last, split, monkeypatch):
    """Every (group, channel) reduction split into K chunks of rows and merged in the state kernels: the
    same outputs, gradients and state as the torch path, every step through the phases (4 steps of 2
    groups: past MABN's warm-up, window and renorm start, and into BRN's ramps)."""
    group_size, n_all, chunks = split
    monkeypatch.setattr(_fused, "CHUNKS", [chunks])
    ref = make(name, "torch", group_size)
    fused = fused_twin(ref)
    for i in range(4):
        x, dy = batch((n_all, 5, 3, 3), i, dtype, channels_last)
        record = []
        monkeypatch.setattr(_fused, "RECORD", record)
        a, b = step(fused, x, dy), step(ref, x, dy)
        assert {grid[0] for kernel, grid, _, _ in record if kernel.endswith("stats_kernel")} == \
            {chunks * (n_all // (group_size or n_all))}, record  # G x K programs along the rows
        check(a, b, dtype, f"{name} {dtype} K={chunks} step {i}")
        compare_state(fused, ref, f"{name} K={chunks} step {i}")


def test_split_merge_is_deterministic(monkeypatch):
    """The same call twice (same state) gives bitwise the same outputs and statistics: no atomics."""
    monkeypatch.setattr(_fused, "CHUNKS", [5])
    layer = make("bn", "fused", 2)
    x, dy = batch((8, 5, 3, 3), 1, torch.float32, True)
    first, second = copy.deepcopy(layer), copy.deepcopy(layer)
    a, b = step(first, x, dy), step(second, x, dy)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert all(torch.equal(u, v) for u, v in zip(first.state_dict().values(), second.state_dict().values(),
                                                     strict=True))


def _passes(record, size):
    """Activation-sized tensors each launch reads or writes (distinct storage: an unused alias is one)."""
    return sum(len({t.data_ptr() for t in args if isinstance(t, torch.Tensor) and t.numel() == size})
               for _, _, args, _ in record)


@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
def test_tensor_passes_at_the_floor(name, monkeypatch):
    """Forward 3 passes over activation-sized tensors (x; x, y), backward 5 (dy, x; x, dy, dx), counted from
    the launches themselves."""
    layer = make(name, "fused", group_size=2, channels=8)
    x, dy = batch((8, 8, 4, 4), 0, torch.float32, True)
    x = x.clone().requires_grad_(True)
    record = []
    monkeypatch.setattr(_fused, "RECORD", record)
    y = layer(x)
    forward = _passes(record, x.numel())
    record.clear()
    y.backward(dy)
    assert (forward, _passes(record, x.numel())) == (3, 5)


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


@pytest.fixture
def fresh_checks(monkeypatch):
    monkeypatch.setattr(_fused, "CHECKED", {})
    monkeypatch.setattr(_fused, "FALLBACK", [None])


@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
def test_auto_checks_its_first_fused_call_against_torch(name, fresh_checks):
    """impl=auto's first call of each kind runs both paths on copies: equal here, so fused is allowed; the
    layer's own state is untouched and the kind is not checked twice."""
    layer = make(name, "auto", group_size=2)
    x, _ = batch((4, 5, 3, 3), 1, torch.bfloat16, True)
    before = copy.deepcopy(layer.state_dict())
    assert _fused.check_auto(layer, x) and _fused.path_report()["path"] == "fused"
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    assert _fused.path_report()["checked"] == [f"{type(layer).__name__}/bfloat16/nhwc/2"]
    launches = _fused.LAUNCHES[0]
    assert _fused.check_auto(layer, x) and _fused.LAUNCHES[0] == launches  # answered from the first check


def test_a_fused_path_that_differs_falls_back_to_torch_for_the_run(fresh_checks, monkeypatch, caplog):
    """A wrong kernel (here: the output kernel scaled by 1.01) is caught on the first call; auto then runs the
    torch path for every layer, says so in one line, and the report names the reason."""
    real = _fused._affine

    def wrong(out3, *args):
        real(out3, *args)
        out3.mul_(1.01)

    monkeypatch.setattr(_fused, "_affine", wrong)
    with caplog.at_level("WARNING", logger="mabn.norms"):
        assert not _fused.check_auto(make("mabn", "auto", 2), batch((4, 5, 3, 3), 0, torch.float32, False)[0])
    assert len(caplog.records) == 1 and "torch path runs for the rest of this run" in caplog.records[0].message
    assert not _fused.check_auto(make("bn", "auto", 2), batch((4, 5, 3, 3), 0, torch.float32, False)[0])
    report = _fused.path_report()
    assert report["path"] == "torch after a mismatch" and "MABN2d/float32/nchw/2" in report["mismatch"]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", ["bn", "mabn"])
def test_launch_grids_are_the_plans(name, channels_last, monkeypatch):
    """Real launches use the planner's grids (tests/test_fused_plan.py checks those on the model zoo): here a
    layer of 64 K elements, whose reductions need 2 programs: 2 channel blocks of 4 (NCHW), or 2 row chunks
    of one 16-channel block (NHWC)."""
    layer = make(name, "fused", group_size=None, channels=8)
    x, dy = batch((8, 8, 32, 32), 0, torch.float32, channels_last)
    record = []
    monkeypatch.setattr(_fused, "RECORD", record)
    step(layer, x, dy)
    p = _fused.plan_for(_fused._as3d(x), 1, name == "bn", layer.window if name == "mabn" else 0)
    assert p.chunks == (2 if channels_last else 1) and p.programs()["stats"] == 2 and p.meets_targets()
    grids = {kernel: grid for kernel, grid, _, _ in record}
    assert grids["stats_kernel"] == grids["grad_stats_kernel"] == p.stats_grid
    assert grids["affine_kernel"] == p.affine_grid
    assert {g for k, g in grids.items() if "state" in k or k.endswith("grad_kernel")} == {p.state_grid}
