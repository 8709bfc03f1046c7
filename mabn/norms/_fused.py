"""The fused path of BN, BRN and MABN (``impl="fused"``): three Triton launches forward, three backward.

Forward: (1) per-(group, channel) statistics; (2) one program per channel block walks the groups in order,
updating rings, EMAs and the counter and writing the per-(group, channel) scale and shift; (3) the output,
one elementwise pass. Backward: (1) Σdy and Σdy·x per (group, channel); (2) dγ, dβ, MABN's Ψ ring and the
dx coefficients; (3) dx, one elementwise pass. Statistics are float32 (float32, bfloat16 and float16
inputs); the PyTorch path (``impl="torch"``) is the spec, with the same buffers, so state dicts are
interchangeable. Kernels import lazily: ``TRITON_INTERPRET=1`` set before the first fused call runs them
on CPU tensors (the tests do).
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..launches import note_launch

IMPLS = ("auto", "fused", "torch")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAUNCHES = [0]  # Triton launches so far (the launch-count test reads it)


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


def use_fused(impl: str, x: Tensor, tensors: list[Tensor], layer: str, setting: str | None = None) -> bool:
    """``auto``: fused on CUDA when covered; ``fused``: fused or a ValueError; never under torch.compile.
    ``setting`` names a layer setting the kernels do not cover (None: covered)."""
    if impl == "torch" or torch.compiler.is_compiling():
        return False
    why = setting or uncovered(x, tensors)
    if impl == "auto":
        return x.is_cuda and why is None
    if why is not None:
        raise ValueError(f"{layer}(impl='fused') does not cover {why}; use impl='auto' or 'torch'")
    return True


def _launch(kernel, grid, *args, **meta) -> None:
    LAUNCHES[0] += 1
    note_launch()  # what the benchmarks count beside aten's kernel-launching ops
    kernel[grid](*args, **meta)


def _blocks(x3: Tensor) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C): channel-wide tiles for NHWC (channels contiguous), position-wide for NCHW."""
    if x3.stride(1) == 1 and x3.shape[1] > 1:
        return 32, 32
    return 128, 4


def _stats(x3: Tensor, groups: int, counter: Tensor, centered: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Launch 1: (G, C) mean and variance (centered) or mean of x², and the counter before the call."""
    n_all, c, s = x3.shape
    out1 = torch.empty(groups, c, device=x3.device, dtype=torch.float32)
    out2 = torch.empty_like(out1) if centered else out1
    t0 = torch.empty_like(counter)
    bm, bc = _blocks(x3)
    _launch(kernels().stats_kernel, (groups, triton_cdiv(c, bc)), x3, out1, out2, counter, t0,
            n_all // groups, c, s, *x3.stride(), CENTERED=centered, BLOCK_M=bm, BLOCK_C=bc)
    return out1, out2, t0


def _affine(out3: Tensor, x3: Tensor, dy3: Tensor | None, mean: Tensor | None, a: Tensor, b: Tensor | None,
            c: Tensor | None, groups: int) -> None:
    """Launch: out = (x − mean)·a + dy·b + c elementwise (the output, or dx)."""
    n_all, ch, s = x3.shape
    bm, bc = _blocks(x3)
    grid = (triton_cdiv(n_all * s, bm), triton_cdiv(ch, bc))
    d3 = x3 if dy3 is None else dy3
    _launch(kernels().affine_kernel, grid, out3, x3, d3, a if mean is None else mean, a,
            a if b is None else b, a if c is None else c, n_all, n_all // groups, ch, s, *out3.stride(),
            *x3.stride(), *d3.stride(), HAS_MEAN=mean is not None, HAS_DY=dy3 is not None,
            HAS_C=c is not None, BLOCK_M=bm, BLOCK_C=bc)


def _grad_stats(dy3: Tensor, x3: Tensor, mean: Tensor | None, groups: int) -> tuple[Tensor, Tensor]:
    """Backward launch 1: (G, C) Σdy and Σdy·(x − mean)."""
    n_all, c, s = x3.shape
    s1 = torch.empty(groups, c, device=x3.device, dtype=torch.float32)
    s2 = torch.empty_like(s1)
    bm, bc = _blocks(x3)
    _launch(kernels().grad_stats_kernel, (groups, triton_cdiv(c, bc)), dy3, x3, s1 if mean is None else mean,
            s1, s2, n_all // groups, c, s, *dy3.stride(), *x3.stride(), HAS_MEAN=mean is not None,
            BLOCK_M=bm, BLOCK_C=bc)
    return s1, s2


def triton_cdiv(a: int, b: int) -> int:
    """Ceil division (grid sizes)."""
    return -(-a // b)


def _dy3(dy: Tensor) -> Tensor:
    """dy as an (N, C, S) view; a rare layout without one is copied."""
    view = _as3d(dy)
    return view if view is not None else _as3d(dy.contiguous())


def _empties(groups: int, c: int, device, k: int) -> list[Tensor]:
    return [torch.empty(groups, c, device=device, dtype=torch.float32) for _ in range(k)]


STATE_BLOCK_C = 32  # channels per program of the state and gradient-statistics kernels: one warp, one
STATE_WARPS = 1  # channel per thread, so no replicated thread reads a value another one has rewritten


class FusedCentered(torch.autograd.Function):
    """BN (``renorm`` None) and BRN (``renorm`` = r_max, d_max, warmup, ramp lengths) in six launches."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, counter, groups, eps, momentum, renorm):
        x3 = _as3d(x)
        c = x3.shape[1]
        count = x3.shape[0] // groups * x3.shape[2]
        mean, var, t0 = _stats(x3, groups, counter, True)
        k, shift, inv, r, d = _empties(groups, c, x.device, 5)
        r_max, d_max, warmup, r_end, d_end = renorm if renorm is not None else (1.0, 0.0, 0, 1, 1)
        _launch(kernels().centered_state_kernel, (triton_cdiv(c, STATE_BLOCK_C),), mean, var, running_mean,
                running_var, counter, t0, weight, bias, k, shift, inv, r, d, groups, c, count / (count - 1),
                momentum, eps, r_max, d_max, warmup, max(r_end - warmup, 1), max(d_end - warmup, 1),
                RENORM=renorm is not None, BLOCK_C=STATE_BLOCK_C, num_warps=STATE_WARPS)
        y = torch.empty_like(x)
        _affine(_as3d(y), x3, None, mean, k, None, shift, groups)
        ctx.save_for_backward(x, weight, mean, k, inv, r, d)
        ctx.groups, ctx.count = groups, count
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, k, inv, r, d = ctx.saved_tensors
        x3, dy3, groups, c = _as3d(x), _dy3(dy), ctx.groups, x.shape[1]
        s1, s2 = _grad_stats(dy3, x3, mean, groups)
        dw, db = torch.empty_like(weight), torch.empty_like(weight)
        c0, b2 = _empties(groups, c, x.device, 2)
        _launch(kernels().centered_grad_kernel, (triton_cdiv(c, STATE_BLOCK_C),), s1, s2, k, inv, r, d, dw, db,
                c0, b2, groups, c, float(ctx.count), BLOCK_C=STATE_BLOCK_C, num_warps=STATE_WARPS)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            _affine(_as3d(dx), x3, dy3, mean, b2, k, c0, groups)
        grads = (dw if ctx.needs_input_grad[1] else None, db if ctx.needs_input_grad[2] else None)
        return dx, *grads, None, None, None, None, None, None, None


class FusedMABN(torch.autograd.Function):
    """MABN (Yan et al. 2020, Alg. 1-2) in six launches; the backward writes ``ring_gz`` (eager only)."""

    @staticmethod
    def forward(ctx, x, weight, bias, ring_x2, running_var, counter, ring_gz, groups, hp):
        window, warmup, r_after, r_max, momentum, eps = hp
        x3 = _as3d(x)
        c = x3.shape[1]
        chi2, _, t0 = _stats(x3, groups, counter, False)
        k, shift, inv, r = _empties(groups, c, x.device, 4)
        _launch(kernels().mabn_state_kernel, (triton_cdiv(c, STATE_BLOCK_C),), chi2, ring_x2, running_var,
                counter, t0, weight, bias, k, shift, inv, r, groups, c, window, max(groups - window, 0), warmup,
                r_after, r_max, momentum, eps, BLOCK_C=STATE_BLOCK_C, num_warps=STATE_WARPS)
        y = torch.empty_like(x)
        _affine(_as3d(y), x3, None, None, k, None, shift, groups)
        ctx.save_for_backward(x, weight, k, inv, r, t0)
        ctx.ring_gz, ctx.groups, ctx.window, ctx.warmup = ring_gz, groups, window, warmup
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, k, inv, r, t0 = ctx.saved_tensors
        x3, dy3, groups, c = _as3d(x), _dy3(dy), ctx.groups, x.shape[1]
        s1, dot = _grad_stats(dy3, x3, None, groups)
        (psi,) = _empties(groups, c, x.device, 1)
        dw, db = torch.empty_like(weight), torch.empty_like(weight)
        count = float(x3.shape[0] // groups * x3.shape[2])
        _launch(kernels().mabn_grad_kernel, (triton_cdiv(c, STATE_BLOCK_C),), s1, dot, psi, k, inv, r, weight,
                ctx.ring_gz, t0, dw, db, groups, c, count, ctx.window, max(groups - ctx.window, 0), ctx.warmup,
                BLOCK_C=STATE_BLOCK_C, num_warps=STATE_WARPS)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            _affine(_as3d(dx), x3, dy3, None, dot, k, None, groups)
        grads = (dw if ctx.needs_input_grad[1] else None, db if ctx.needs_input_grad[2] else None)
        return dx, *grads, None, None, None, None, None, None
