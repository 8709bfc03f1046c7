"""Triton kernels of the fused BN / BRN / MABN path (launched by ``_fused``; imported on first use).

Activations are seen as (N, C, S) with any strides (NCHW and NHWC both flatten to a view), in tiles of
BLOCK_M rows (sample, position) by BLOCK_C channels. The reductions (``stats``, ``grad_stats``) split each
group's rows into K chunks (``_plan``) and write (G, K, C) float32 partials; the state kernels run one program
per channel block, merge each group's chunks in chunk order (Chan's merge of count/mean/M2, or sums: exact up
to rounding and deterministic, no atomics) and walk the G groups in order, so rings, EMAs and counters take the
same sequential updates as G consecutive calls. Per-(group, channel) coefficients are (G, C) float32 tensors.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(base, g, c, m0, n, C, S, sn, sc, ss, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets and mask of rows m0..m0+BLOCK_M of group g (rows = sample-in-group x position)."""
    m = m0 + tl.arange(0, BLOCK_M)
    i = m // S
    s = m - i * S
    row = (g * n + i).to(tl.int64) * sn + s.to(tl.int64) * ss
    off = row[:, None] + c.to(tl.int64)[None, :] * sc
    mask = (m < n * S)[:, None] & (c < C)[None, :]
    return base + off, mask


@triton.jit
def _chunk_rows(k, R, rows):
    """First row and row count of chunk k (rows k·R .. min((k+1)·R, rows) − 1; none past the end)."""
    lo = k * R
    return lo, tl.maximum(tl.minimum(R, rows - lo), 0)


@triton.jit
def stats_kernel(x_ptr, p1_ptr, p2_ptr, cnt_ptr, t0_ptr, n, C, S, sn, sc, ss, K, R,
                 CENTERED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Chunk k of group g, one pass over its rows: mean and M2 = Σ(x − mean)² (CENTERED; tiles merged by
    Chan's formula, so no E[x²] − E[x]² cancellation) or Σx², into (G, K, C) partials."""
    g = tl.program_id(0) // K
    k = tl.program_id(0) % K
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    lo, count = _chunk_rows(k, R, n * S)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)  # Σx² (not CENTERED) or M2
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    seen = tl.zeros([BLOCK_C], dtype=tl.float32)  # rows merged so far (the same in every channel)
    for m0 in range(lo, lo + count, BLOCK_M):
        ptr, mask = _tile(x_ptr, g, c, m0, n, C, S, sn, sc, ss, BLOCK_M, BLOCK_C)
        mask &= (m0 + tl.arange(0, BLOCK_M) < lo + count)[:, None]
        xv = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        if CENTERED:
            nb = tl.minimum(BLOCK_M, lo + count - m0).to(tl.float32)
            tile_mean = tl.sum(xv, axis=0) / nb
            d = tl.where(mask, xv - tile_mean[None, :], 0.0)
            tile_m2 = tl.sum(d * d, axis=0)
            total = seen + nb
            delta = tile_mean - mean
            mean += delta * (nb / total)
            acc += tile_m2 + delta * delta * (seen * nb / total)
            seen = total
        else:
            acc += tl.sum(xv * xv, axis=0)
    out = (g * K + k) * C + c
    tl.store(p1_ptr + out, mean if CENTERED else acc, mask=c < C)
    if CENTERED:
        tl.store(p2_ptr + out, acc, mask=c < C)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):  # the counter before this call, for the state kernel
        tl.store(t0_ptr, tl.load(cnt_ptr))


@triton.jit
def _merged(p1_ptr, p2_ptr, g, K, R, rows, c, C, CENTERED: tl.constexpr):
    """Group g's statistic from its K chunk partials, in chunk order: (mean, biased variance) by Chan's
    pairwise merge, or the mean of x²."""
    cm = c < C
    mean = tl.zeros_like(c).to(tl.float32)
    acc = tl.zeros_like(c).to(tl.float32)
    seen = tl.zeros_like(c).to(tl.float32)
    for k in range(0, K):
        _, nb = _chunk_rows(k, R, rows)
        nbf = nb.to(tl.float32)
        p1 = tl.load(p1_ptr + (g * K + k) * C + c, mask=cm, other=0.0)
        if CENTERED:
            m2 = tl.load(p2_ptr + (g * K + k) * C + c, mask=cm, other=0.0)
            total = seen + nbf
            delta = p1 - mean
            frac = tl.where(total > 0, nbf / tl.maximum(total, 1.0), 0.0)
            mean += delta * frac
            acc += m2 + delta * delta * seen * frac
            seen = total
        else:
            acc += p1
    return mean, acc / rows


@triton.jit
def grad_stats_kernel(dy_ptr, x_ptr, mean_ptr, s1_ptr, s2_ptr, n, C, S, dsn, dsc, dss, sn, sc, ss, K, R,
                      HAS_MEAN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Chunk k of group g: Σ dy and Σ dy·(x − mean) (Σ dy·x without a mean), into (G, K, C) partials."""
    g = tl.program_id(0) // K
    k = tl.program_id(0) % K
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    lo, count = _chunk_rows(k, R, n * S)
    mean = tl.load(mean_ptr + g * C + c, mask=c < C, other=0.0) if HAS_MEAN else tl.zeros([BLOCK_C], tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for m0 in range(lo, lo + count, BLOCK_M):
        dptr, mask = _tile(dy_ptr, g, c, m0, n, C, S, dsn, dsc, dss, BLOCK_M, BLOCK_C)
        mask &= (m0 + tl.arange(0, BLOCK_M) < lo + count)[:, None]
        xptr, _ = _tile(x_ptr, g, c, m0, n, C, S, sn, sc, ss, BLOCK_M, BLOCK_C)
        dyv = tl.load(dptr, mask=mask, other=0.0).to(tl.float32)
        xv = tl.where(mask, tl.load(xptr, mask=mask, other=0.0).to(tl.float32) - mean[None, :], 0.0)
        acc1 += dyv
        acc2 += dyv * xv
    out = (g * K + k) * C + c
    tl.store(s1_ptr + out, tl.sum(acc1, axis=0), mask=c < C)
    tl.store(s2_ptr + out, tl.sum(acc2, axis=0), mask=c < C)


@triton.jit
def _chunk_sum(p_ptr, g, K, c, C):
    """Σ over group g's K chunk partials, in chunk order."""
    acc = tl.zeros_like(c).to(tl.float32)
    for k in range(0, K):
        acc += tl.load(p_ptr + (g * K + k) * C + c, mask=c < C, other=0.0)
    return acc


@triton.jit
def affine_kernel(out_ptr, x_ptr, dy_ptr, mean_ptr, a_ptr, b_ptr, c_ptr, N, n, C, S, osn, osc, oss,
                  sn, sc, ss, dsn, dsc, dss, HAS_MEAN: tl.constexpr, HAS_DY: tl.constexpr, HAS_C: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = (x − mean)·a + dy·b + c elementwise, a, b, c, mean per (group, channel)."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    i = m // S
    s = (m - i * S).to(tl.int64)
    mask = (m < N * S)[:, None] & (c < C)[None, :]
    stat = (i // n)[:, None] * C + c[None, :]
    i, c64 = i.to(tl.int64), c.to(tl.int64)
    xv = tl.load(x_ptr + (i * sn + s * ss)[:, None] + c64[None, :] * sc, mask=mask, other=0.0).to(tl.float32)
    if HAS_MEAN:
        xv -= tl.load(mean_ptr + stat, mask=mask, other=0.0)
    out = xv * tl.load(a_ptr + stat, mask=mask, other=0.0)
    if HAS_DY:
        dyv = tl.load(dy_ptr + (i * dsn + s * dss)[:, None] + c64[None, :] * dsc, mask=mask, other=0.0)
        out += dyv.to(tl.float32) * tl.load(b_ptr + stat, mask=mask, other=0.0)
    if HAS_C:
        out += tl.load(c_ptr + stat, mask=mask, other=0.0)
    optr = out_ptr + (i * osn + s * oss)[:, None] + c64[None, :] * osc
    tl.store(optr, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _window_mean(ring_ptr, new_ptr, g, t0, c, C, window):
    """SMA of the ``window`` batches ending at new batch g: old ring slots first, then new values (G, C)."""
    acc = tl.zeros_like(c).to(tl.float32)
    cm = c < C
    for j in range(g + 1, g + 1 + window):
        slot = (t0 + 1 + j) % window
        old = tl.load(ring_ptr + slot * C + c, mask=cm & (j < window), other=0.0)
        new = tl.load(new_ptr + (j - window) * C + c, mask=cm & (j >= window), other=0.0)
        acc += old + new
    return acc / window


@triton.jit
def _push_ring(ring_ptr, new_ptr, t0, start, G, c, C, window):
    """Write new values start..G-1 (the last min(G, window)) into their slots (t mod window); reads are done."""
    tl.debug_barrier()
    for g in range(start, G):
        val = tl.load(new_ptr + g * C + c, mask=c < C)
        tl.store(ring_ptr + ((t0 + 1 + g) % window) * C + c, val, mask=c < C)


@triton.jit
def mabn_state_kernel(part_ptr, chi2_ptr, ring_ptr, rv_ptr, cnt_ptr, t0_ptr, w_ptr, b_ptr, k_ptr, shift_ptr,
                      inv_ptr, r_ptr, G, C, K, R, rows, window, ring_start, warmup, r_after, r_max, momentum, eps,
                      BLOCK_C: tl.constexpr):
    """MABN forward state (Yan et al. 2020, Alg. 1, G groups in order): χ²_g from the chunk partials, then
    χ̄², r, v; k = γ·r/√(χ̄²+ε)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    t0 = tl.load(t0_ptr)
    for g in range(0, G):
        _, chi2 = _merged(part_ptr, part_ptr, g, K, R, rows, c, C, False)
        tl.store(chi2_ptr + g * C + c, chi2, mask=cm)
    tl.debug_barrier()
    v = tl.load(rv_ptr + c, mask=cm, other=1.0)
    gamma = tl.load(w_ptr + c, mask=cm, other=1.0)
    beta = tl.load(b_ptr + c, mask=cm, other=0.0)
    for g in range(0, G):
        t = t0 + 1 + g
        chi2 = tl.load(chi2_ptr + g * C + c, mask=cm, other=1.0)
        sma = _window_mean(ring_ptr, chi2_ptr, g, t0, c, C, window)
        bar = tl.where((t > window) & (t >= warmup), sma, chi2)
        ratio = tl.sqrt(bar + eps) / tl.sqrt(v + eps)
        r = tl.where(t > r_after, tl.minimum(tl.maximum(ratio, 1.0 / r_max), r_max), 1.0)
        inv = 1.0 / tl.sqrt(bar + eps)
        tl.store(inv_ptr + g * C + c, inv, mask=cm)
        tl.store(r_ptr + g * C + c, r, mask=cm)
        tl.store(k_ptr + g * C + c, gamma * r * inv, mask=cm)
        tl.store(shift_ptr + g * C + c, beta, mask=cm)
        v = (1.0 - momentum) * v + momentum * bar
    tl.store(rv_ptr + c, v, mask=cm)
    _push_ring(ring_ptr, chi2_ptr, t0, ring_start, G, c, C, window)
    if tl.program_id(0) == 0:
        tl.store(cnt_ptr, t0 + G)


@triton.jit
def mabn_grad_kernel(s1_ptr, dot_ptr, psi_ptr, xterm_ptr, k_ptr, inv_ptr, r_ptr, w_ptr, ring_ptr, t0_ptr, dw_ptr,
                     db_ptr, G, C, K, count, window, ring_start, warmup, BLOCK_C: tl.constexpr):
    """MABN backward statistics (Alg. 2): Ψ into ring_gz, Ψ̄, dγ, dβ from the chunk partials of Σdy and Σdy·x;
    xterm = −s²·Ψ̄ (dx's x term). Every Ψ_t is written (first loop) before the window reads it (second loop),
    a barrier between."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    t0 = tl.load(t0_ptr)
    gamma = tl.load(w_ptr + c, mask=cm, other=1.0)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for g in range(0, G):
        dot = _chunk_sum(dot_ptr, g, K, c, C)
        inv = tl.load(inv_ptr + g * C + c, mask=cm, other=0.0)
        r = tl.load(r_ptr + g * C + c, mask=cm, other=0.0)
        tl.store(psi_ptr + g * C + c, gamma * r * inv * dot / count, mask=cm)  # Ψ_t = mean(ĝ·z)
        dw += r * inv * dot
        db += _chunk_sum(s1_ptr, g, K, c, C)
    tl.store(dw_ptr + c, dw.to(dw_ptr.dtype.element_ty), mask=cm)
    tl.store(db_ptr + c, db.to(db_ptr.dtype.element_ty), mask=cm)
    tl.debug_barrier()
    for g in range(0, G):
        t = t0 + 1 + g
        psi = tl.load(psi_ptr + g * C + c, mask=cm, other=0.0)
        sma = _window_mean(ring_ptr, psi_ptr, g, t0, c, C, window)
        bar = tl.where((t > window) & (t >= warmup), sma, psi)
        inv = tl.load(inv_ptr + g * C + c, mask=cm, other=0.0)
        tl.store(xterm_ptr + g * C + c, -inv * inv * bar, mask=cm)
    _push_ring(ring_ptr, psi_ptr, t0, ring_start, G, c, C, window)


@triton.jit
def centered_state_kernel(p1_ptr, p2_ptr, mean_ptr, rm_ptr, rv_ptr, cnt_ptr, t0_ptr, w_ptr, b_ptr, k_ptr,
                          shift_ptr, inv_ptr, r_ptr, d_ptr, G, C, K, R, rows, unbias, momentum, eps, r_max, d_max,
                          warmup, r_end, d_end, RENORM: tl.constexpr, BLOCK_C: tl.constexpr):
    """BN / BRN forward state (Ioffe 2017, Alg. 1, G groups in order): each group's mean and variance merged
    from its chunk partials, r, d, running stats; k and shift."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    t0 = tl.load(t0_ptr)
    mu = tl.load(rm_ptr + c, mask=cm, other=0.0)
    v = tl.load(rv_ptr + c, mask=cm, other=1.0)
    gamma = tl.load(w_ptr + c, mask=cm, other=1.0)
    beta = tl.load(b_ptr + c, mask=cm, other=0.0)
    for g in range(0, G):
        mean, var = _merged(p1_ptr, p2_ptr, g, K, R, rows, c, C, True)
        tl.store(mean_ptr + g * C + c, mean, mask=cm)
        inv = 1.0 / tl.sqrt(var + eps)
        r = tl.full([BLOCK_C], 1.0, tl.float32)
        d = tl.zeros([BLOCK_C], dtype=tl.float32)
        if RENORM:
            t = (t0 + 1 + g).to(tl.float64)
            lim_r = (1.0 + (r_max - 1.0) * tl.minimum(tl.maximum((t - warmup) / r_end, 0.0), 1.0))
            lim_d = (d_max * tl.minimum(tl.maximum((t - warmup) / d_end, 0.0), 1.0))
            lim_r, lim_d = lim_r.to(tl.float32), lim_d.to(tl.float32)
            sigma = tl.sqrt(v + eps)
            r = tl.minimum(tl.maximum(tl.sqrt(var + eps) / sigma, 1.0 / lim_r), lim_r)
            d = tl.minimum(tl.maximum((mean - mu) / sigma, -lim_d), lim_d)
        k = gamma * r * inv
        tl.store(inv_ptr + g * C + c, inv, mask=cm)
        tl.store(r_ptr + g * C + c, r, mask=cm)
        tl.store(d_ptr + g * C + c, d, mask=cm)
        tl.store(k_ptr + g * C + c, k, mask=cm)
        tl.store(shift_ptr + g * C + c, beta + gamma * d, mask=cm)
        mu = (1.0 - momentum) * mu + momentum * mean
        v = (1.0 - momentum) * v + momentum * (var * unbias)
    tl.store(rm_ptr + c, mu, mask=cm)
    tl.store(rv_ptr + c, v, mask=cm)
    if tl.program_id(0) == 0:
        tl.store(cnt_ptr, t0 + G)


@triton.jit
def centered_grad_kernel(s1_ptr, s2_ptr, k_ptr, inv_ptr, r_ptr, d_ptr, dw_ptr, db_ptr, c0_ptr, b2_ptr, G, C, K,
                         count, BLOCK_C: tl.constexpr):
    """BN / BRN backward statistics from the chunk partials: dγ, dβ, and dx's terms c0 = −k·Σdy/N,
    b2 = −k·s·Σdy·x̂/N."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for g in range(0, G):
        s1 = _chunk_sum(s1_ptr, g, K, c, C)
        inv = tl.load(inv_ptr + g * C + c, mask=cm, other=0.0)
        s2 = _chunk_sum(s2_ptr, g, K, c, C) * inv  # Σ dy·x̂
        k = tl.load(k_ptr + g * C + c, mask=cm, other=0.0)
        dw += tl.load(r_ptr + g * C + c, mask=cm, other=0.0) * s2 + tl.load(d_ptr + g * C + c, mask=cm,
                                                                            other=0.0) * s1
        db += s1
        tl.store(c0_ptr + g * C + c, -k * s1 / count, mask=cm)
        tl.store(b2_ptr + g * C + c, -k * inv * s2 / count, mask=cm)
    tl.store(dw_ptr + c, dw.to(dw_ptr.dtype.element_ty), mask=cm)
    tl.store(db_ptr + c, db.to(db_ptr.dtype.element_ty), mask=cm)
