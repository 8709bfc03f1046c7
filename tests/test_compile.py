"""torch.compile(fullgraph=True) equals eager for every registered norm: outputs, gradients, every buffer.

A buffer written where the compiler cannot see it (MABN's Ψ ring, once written in a custom backward through
``ctx``) or a backward that re-reads a buffer the forward has already updated is silently wrong only in some
phases, so each case runs through warm-up, the moving averages and renormalization (BRN: its ramps) with 1
group per call (a true small batch), fewer groups than MABN's window, as many, and more (channels_last).
CPU inductor, float64; each case is one compile (compiles are the cost of this file, so the graphs are small).
"""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from torch import nn

from mabn.norms import build_norm, registered_norms
from mabn.norms.registry import NormContext

from .test_train import run_dir, train
from .tinydata import make_fmnist_like

N, WINDOW, CALLS = 2, 4, 6  # samples per normalization batch, MABN window, training calls per case
# Schedules in training iterations (the registry turns them into normalization batches): after CALLS calls
# every case is past warm-up, MABN's window (SMA) and renorm start, and BRN's r_max / d_max ramps.
PARAMS = {
    "mabn": {"window": WINDOW, "warmup_iters": 1, "renorm_iters": 2, "momentum": 0.2, "r_max": 1.5},
    "brn": {"warmup_iters": 1, "r_max_iters": 3, "d_max_iters": 2, "r_max": 2.0, "d_max": 0.5,
            "momentum": 0.3},
    "bn": {"momentum": 0.3},
    "gn": {"num_groups": 2},
}
GROUPED = ("bn", "brn", "mabn")
GROUPS = {"1 group": 1, "fewer than window": 2, "window": WINDOW, "more than window": 6}
CASES = [(name, g) for name in registered_norms() for g in (GROUPS if name in GROUPED else ["1 group"])]


def _model(name: str, groups: int) -> nn.Module:
    """norm -> 1x1 conv -> norm: two layers of the norm, so both write their state inside one graph."""
    batch = groups * N if name in GROUPED else N
    ctx = NormContext(norm_batch=N if name in GROUPED else batch, device_batch=batch)
    ctor = build_norm({"name": name, **PARAMS.get(name, {})}, ctx).ctor
    torch.manual_seed(0)
    model = nn.Sequential(ctor(4), nn.Conv2d(4, 4, 1), ctor(4)).double().train()
    with torch.no_grad():  # non-trivial affine (frozenbn keeps its affine in buffers)
        for mod in (model[0], model[2]):
            mod.weight.uniform_(0.5, 1.5)
            mod.bias.normal_()
    return model


def _close(a, b, what):
    if a.dtype in (torch.long, torch.bool):
        assert torch.equal(a, b), what
    else:
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=lambda m: f"{what}: {m}")


def _forward_backward(models, x, dy) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(output, input gradient) of one forward and backward of each model on the same x and dy."""
    outs = []
    for model in models:
        xi = x.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        y = model(xi)
        y.backward(dy)
        outs.append((y.detach(), xi.grad))
    return outs


@pytest.mark.parametrize("name, groups", CASES, ids=[f"{n}-{g}" for n, g in CASES])
def test_compiled_equals_eager(name, groups):
    from torch._inductor.compile_fx import compile_fx

    graphs = []

    def inductor(gm, example_inputs):  # inductor, counting the graphs it is handed
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    eager = _model(name, GROUPS[groups])
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=inductor, fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(1)
    batch = GROUPS[groups] * N if name in GROUPED else N
    for call in range(CALLS):
        # scale and shift drift between calls, so that r, d and the moving averages move (and clip)
        x = torch.randn(batch, 4, 3, 3, generator=gen, dtype=torch.float64) * (0.5 + call % 3) + 0.3 * call
        if groups == "more than window":  # channels_last, as train.channels_last runs on GPUs
            x = x.contiguous(memory_format=torch.channels_last)
        outs = _forward_backward((compiled, eager), x, torch.randn(x.shape, generator=gen, dtype=torch.float64))
        where = f"{name}, {groups}, call {call}"
        _close(outs[0][0], outs[1][0], f"output, {where}")
        _close(outs[0][1], outs[1][1], f"input grad, {where}")
        for (key, p), q in zip(compiled_model.named_parameters(), eager.parameters(), strict=True):
            _close(p.grad, q.grad, f"grad of {key}, {where}")
        for (key, b), c in zip(compiled_model.named_buffers(), eager.buffers(), strict=True):
            _close(b, c, f"buffer {key}, {where}")
    assert len(graphs) == 1, f"{len(graphs)} graphs: a graph break or a recompile between calls"
    counter = getattr(eager[0], "num_batches_tracked", None)
    if name in ("brn", "mabn"):  # the schedules above were passed
        assert int(counter) == CALLS * GROUPS[groups] > 3 * GROUPS[groups]


def test_ops_pass_opcheck():
    """The ops' schemas (declared writes), fake kernels and autograd formula agree with their kernels."""
    from mabn.norms import _mabn_ops as ops
    from mabn.norms.brn import renorm_state_op

    gen = torch.Generator().manual_seed(0)
    groups, c = 3, 4
    x = torch.randn(groups * 2, c, 3, 3, generator=gen, dtype=torch.float64)
    for t in (0, 5):  # warm-up, then the moving averages
        ring_x2 = torch.rand(WINDOW, c, generator=gen, dtype=torch.float64)
        state = (ring_x2, torch.ones(c, dtype=torch.float64), torch.tensor(t))
        torch.library.opcheck(ops.forward_state_op, (x, *state, groups, WINDOW, 2, 4, 1.5, 0.2, 1e-5))
        chi2_bar, r, use_sma, t0 = ops.forward_state(x, *state, groups, WINDOW, 2, 4, 1.5, 0.2, 1e-5)
        ring_gz = torch.rand(WINDOW, c, generator=gen, dtype=torch.float64)
        torch.library.opcheck(ops.update_ring_gz_op, (ring_gz, chi2_bar, t0, use_sma, WINDOW))
        weight, bias = (torch.rand(c, generator=gen, dtype=torch.float64).requires_grad_(True) for _ in "wb")
        args = (x.clone().requires_grad_(True), weight, bias, chi2_bar, r, use_sma, ring_gz, t0, WINDOW, 1e-5)
        torch.library.opcheck(ops.normalize_op, args)
        brn_state = (torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64), torch.tensor(t))
        torch.library.opcheck(renorm_state_op, (chi2_bar, r, *brn_state, 18, 0.3, 1e-5, 2.0, 0.5, 1, 3, 2))


# Schedules short enough that 4 iterations (4 groups each) pass warm-up, MABN's window, renorm, BRN's ramps.
TRAIN_SCHEDULES = {
    "bn": [],
    "brn": ["norm.warmup_iters=1", "norm.r_max_iters=3", "norm.d_max_iters=2"],
    "mabn": ["norm.window=4", "norm.warmup_iters=1", "norm.renorm_iters=2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("norm", sorted(TRAIN_SCHEDULES))
def test_train_compile_equals_eager(norm, tmp_path):
    """train.compile=true end to end (weight-centered convs included): the same losses and top-1 as eager."""
    root = make_fmnist_like(tmp_path / "fmnist")
    records = {}
    for mode in ("false", "true"):
        args = [f"norm={norm}", "batch=2", f"train.compile={mode}", *TRAIN_SCHEDULES[norm]]
        train(args, tmp_path / mode, root)
        d = run_dir(tmp_path / mode)
        lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        losses = [x["train/loss"] for x in lines if "train/loss" in x]
        records[mode] = losses, json.loads((d / "summary.json").read_text())["top1"]
    (eager_losses, eager_top1), (compiled_losses, compiled_top1) = records["false"], records["true"]
    assert len(eager_losses) == 4
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5), norm
    assert compiled_top1 == eager_top1


def test_mabn_ablations_compiled_equal_eager():
    """Every non-default combination of MABN's switches, one layer each, stacked in one graph (one compile):
    compiled == eager through warm-up, the averages (SMA or EMA) and renorm, 3 groups per call."""
    from mabn.norms import MABN2d

    combos = [c for c in itertools.product(("sma", "batch"), ("sma", "batch"), ("sma", "ema"), (True, False))
              if c != ("sma", "sma", "sma", True)]
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = nn.Sequential(*(MABN2d(4, window=WINDOW, group_size=N, warmup_iters=2, renorm_iters=4, momentum=0.2,
                                   r_max=1.5, forward_stat=f, backward_stat=b, average=a, renorm=r)
                            for f, b, a, r in combos)).double().train()
    with torch.no_grad():
        for mod in eager:
            mod.weight.uniform_(0.5, 1.5)
            mod.bias.normal_()
    compiled_model = copy.deepcopy(eager)
    from torch._inductor.compile_fx import compile_fx

    graphs = []

    def inductor(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(compiled_model, backend=inductor, fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(1)
    for call in range(CALLS):
        x = torch.randn(3 * N, 4, 3, 3, generator=gen, dtype=torch.float64) * (0.5 + call % 3) + 0.3 * call
        outs = _forward_backward((compiled, eager), x, torch.randn(x.shape, generator=gen, dtype=torch.float64))
        _close(outs[0][0], outs[1][0], f"output, call {call}")
        _close(outs[0][1], outs[1][1], f"input grad, call {call}")
        for (key, p), q in zip(compiled_model.named_parameters(), eager.parameters(), strict=True):
            _close(p.grad, q.grad, f"grad of {key}, call {call}")
        for (key, b), c in zip(compiled_model.named_buffers(), eager.buffers(), strict=True):
            _close(b, c, f"buffer {key}, call {call}")
    assert int(eager[0].num_batches_tracked) == 3 * CALLS and len(graphs) == 1


def test_ablation_ops_pass_opcheck():
    """The ops with the ablation arguments (EMA state, current-batch statistics, r off) pass opcheck."""
    from mabn.norms import _mabn_ops as ops

    gen = torch.Generator().manual_seed(0)
    groups, c = 3, 4
    x = torch.randn(groups * 2, c, 3, 3, generator=gen, dtype=torch.float64)
    for t, ema in ((0, True), (5, True), (5, False)):
        avg = torch.rand((c,) if ema else (WINDOW, c), generator=gen, dtype=torch.float64)
        state = (avg, torch.ones(c, dtype=torch.float64), torch.tensor(t))
        flags = (False, ema, False)
        torch.library.opcheck(ops.forward_state_op, (x, *state, groups, WINDOW, 2, 4, 1.5, 0.2, 1e-5, *flags))
        chi2_bar, r, use_sma, t0 = ops.forward_state(x, *state, groups, WINDOW, 2, 4, 1.5, 0.2, 1e-5, *flags)
        ring_gz = torch.rand(avg.shape, generator=gen, dtype=torch.float64)
        for backward_avg in (True, False):
            torch.library.opcheck(ops.update_ring_gz_op, (ring_gz, chi2_bar, t0, use_sma, WINDOW, backward_avg, ema))
        weight, bias = (torch.rand(c, generator=gen, dtype=torch.float64).requires_grad_(True) for _ in "wb")
        args = (x.clone().requires_grad_(True), weight, bias, chi2_bar, r, use_sma, ring_gz, t0, WINDOW, 1e-5,
                False, ema)
        torch.library.opcheck(ops.normalize_op, args)
