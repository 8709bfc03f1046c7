"""Independent float64 re-statements of the papers' sequential equations, one normalization batch at a time.

Written from the MABN paper (Yan et al. 2020, Alg. 1-2) and Ioffe 2017 as plainly as possible:
Python loops, explicit ring buffers, hand-written backward. The layers under test share no code with this.
"""

from __future__ import annotations

import torch


class RefMABN:
    """The official formal MABN layer, sequential form; t counts normalization batches from 1.

    The ablations, stated as plainly: ``forward_stat`` / ``backward_stat`` "batch" use χ²_t / Ψ_t of the
    current batch in every phase; ``average`` "ema" replaces each window mean by e_t = (1−α)e_{t−1} + α·s_t,
    α = 2/(m+1), e_1 = s_1; ``renorm_on`` False keeps r = 1.
    """

    def __init__(self, channels, window, warmup, renorm, r_max=5.0, eps=1e-5, momentum=0.02,
                 forward_stat="sma", backward_stat="sma", average="sma", renorm_on=True):
        self.m, self.warmup, self.renorm, self.r_max = window, warmup, renorm, r_max
        self.eps, self.alpha = eps, momentum
        self.forward_stat, self.backward_stat, self.average, self.renorm_on = (
            forward_stat, backward_stat, average, renorm_on)
        self.ring_x2 = torch.zeros(window, channels, dtype=torch.float64)
        self.ring_gz = torch.zeros(window, channels, dtype=torch.float64)
        self.ema_x2 = torch.zeros(channels, dtype=torch.float64)
        self.ema_gz = torch.zeros(channels, dtype=torch.float64)
        self.v = torch.ones(channels, dtype=torch.float64)
        self.t = 0
        self.ratio = None  # √(χ̄²+ε)/√(v+ε) of the last step, before clipping

    def push(self, name, value):
        """Record the statistic of batch t; return its average (window mean or EMA) ending at t."""
        t = self.t
        if self.average == "sma":
            ring = getattr(self, "ring_" + name)
            ring[t % self.m] = value
            return ring.mean(dim=0)
        a = 2.0 / (self.m + 1)
        ema = value.clone() if t == 1 else (1 - a) * getattr(self, "ema_" + name) + a * value
        setattr(self, "ema_" + name, ema)
        return ema

    def step(self, x, gamma, beta, dy):
        """Forward then backward of normalization batch t+1: returns y, dx, dgamma, dbeta."""
        self.t += 1
        t, m, eps = self.t, self.m, self.eps
        dims = (0, 2, 3)
        chi2 = (x * x).mean(dim=dims)
        avg_x2 = self.push("x2", chi2)
        plain = t <= m or t < self.warmup
        chi2_bar = chi2 if plain or self.forward_stat == "batch" else avg_x2
        std = torch.sqrt(chi2_bar + eps)
        z = x / std.view(1, -1, 1, 1)
        self.ratio = std / torch.sqrt(self.v + eps)
        if t <= max(self.renorm, self.warmup) or not self.renorm_on:
            r = torch.ones_like(chi2_bar)
        else:
            r = self.ratio.clamp(1 / self.r_max, self.r_max)
        y = gamma.view(1, -1, 1, 1) * r.view(1, -1, 1, 1) * z + beta.view(1, -1, 1, 1)
        self.v = (1 - self.alpha) * self.v + self.alpha * chi2_bar
        # backward
        ghat = (r * gamma).view(1, -1, 1, 1) * dy
        psi = (ghat * z).mean(dim=dims)
        avg_gz = self.push("gz", psi)
        psi_bar = psi if plain or self.backward_stat == "batch" else avg_gz
        dx = (ghat - z * psi_bar.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        dgamma = (dy * r.view(1, -1, 1, 1) * z).sum(dim=dims)
        dbeta = dy.sum(dim=dims)
        self.used = {"chi2_bar": chi2_bar, "r": r, "psi": psi, "psi_bar": psi_bar}
        return y, dx, dgamma, dbeta


class RefBRN:
    """Batch Renormalization, Ioffe 2017 Algorithm 1, with the linear r_max/d_max schedule."""

    def __init__(self, channels, r_max, d_max, warmup, r_max_iters, d_max_iters, eps=1e-5, momentum=0.1):
        self.r_max, self.d_max, self.warmup = r_max, d_max, warmup
        self.r_iters, self.d_iters, self.eps, self.alpha = r_max_iters, d_max_iters, eps, momentum
        self.mu = torch.zeros(channels, dtype=torch.float64)
        self.var = torch.ones(channels, dtype=torch.float64)
        self.t = 0

    def limits(self, t):
        def ramp(end):
            return min(max((t - self.warmup) / max(end - self.warmup, 1), 0.0), 1.0)
        return 1 + (self.r_max - 1) * ramp(self.r_iters), self.d_max * ramp(self.d_iters)

    def forward(self, x, gamma, beta):
        """Training forward (autograd through μ_B, σ_B; r and d are constants); updates the state."""
        self.t += 1
        rmax, dmax = self.limits(self.t)
        count = x.numel() // x.shape[1]
        mu_b = x.mean(dim=(0, 2, 3))
        var_b = ((x - mu_b.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
        sigma_b = torch.sqrt(var_b + self.eps)
        sigma = torch.sqrt(self.var + self.eps)
        r = (sigma_b.detach() / sigma).clamp(1 / rmax, rmax)
        d = ((mu_b.detach() - self.mu) / sigma).clamp(-dmax, dmax)
        xhat = (x - mu_b.view(1, -1, 1, 1)) / sigma_b.view(1, -1, 1, 1) * r.view(1, -1, 1, 1) + d.view(1, -1, 1, 1)
        self.mu = self.mu + self.alpha * (mu_b.detach() - self.mu)
        self.var = self.var + self.alpha * (var_b.detach() * count / (count - 1) - self.var)
        return gamma.view(1, -1, 1, 1) * xhat + beta.view(1, -1, 1, 1)


def isclose_report(a, b, name, rtol=1e-10, atol=1e-12):
    """assert_close with a message naming the quantity."""
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")



def ref_group_norm(x, groups, gamma, beta, eps):
    """GroupNorm (Wu & He 2018, Eq. 1-3): each sample's group of C/G channels × H×W, biased variance."""
    n, c = x.shape[:2]
    per = c // groups
    samples = []
    for i in range(n):
        parts = []
        for g in range(groups):
            block = x[i, g * per:(g + 1) * per]
            mu = block.sum() / block.numel()
            var = ((block - mu) ** 2).sum() / block.numel()
            parts.append((block - mu) / torch.sqrt(var + eps))
        samples.append(torch.cat(parts))
    return torch.stack(samples) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


def ref_weight_standardization(weight, eps):
    """Qiao et al. 2019, Eq. 5-6 as their official code: (W − mean) / (unbiased std + ε) per output filter."""
    filters = []
    for o in range(weight.shape[0]):
        w = weight[o]
        k = w.numel()
        mu = w.sum() / k
        std = torch.sqrt(((w - mu) ** 2).sum() / (k - 1))
        filters.append((w - mu) / (std + eps))
    return torch.stack(filters)


def ref_evonorm_s0(x, groups, v, gamma, beta, eps):
    """EvoNorm-S0 (Liu et al. 2020, Table 1): x·σ(v·x) / √(Var_group(x) + ε)·γ + β, biased group variance."""
    n, c = x.shape[:2]
    per = c // groups
    samples = []
    for i in range(n):
        channels = []
        for g in range(groups):
            block = x[i, g * per:(g + 1) * per]
            mu = block.sum() / block.numel()
            std = torch.sqrt(((block - mu) ** 2).sum() / block.numel() + eps)
            for k in range(per):
                ch = g * per + k
                xc = x[i, ch]
                channels.append(xc / (1 + torch.exp(-v[ch] * xc)) / std * gamma[ch] + beta[ch])
        samples.append(torch.stack(channels))
    return torch.stack(samples)


def ref_frn_tlu(x, gamma, beta, tau, eps, tlu=True):
    """FRN + TLU (Singh & Krishnan 2020, Eq. 1-5): ν² = mean_HW(x²), y = γx/√(ν²+|ε|) + β, z = max(y, τ)."""
    n, c = x.shape[:2]
    samples = []
    for i in range(n):
        channels = []
        for ch in range(c):
            xc = x[i, ch]
            nu2 = (xc * xc).sum() / xc.numel()
            y = gamma[ch] * xc / torch.sqrt(nu2 + abs(eps)) + beta[ch]
            channels.append(torch.where(y > tau[ch], y, tau[ch]) if tlu else y)
        samples.append(torch.stack(channels))
    return torch.stack(samples)
