"""Cross-Iteration Batch Normalization (Yao, Cao, Zheng, Huang, Lin; CVPR 2021, Eq. 5-10).

The mean μ and second moment ν of each of the last k−1 normalization batches are carried to the current
weights W_t of the feeding conv by a first-order Taylor term, μ_{t−τ}(W_t) ≈ μ_{t−τ} + ∂μ_{t−τ}/∂W ·
(W_t − W_{t−τ}) (likewise ν, Eq. 7), and averaged with the current ones over the window of k batches:
μ̄ = mean μ, ν̄ = mean max(ν, μ²) (Eq. 9), σ̄² = max(ν̄ − μ̄², 0); y = γ(x − μ̄)/√(σ̄² + ε) + β.
Gradients flow through the current statistics only (the official code uses ``weight.data`` in the Taylor
term). Until ``burnin_iters`` normalization batches have passed it is plain BN (the paper's burn-in); the
rings are filled from the start, so compensation has its whole window when burn-in ends. Eval and folding
are BN's (running statistics of the current batches). The feeding conv is paired through
``center_conv_weights`` like weight centering. When this layer's input is that conv's output (its autograd
node holds the conv's input), ∂μ_c/∂W_c and ∂ν_c/∂W_c come in closed form as two weight gradients of the
conv on the normalization batch's inputs, with output gradients 1/m and 2y/m (m values per channel): the
cost of two conv backward passes over the device batch. Otherwise (something between conv and norm)
autograd differentiates μ and ν w.r.t. W, one pass per normalization batch. Without a paired conv (or
without autograd, e.g. under ``torch.no_grad``) each batch is normalized by its own statistics and the
rings stay as they are. Under ``torch.compile`` the compensated steps run eager (a graph break around the
layer; ``fullgraph=True`` refuses it): they read the conv's input from its output's autograd node. Every
window slot holds W and two derivatives of W's size: 3(k−1) copies of the conv weight in buffers.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._common import (
    check_group_size,
    check_input,
    check_momentum,
    check_positive,
    empty_forward,
    num_groups,
    stat_dtype,
)
from ._table import register_norm
from .protocol import NormLayer, centered_batch_forward, running_affine
from .registry import NormContext, NormRecipe

RINGS = ("ring_mu", "ring_nu", "ring_dmu", "ring_dnu", "ring_w")


class CrossIterationBatchNorm2d(NormLayer, nn.Module):
    """CBN over groups of ``group_size`` samples (one call on G·n samples == G consecutive calls on n).

    Population statistic: BN's running mean and variance of each batch's own statistics (what eval uses, as
    in the official code); PreciseBN recomputes them as the moments of the layer's input.
    """

    statistic = "mean_var"

    def __init__(self, num_features: int, *, window: int = 4, burnin_iters: int = 0,
                 group_size: int | None = None, eps: float = 1e-5, momentum: float = 0.1, device=None,
                 dtype=None):
        super().__init__()
        self.num_features = num_features
        self.window = int(check_positive("window", window, integer=True))
        self.burnin_iters = int(check_positive("burnin_iters", burnin_iters, integer=True, allow_zero=True))
        self.group_size = check_group_size(group_size)
        self.eps = float(check_positive("eps", eps, allow_zero=True))
        self.momentum = check_momentum(momentum)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))
        # the k−1 previous batches: statistics, their derivatives w.r.t. W and W itself (sized at pairing)
        self.register_buffer("ring_valid", torch.zeros(self.window - 1, **factory))
        for name in RINGS:
            self.register_buffer(name, torch.zeros(0, **factory))
        self.__dict__["_conv"] = None  # a reference, not a submodule: the conv stays where the model has it
        _eager_compensation()

    _compensated = None  # _compensated_steps under torch.compiler.disable, set at the first construction

    def extra_repr(self) -> str:
        return (f"{self.num_features}, window={self.window}, burnin_iters={self.burnin_iters}, "
                f"group_size={self.group_size}, eps={self.eps}, momentum={self.momentum}")

    def eval_affine(self) -> tuple[Tensor, Tensor]:
        return running_affine(self.running_mean, self.running_var, self.weight, self.bias, self.eps)

    @torch.no_grad()
    def restart(self) -> None:
        """Counter to 0 (burn-in starts over) and the window emptied: no batch of before compensates."""
        self.num_batches_tracked.zero_()
        self.ring_valid.zero_()
        for name in RINGS:
            getattr(self, name).zero_()

    def batch_statistics_forward(self, x: Tensor) -> Tensor:
        """Each group by its own statistics, no window: with the weights fixed, the compensated window of
        k batches would only average k batches' statistics (see ``precise_bn``)."""
        return centered_batch_forward(x, self.weight, self.bias, self.eps)

    def pair_conv(self, conv: nn.Module) -> bool:
        """Use ``conv``'s weight for the Taylor compensation (the conv whose output this layer normalizes)."""
        self.__dict__["_conv"] = conv
        w = conv.weight
        k, c = self.window - 1, self.num_features
        for name, shape in (("ring_mu", (k, c)), ("ring_nu", (k, c)), ("ring_dmu", (k, *w.shape)),
                            ("ring_dnu", (k, *w.shape)), ("ring_w", (k, *w.shape))):
            if getattr(self, name).shape != shape:
                setattr(self, name, torch.zeros(shape, device=w.device, dtype=self.running_var.dtype))
        return True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in RINGS:  # ring shapes follow the paired conv: take the checkpoint's
            saved = state_dict.get(prefix + name)
            if saved is not None and getattr(self, name).shape != saved.shape:
                setattr(self, name, torch.zeros_like(saved, device=self.running_var.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _conv_weight(self, x: Tensor) -> Tensor | None:
        conv = self.__dict__["_conv"]
        if conv is None or self.window == 1 or not (torch.is_grad_enabled() and x.requires_grad):
            return None
        w = conv.weight
        ready = isinstance(w, nn.Parameter) and w.requires_grad and self.ring_w.shape[1:] == w.shape
        return w if ready else None

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self.num_features, type(self).__name__)
        if x.shape[0] == 0:
            return empty_forward(x, self.weight, self.bias)
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                self.eps)
        groups, n = num_groups(x.shape[0], self.group_size)
        if n * x[0, 0].numel() < 2:
            raise ValueError(f"CBN needs more than 1 value per channel in a normalization batch, got group "
                             f"of {n} sample(s) of spatial size {tuple(x.shape[2:])}")
        w = self._conv_weight(x)
        if w is None:  # plain grouped BN: compiles into the model's graph
            return torch.cat([self._step(x[g * n:(g + 1) * n], None) for g in range(groups)])
        return self._compensated(x, w, groups, n)

    def _compensated_steps(self, x: Tensor, w: Tensor, groups: int, n: int) -> Tensor:
        """The Taylor-compensated steps. Eager under torch.compile (a graph break around this layer: see
        ``_eager_compensation``): the derivatives read the conv's input from ``x``'s autograd node, which a
        traced graph does not have."""
        conv = conv_of(x, w)
        grads = conv_derivatives(x.to(stat_dtype(x)), w, conv, groups) if conv is not None else None
        # G consecutive normalization batches with the same weights, in order (the grouped contract)
        return torch.cat([self._step(x[g * n:(g + 1) * n], w, None if grads is None else
                                     (grads[0][g], grads[1][g])) for g in range(groups)])

    def _step(self, x: Tensor, w: Tensor | None, grads: tuple[Tensor, Tensor] | None = None) -> Tensor:
        dt = stat_dtype(x)
        xd = x.to(dt)
        dims = (0, *range(2, x.dim()))
        count = x.numel() // x.shape[1]
        mu, nu = xd.mean(dim=dims), xd.square().mean(dim=dims)
        mu_bar, nu_bar = mu, torch.maximum(nu, mu * mu)
        if w is not None:
            mu_bar, nu_bar = self._cross_iteration(mu, nu_bar, w)
            self._push(mu, nu, w, grads or autograd_derivatives(mu, nu, w))
        var = (nu_bar - mu_bar * mu_bar).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            batch_var = (nu - mu * mu).clamp_min(0) * (count / (count - 1))
            self.running_mean.lerp_(mu.detach().to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(batch_var.to(self.running_var.dtype), self.momentum)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = self.weight.to(dt) * torch.rsqrt(var + self.eps)
        y = torch.addcmul((self.bias.to(dt) - mu_bar * scale).view(shape), xd, scale.view(shape))
        return y.to(x.dtype)

    def _cross_iteration(self, mu: Tensor, nu_bar: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        """Window averages of the current and the Taylor-compensated previous statistics (Eq. 7-9)."""
        dt = mu.dtype
        delta = (w.detach().to(dt)[None] - self.ring_w.to(dt)).flatten(2)  # W_t − W_{t−τ}
        mu_prev = self.ring_mu.to(dt) + (self.ring_dmu.to(dt).flatten(2) * delta).sum(dim=-1)
        nu_prev = self.ring_nu.to(dt) + (self.ring_dnu.to(dt).flatten(2) * delta).sum(dim=-1)
        nu_prev = torch.maximum(nu_prev, mu_prev * mu_prev)
        # after burn-in every filled slot counts; during burn-in none (plain BN); no host sync either way
        after = (self.num_batches_tracked >= self.burnin_iters).to(dt)
        use = (self.ring_valid.to(dt) * after)[:, None]
        total = 1 + use.sum()
        return (mu + (use * mu_prev).sum(dim=0)) / total, (nu_bar + (use * nu_prev).sum(dim=0)) / total

    def _push(self, mu: Tensor, nu: Tensor, w: Tensor, grads: tuple[Tensor, Tensor]) -> None:
        """Store this batch's statistics, their derivatives w.r.t. W and W in the rings."""
        dmu, dnu = grads
        with torch.no_grad():
            slot = (self.num_batches_tracked % (self.window - 1)).view(1)
            for name, value in (("ring_mu", mu), ("ring_nu", nu), ("ring_dmu", dmu), ("ring_dnu", dnu),
                                ("ring_w", w)):
                ring = getattr(self, name)
                ring.index_copy_(0, slot, value.detach().to(ring.dtype)[None])
            self.ring_valid.index_fill_(0, slot, 1.0)


def conv_of(y: Tensor, w: Tensor) -> tuple[Tensor, dict] | None:
    """The input and settings of the 2-d convolution with weight ``w`` whose output is ``y`` — read from
    ``y``'s autograd node — or None when ``y`` is not such a conv's direct output."""
    node = y.grad_fn
    if y.dim() != 4 or type(node).__name__ != "ConvolutionBackward0" or node._saved_transposed:
        return None
    src = node.next_functions[1][0]  # the weight's branch; under autocast through a dtype cast
    while type(src).__name__ == "ToCopyBackward0":
        src = src.next_functions[0][0]
    if getattr(src, "variable", None) is not w:
        return None
    return node._saved_input, {"stride": node._saved_stride, "padding": node._saved_padding,
                               "dilation": node._saved_dilation, "groups": node._saved_groups}


def autograd_derivatives(mu: Tensor, nu: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """∂μ/∂W and ∂ν/∂W (summed over channels: row c of W moves channel c only) by autograd, through
    whatever lies between W and this layer's input."""
    ones = torch.ones_like(mu)
    # allow_unused: a conv paired by position whose output is not this input gives zero derivatives
    dmu, = torch.autograd.grad(mu, w, ones, retain_graph=True, allow_unused=True, materialize_grads=True)
    dnu, = torch.autograd.grad(nu, w, ones, retain_graph=True, allow_unused=True, materialize_grads=True)
    return dmu, dnu


def conv_derivatives(y: Tensor, w: Tensor, conv: tuple[Tensor, dict], groups: int) -> tuple[Tensor, Tensor]:
    """∂μ/∂W and ∂ν/∂W of each of ``groups`` normalization batches of the conv output ``y``: (G, *W.shape).

    μ_c = mean(y_c) and ν_c = mean(y_c²) over the m values of a channel are reductions of the conv's
    output, so their derivatives are the conv's weight gradients for output gradients 1/m and 2·y/m. All G
    batches in one call each: batch g's samples become channel group g of a conv with G times the groups."""
    inp, settings = conv
    with torch.no_grad():
        y = y.detach()
        n = y.shape[0] // groups
        m = n * y[0, 0].numel()

        def by_group(t: Tensor) -> Tensor:  # (G·n, C, H, W) -> (n, G·C, H, W)
            return t.unflatten(0, (groups, n)).transpose(0, 1).flatten(1, 2)

        x = by_group(inp.detach().to(y.dtype))
        shape = (groups * w.shape[0], *w.shape[1:])
        grouped = {**settings, "groups": settings["groups"] * groups}

        def weight_grad(grad_out: Tensor) -> Tensor:
            return torch.nn.grad.conv2d_weight(x, shape, by_group(grad_out), **grouped).unflatten(0, (groups, -1))
        return weight_grad(torch.full_like(y, 1.0 / m)), weight_grad(y * (2.0 / m))


@register_norm("cbn", types=(CrossIterationBatchNorm2d,),
               defaults={"window": 4, "burnin_iters": None, "eps": 1e-5, "momentum": 0.1},
               batch_dependent=True, foldable=True)
def _build_cbn(p: dict, ctx: NormContext) -> NormRecipe:
    # Official COCO setting: window 4 (the current and 3 previous batches), burn-in 8 of 12 epochs; burn-in
    # defaults to 2/3 of the run when its length is known.
    burnin = p["burnin_iters"]
    if burnin is None:
        burnin = (2 * ctx.total_iters) // 3 if ctx.total_iters else 0
    ctor = functools.partial(CrossIterationBatchNorm2d, window=p["window"], burnin_iters=ctx.iters(burnin),
                             group_size=ctx.group_size, eps=p["eps"], momentum=p["momentum"])
    return NormRecipe("cbn", ctor, pairs_convs=True, params={**p, "burnin_iters": burnin})


def _eager_compensation() -> None:
    """Mark the compensated steps eager for torch.compile, once, when the first layer is built (before anything
    can compile it): ``torch.compiler.disable`` imports dynamo, over a second that ``import mabn.norms`` need
    not pay."""
    cls = CrossIterationBatchNorm2d
    if cls._compensated is None:
        cls._compensated = torch.compiler.disable(cls._compensated_steps)
