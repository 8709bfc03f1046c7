"""The fused path of BN, BRN and MABN (``impl="fused"``): three Triton launches forward, three backward.

Forward: (1) per-(group, chunk, channel) partial statistics, one pass over x; (2) one program per channel
block merges each group's chunks and walks the groups in order, updating rings, EMAs and the counter and
writing the per-(group, channel) scale and shift; (3) the output, one elementwise pass: 3 passes over
activation-sized tensors (x, x, y). Backward: (1) partial Σdy and Σdy·x; (2) dγ, dβ, MABN's Ψ ring and the
dx coefficients; (3) dx, one elementwise pass: 5 passes (dy, x; x, dy, dx). Grids and chunk counts come from
``_plan.plan`` (every launch fills an H100). Statistics are float32 (float32, bfloat16 and float16
inputs); the PyTorch path (``impl="torch"``) is the spec, with the same buffers, so state dicts are
interchangeable. Kernels import lazily: ``TRITON_INTERPRET=1`` set before the first fused call runs them
on CPU tensors (the tests do).
"""

from __future__ import annotations

import copy
import importlib
import logging
import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..launches import note_launch
from . import _plan

IMPLS = ("auto", "fused", "torch")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAUNCHES = [0]  # Triton launches so far (the launch-count test reads it)
# when a list: every launch appends (kernel name, grid, args, meta) — what the tests count programs and tensor
# passes from and what the ahead-of-time compile test compiles (tests/fused_cases.py, tests/test_fused_aot.py)
RECORD: list | None = None


def kernels():
    """The kernel module, imported on first use (a test may reload it after setting TRITON_INTERPRET)."""
    return importlib.import_module("mabn.norms._fused_kernels")


def check_impl(impl: str) -> str:
    """Validate an ``impl`` argument at construction."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def _as3d(t: Tensor) -> Tensor | None:
    """(N, C, *) as an (N, C, S) view (NCHW and NHWC both allow one), None when the strides do not."""
    try:
        return t.view(t.shape[0], t.shape[1], -1)
    except RuntimeError:
        return None


def uncovered(x: Tensor, tensors: list[Tensor]) -> str | None:
    """Why the fused kernels cannot run this call (None when they can)."""
    if x.dtype not in FUSED_DTYPES:
        return f"input dtype {x.dtype} (fused: float32, bfloat16, float16; float64 runs the torch path)"
    if any(t.dtype != torch.float32 for t in tensors if t.is_floating_point()):
        return "parameters and buffers must be float32"
    if _as3d(x) is None:
        return "input strides (neither NCHW- nor NHWC-like)"
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return "a CPU tensor (fused runs on CUDA, or on CPU under TRITON_INTERPRET=1)"
    return None


def use_fused(impl: str, x: Tensor, tensors: list[Tensor], layer: str, setting: str | None = None,
              module=None) -> bool:
    """``auto``: fused on CUDA when covered; ``fused``: fused or a ValueError; never under torch.compile.
    ``setting`` names a layer setting the kernels do not cover (None: covered)."""
    if impl == "torch" or torch.compiler.is_compiling():
        return False
    why = setting or uncovered(x, tensors)
    if impl == "auto":  # the first fused call of each kind is checked against the torch path (check_auto)
        return x.is_cuda and why is None and (module is None or check_auto(module, x))
    if why is not None:
        raise ValueError(f"{layer}(impl='fused') does not cover {why}; use impl='auto' or 'torch'")
    return True


# impl="auto" on a GPU nobody here has run: the first fused call of each kind (layer, dtype, layout, grouped or
# not) in a process is also run on the torch path, on the same input and state, and compared; one mismatch
# and auto takes the torch path for the rest of the process (``check_auto``, ``path_report``).
CHECKED: dict[tuple, dict] = {}
FALLBACK: list[str | None] = [None]
_TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 3e-2)}
logger = logging.getLogger("mabn.norms")


def _kind(layer, x: Tensor) -> tuple:
    layout = "nhwc" if x.dim() > 2 and x.stride(1) == 1 and x.shape[1] > 1 else "nchw"
    return type(layer).__name__, str(x.dtype).removeprefix("torch."), layout, getattr(layer, "group_size", None)


def _step(layer, x: Tensor, dy: Tensor) -> list[Tensor]:
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return [t.detach() for t in (y, x.grad, layer.weight.grad, layer.bias.grad, *layer.state_dict().values())]


def check_auto(layer, x: Tensor) -> bool:
    """Whether ``impl="auto"`` may take the fused path for this call (only asked when it could)."""
    if FALLBACK[0] is not None:
        return False
    kind = _kind(layer, x)
    if kind in CHECKED:
        return CHECKED[kind]["ok"]
    fused, ref = copy.deepcopy(layer), copy.deepcopy(layer)
    fused.impl, ref.impl = "fused", "torch"
    gen = torch.Generator(device=x.device).manual_seed(0)  # the run's own random streams stay untouched
    dy = torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float32).to(x.dtype)
    dy = dy.contiguous(memory_format=torch.channels_last) if kind[2] == "nhwc" and x.dim() == 4 else dy
    with torch.enable_grad():
        got, want = _step(fused, x, dy), _step(ref, x, dy)
    rtol, atol = _TOLERANCE.get(x.dtype, (1e-4, 1e-5))
    worst = 0.0
    for i, (u, v) in enumerate(zip(got, want, strict=True)):
        if not u.is_floating_point():
            ok = torch.equal(u, v)
            worst = max(worst, 0.0 if ok else float("inf"))
            continue
        tol = (rtol, atol) if i < 2 else (1e-4, 1e-5)  # y and dx at the input's precision; the rest float32
        err = ((u.float() - v.float()).abs() - tol[1]) / (tol[0] * v.float().abs() + 1e-30)
        worst = max(worst, float(err.max().clamp_min(0)) if u.numel() else 0.0)  # > 1: beyond tolerance
    ok = worst <= 1.0
    CHECKED[kind] = {"kind": "/".join(map(str, kind)), "ok": ok, "excess": round(worst, 3)}
    if not ok:
        FALLBACK[0] = f"fused {CHECKED[kind]['kind']} differs from the torch path ({worst:.3g}x the tolerance)"
        logger.warning("impl=auto: the fused norm path differs from the torch path on %s for %s (%.3gx the "
                       "tolerance): the torch path runs for the rest of this run", torch.cuda.get_device_name(
                           x.device) if x.is_cuda else x.device, CHECKED[kind]["kind"], worst)
    return ok


def path_report() -> dict:
    """What impl="auto" ran in this process, for summary.json: "torch" (no fused call was possible, e.g. a CPU),
    "fused" (every kind checked equal to the torch path) or "torch after a mismatch" with the reason."""
    path = "torch" if not CHECKED else ("fused" if FALLBACK[0] is None else "torch after a mismatch")
    return {"path": path, "checked": [c["kind"] for c in CHECKED.values()], "mismatch": FALLBACK[0]}


def _launch(kernel, grid, *args, **meta) -> None:
    LAUNCHES[0] += 1
    note_launch()  # what the benchmarks count beside aten's kernel-launching ops
    if RECORD is not None:
        RECORD.append((kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, grid, args, meta))
    kernel[grid](*args, **meta)


CHUNKS: list[int | None] = [None]  # tests: force the chunk count K of the split reductions (None: the plan's)


def plan_for(x3: Tensor, groups: int, centered: bool, window: int = 0) -> _plan.Plan:
    """The launch plan of a call on ``x3`` (N, C, S)."""
    n_all, c, s = x3.shape
    return _plan.plan(n_all, c, s, groups, channels_last=x3.stride(1) == 1 and c > 1, centered=centered,
                      window=window, chunks=CHUNKS[0])


def _partials(p: _plan.Plan, device, k: int) -> list[Tensor]:
    return [torch.empty(p.groups, p.chunks, p.channels, device=device, dtype=torch.float32) for _ in range(k)]


def _stats(x3: Tensor, p: _plan.Plan, counter: Tensor, centered: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Launch 1: (G, K, C) partial mean and M2 (centered) or Σx², and the counter before the call."""
    n_all, c, s = x3.shape
    p1, p2 = _partials(p, x3.device, 2) if centered else _partials(p, x3.device, 1) * 2
    t0 = torch.empty_like(counter)
    _launch(kernels().stats_kernel, p.stats_grid, x3, p1, p2, counter, t0, n_all // p.groups, c, s, *x3.stride(),
            p.chunks, p.chunk_rows, CENTERED=centered, BLOCK_M=p.block_m, BLOCK_C=p.block_c)
    return p1, p2, t0


def _affine(out3: Tensor, x3: Tensor, dy3: Tensor | None, mean: Tensor | None, a: Tensor, b: Tensor | None,
            c: Tensor | None, p: _plan.Plan) -> None:
    """Launch: out = (x − mean)·a + dy·b + c elementwise (the output, or dx)."""
    n_all, ch, s = x3.shape
    d3 = x3 if dy3 is None else dy3
    _launch(kernels().affine_kernel, p.affine_grid, out3, x3, d3, a if mean is None else mean, a,
            a if b is None else b, a if c is None else c, n_all, n_all // p.groups, ch, s, *out3.stride(),
            *x3.stride(), *d3.stride(), HAS_MEAN=mean is not None, HAS_DY=dy3 is not None,
            HAS_C=c is not None, BLOCK_M=p.block_m, BLOCK_C=p.block_c)


def _grad_stats(dy3: Tensor, x3: Tensor, mean: Tensor | None, p: _plan.Plan) -> tuple[Tensor, Tensor]:
    """Backward launch 1: (G, K, C) partial Σdy and Σdy·(x − mean)."""
    n_all, c, s = x3.shape
    s1, s2 = _partials(p, x3.device, 2)
    _launch(kernels().grad_stats_kernel, p.stats_grid, dy3, x3, s1 if mean is None else mean, s1, s2,
            n_all // p.groups, c, s, *dy3.stride(), *x3.stride(), p.chunks, p.chunk_rows,
            HAS_MEAN=mean is not None, BLOCK_M=p.block_m, BLOCK_C=p.block_c)
    return s1, s2


def _dy3(dy: Tensor) -> Tensor:
    """dy as an (N, C, S) view; a rare layout without one is copied."""
    view = _as3d(dy)
    return view if view is not None else _as3d(dy.contiguous())


def _empties(groups: int, c: int, device, k: int) -> list[Tensor]:
    return [torch.empty(groups, c, device=device, dtype=torch.float32) for _ in range(k)]


STATE_BLOCK_C = _plan.STATE_BLOCK_C  # channels per program of the state kernels: one warp, one channel per
STATE_WARPS = 1  # thread, so no replicated thread reads a value another one has rewritten


class FusedCentered(torch.autograd.Function):
    """BN (``renorm`` None) and BRN (``renorm`` = r_max, d_max, warmup, ramp lengths) in six launches."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, counter, groups, eps, momentum, renorm):
        x3 = _as3d(x)
        c = x3.shape[1]
        p = plan_for(x3, groups, True)
        count = p.rows
        p1, p2, t0 = _stats(x3, p, counter, True)
        mean, k, shift, inv, r, d = _empties(groups, c, x.device, 6)
        r_max, d_max, warmup, r_end, d_end = renorm if renorm is not None else (1.0, 0.0, 0, 1, 1)
        _launch(kernels().centered_state_kernel, p.state_grid, p1, p2, mean, running_mean, running_var, counter,
                t0, weight, bias, k, shift, inv, r, d, groups, c, p.chunks, p.chunk_rows, count,
                count / (count - 1), momentum, eps, r_max, d_max, warmup, max(r_end - warmup, 1),
                max(d_end - warmup, 1), RENORM=renorm is not None, BLOCK_C=STATE_BLOCK_C, num_warps=STATE_WARPS)
        y = torch.empty_like(x)
        _affine(_as3d(y), x3, None, mean, k, None, shift, p)
        ctx.save_for_backward(x, weight, mean, k, inv, r, d)
        ctx.plan, ctx.count = p, count
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, k, inv, r, d = ctx.saved_tensors
        x3, dy3, p, c = _as3d(x), _dy3(dy), ctx.plan, x.shape[1]
        s1, s2 = _grad_stats(dy3, x3, mean, p)
        dw, db = torch.empty_like(weight), torch.empty_like(weight)
        c0, b2 = _empties(p.groups, c, x.device, 2)
        _launch(kernels().centered_grad_kernel, p.state_grid, s1, s2, k, inv, r, d, dw, db, c0, b2, p.groups, c,
                p.chunks, float(ctx.count), BLOCK_C=STATE_BLOCK_C, num_warps=STATE_WARPS)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            _affine(_as3d(dx), x3, dy3, mean, b2, k, c0, p)
        grads = (dw if ctx.needs_input_grad[1] else None, db if ctx.needs_input_grad[2] else None)
        return dx, *grads, None, None, None, None, None, None, None


class FusedMABN(torch.autograd.Function):
    """MABN (Yan et al. 2020, Alg. 1-2) in six launches; the backward writes ``ring_gz`` (eager only)."""

    @staticmethod
    def forward(ctx, x, weight, bias, ring_x2, running_var, counter, ring_gz, groups, hp):
        window, warmup, r_after, r_max, momentum, eps = hp
        x3 = _as3d(x)
        c = x3.shape[1]
        p = plan_for(x3, groups, False, window)
        part, _, t0 = _stats(x3, p, counter, False)
        chi2, k, shift, inv, r = _empties(groups, c, x.device, 5)
        _launch(kernels().mabn_state_kernel, p.state_grid, part, chi2, ring_x2, running_var, counter, t0, weight,
                bias, k, shift, inv, r, groups, c, p.chunks, p.chunk_rows, p.rows, window,
                max(groups - window, 0), warmup, r_after, r_max, momentum, eps, BLOCK_C=STATE_BLOCK_C,
                num_warps=STATE_WARPS)
        y = torch.empty_like(x)
        _affine(_as3d(y), x3, None, None, k, None, shift, p)
        ctx.save_for_backward(x, weight, k, inv, r, t0)
        ctx.ring_gz, ctx.plan, ctx.window, ctx.warmup = ring_gz, p, window, warmup
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, k, inv, r, t0 = ctx.saved_tensors
        x3, dy3, p, c = _as3d(x), _dy3(dy), ctx.plan, x.shape[1]
        groups = p.groups
        s1, dot = _grad_stats(dy3, x3, None, p)
        psi, xterm = _empties(groups, c, x.device, 2)
        dw, db = torch.empty_like(weight), torch.empty_like(weight)
        _launch(kernels().mabn_grad_kernel, p.state_grid, s1, dot, psi, xterm, k, inv, r, weight, ctx.ring_gz, t0,
                dw, db, groups, c, p.chunks, float(p.rows), ctx.window, max(groups - ctx.window, 0), ctx.warmup,
                BLOCK_C=STATE_BLOCK_C, num_warps=STATE_WARPS)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            _affine(_as3d(dx), x3, dy3, None, xterm, k, None, p)
        grads = (dw if ctx.needs_input_grad[1] else None, db if ctx.needs_input_grad[2] else None)
        return dx, *grads, None, None, None, None, None, None
