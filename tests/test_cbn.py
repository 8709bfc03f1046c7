"""Cross-Iteration BN: float64 compensated statistics against a hand-computed Taylor term, burn-in, the
grouped contract with a paired conv, resume, folding."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mabn.fold import fold_norms
from mabn.models import build_model
from mabn.norms import CrossIterationBatchNorm2d, NormContext, build_norm, center_conv_weights

from .reference import isclose_report

EPS = 1e-5


def _paired(window=3, burnin=2, group_size=None, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False).double()
    norm = CrossIterationBatchNorm2d(3, window=window, burnin_iters=burnin, group_size=group_size).double()
    net = nn.Sequential(conv, norm)
    assert center_conv_weights(net) == ["0"]
    return net


def _taylor_stats(inp, w_then, w_now):
    """μ and ν of conv(inp, w_then) per channel, carried to w_now by the first-order term (Yao et al., Eq. 7).

    ∂μ_c/∂W_c is the mean input patch, ∂ν_c/∂W_c = 2·mean(y_c·patch) (patches from unfold, by hand).
    """
    y = F.conv2d(inp, w_then, padding=1)  # (N, C, H, W)
    patches = F.unfold(inp, 3, padding=1)  # (N, Cin·9, L)
    m = y.shape[0] * y.shape[2] * y.shape[3]
    mu, nu = y.mean(dim=(0, 2, 3)), (y * y).mean(dim=(0, 2, 3))
    delta = (w_now - w_then).flatten(1)  # (C, Cin·9)
    dmu = patches.sum(dim=(0, 2)) / m  # the same mean patch for every output channel
    dnu = 2 * torch.einsum("ncl,nkl->ck", y.flatten(2), patches) / m
    return mu + delta @ dmu, nu + (dnu * delta).sum(dim=1)


def _expected(history, inp, w, window, burnin, t):
    """The layer's output (γ = 1, β = 0) at normalization batch t from the sequence of (input, weights)."""
    out = F.conv2d(inp, w, padding=1)
    mus, nus = [out.mean(dim=(0, 2, 3))], [(out * out).mean(dim=(0, 2, 3))]
    if t > burnin:  # compensation only after burn-in; before, plain BN
        for old_inp, old_w in history[-(window - 1):]:
            mu, nu = _taylor_stats(old_inp, old_w, w.detach())
            mus.append(mu)
            nus.append(nu)
    mu_bar = sum(mus) / len(mus)
    nu_bar = sum(torch.maximum(nu, mu * mu) for mu, nu in zip(mus, nus, strict=True)) / len(mus)
    var = (nu_bar - mu_bar ** 2).clamp_min(0)
    return (out - mu_bar.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + EPS)


def test_compensated_statistics_and_burn_in_match_hand_computed_taylor_term():
    window, burnin = 3, 2
    net = _paired(window, burnin)
    conv = net[0]
    gen = torch.Generator().manual_seed(1)
    history = []
    for t in range(1, 8):
        inp = torch.randn(2, 2, 5, 4, generator=gen, dtype=torch.float64) + 0.3 * t
        dy = torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64)
        x1 = inp.clone().requires_grad_(True)
        conv.zero_grad()
        y = net(x1)
        y.backward(dy)
        got_dw = conv.weight.grad.clone()
        w = conv.weight.detach().clone().requires_grad_(True)
        x2 = inp.clone().requires_grad_(True)
        expected = _expected(history, x2, w, window, burnin, t)
        expected.backward(dy)
        isclose_report(y, expected, f"output at t={t}")
        isclose_report(x1.grad, x2.grad, f"input grad at t={t}")
        isclose_report(got_dw, w.grad, f"conv weight grad at t={t}")
        if t <= burnin:  # the burn-in switch: plain BN of the current batch
            out = F.conv2d(inp, conv.weight.detach(), padding=1)
            plain = F.batch_norm(out, None, None, training=True, eps=EPS)
            isclose_report(y.detach(), plain, f"burn-in output at t={t}", rtol=1e-8, atol=1e-9)
        history.append((inp, conv.weight.detach().clone()))
        with torch.no_grad():  # an optimizer step: the weights move between batches
            conv.weight.add_(0.05 * torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
    mean_taylor = _taylor_stats(history[-1][0], history[-1][1], conv.weight.detach())[0]
    exact = F.conv2d(history[-1][0], conv.weight.detach(), padding=1).mean(dim=(0, 2, 3))
    isclose_report(mean_taylor, exact, "μ is linear in W: its first-order term is exact")


@pytest.mark.parametrize("n,groups", [(1, 4), (2, 3)])
def test_grouped_equals_sequential_with_a_paired_conv(n, groups):
    grouped = _paired(window=3, burnin=2, group_size=n)
    seq = copy.deepcopy(grouped)
    seq[1].group_size = None
    assert seq[1].__dict__["_conv"] is seq[0]  # the copy's norm uses the copy's conv
    gen = torch.Generator().manual_seed(2)
    for call in range(3):
        inp = torch.randn(groups * n, 2, 4, 3, generator=gen, dtype=torch.float64) + call
        dy = torch.randn(groups * n, 3, 4, 3, generator=gen, dtype=torch.float64)
        xg = inp.clone().requires_grad_(True)
        grouped.zero_grad()
        yg = grouped(xg)
        yg.backward(dy)
        seq.zero_grad()
        ys, dxs = [], []
        for g in range(groups):
            xs = inp[g * n:(g + 1) * n].clone().requires_grad_(True)
            y = seq(xs)
            y.backward(dy[g * n:(g + 1) * n])
            ys.append(y.detach())
            dxs.append(xs.grad)
        isclose_report(yg, torch.cat(ys), f"output, call {call}")
        isclose_report(xg.grad, torch.cat(dxs), f"input grad, call {call}")
        for (name, p), q in zip(grouped.named_parameters(), seq.parameters(), strict=True):
            isclose_report(p.grad, q.grad, f"{name} grad, call {call}")
        for key, value in grouped.state_dict().items():
            isclose_report(value.double(), seq.state_dict()[key].double(), f"{key}, call {call}")
        with torch.no_grad():
            for p, q in zip(grouped.parameters(), seq.parameters(), strict=True):
                step = 0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
                p.add_(step), q.add_(step)


def test_resume_continues_exactly():
    gen = torch.Generator().manual_seed(3)
    data = [torch.randn(4, 2, 4, 4, generator=gen, dtype=torch.float64) for _ in range(5)]
    a = _paired(window=3, burnin=1)
    for inp in data[:3]:
        a(inp.requires_grad_(True)).sum().backward()
    b = _paired(window=3, burnin=1, seed=9)
    b.load_state_dict(a.state_dict())
    fresh = CrossIterationBatchNorm2d(3, window=3)  # unpaired: ring shapes come from the checkpoint
    fresh.load_state_dict(a[1].state_dict())
    assert fresh.ring_dmu.shape == a[1].ring_dmu.shape == (2, 3, 2, 3, 3)
    for inp in data[3:]:
        ya, yb = a(inp.clone().requires_grad_(True)), b(inp.clone().requires_grad_(True))
        isclose_report(ya, yb, "output after resume")
        ya.sum().backward(), yb.sum().backward()


def test_without_autograd_it_is_plain_bn_and_leaves_the_rings():
    net = _paired(window=3, burnin=0)
    net(torch.randn(4, 2, 4, 4, dtype=torch.float64, requires_grad=True)).sum().backward()
    rings = {k: v.clone() for k, v in net[1].state_dict().items() if k.startswith("ring")}
    with torch.no_grad():
        inp = torch.randn(4, 2, 4, 4, dtype=torch.float64)
        y = net(inp)
        plain = F.batch_norm(net[0](inp), None, None, training=True, eps=EPS)
    isclose_report(y, plain, "no-grad training forward", rtol=1e-8, atol=1e-9)
    for k, v in rings.items():
        assert torch.equal(net[1].state_dict()[k], v), k


def test_cbn_resnet_trains_and_folds():
    recipe = build_norm({"name": "cbn", "burnin_iters": 1}, NormContext(norm_batch=2, device_batch=4))
    model = build_model("resnet18", recipe, num_classes=4)
    assert recipe.pairs_convs and len(center_conv_weights(model)) == 20
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        logits = model(torch.randn(4, 3, 32, 32) + 0.5)
        nn.functional.cross_entropy(logits, torch.randint(0, 4, (4,))).backward()
        opt.step()
    cbns = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert all(int(m.ring_valid.sum()) == 3 for m in cbns)  # window 4: the 3 previous batches
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        folded, report = fold_norms(model, return_report=True)
        expected = model(x)
        assert ((folded(x) - expected).abs().max() / expected.abs().max()).item() <= 1e-5
    assert len(report.folded) == 20 and not report.kept


@pytest.mark.parametrize("stride,groups,dilation", [(1, 1, 1), (2, 2, 1), (1, 1, 2)])
def test_closed_form_derivatives_equal_autograd(monkeypatch, stride, groups, dilation):
    """∂μ/∂W and ∂ν/∂W from the conv's weight gradient (all normalization batches in one grouped call) equal
    autograd through the conv, for strided, grouped and dilated convs, and the training runs coincide."""
    import mabn.norms.cbn as cbn

    def net():
        torch.manual_seed(4)
        conv = nn.Conv2d(4, 6, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups,
                         bias=False).double()
        pair = nn.Sequential(conv, CrossIterationBatchNorm2d(6, window=3, group_size=2).double())
        assert center_conv_weights(pair) == ["0"]
        return pair

    closed, reference = net(), net()
    used = []
    real = cbn.conv_derivatives
    monkeypatch.setattr(cbn, "conv_derivatives", lambda *a: used.append(1) or real(*a))
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        inp = torch.randn(6, 4, 7, 6, generator=gen, dtype=torch.float64) + step
        dy = torch.randn(6, 6, *closed[0](inp).shape[2:], generator=gen, dtype=torch.float64)
        y1 = closed(inp.clone().requires_grad_(True))
        y1.backward(dy)
        with monkeypatch.context() as m:
            m.setattr(cbn, "conv_of", lambda y, w: None)  # the autograd path
            y2 = reference(inp.clone().requires_grad_(True))
            y2.backward(dy)
        isclose_report(y1, y2, f"output, step {step}")
        for key in ("ring_dmu", "ring_dnu", "ring_mu", "ring_nu"):
            isclose_report(closed[1].state_dict()[key], reference[1].state_dict()[key], f"{key}, step {step}")
        isclose_report(closed[0].weight.grad, reference[0].weight.grad, f"conv grad, step {step}")
        for a, b in zip(closed.parameters(), reference.parameters(), strict=True):
            with torch.no_grad():
                step_ = 0.05 * torch.randn(a.shape, generator=gen, dtype=torch.float64)
                a.add_(step_), b.add_(step_)
            a.grad = b.grad = None
    assert len(used) == 3  # one closed-form call per forward (three normalization batches each)
    assert closed[1].ring_dnu.abs().sum() > 0


def test_something_between_conv_and_norm_takes_the_autograd_path():
    """conv → ×2 → CBN is not the conv's direct output: the derivatives must come from autograd (the closed
    form would miss the factor); its outputs equal conv(2W) → CBN, the same function of the input."""
    torch.manual_seed(6)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False).double()
    doubled = copy.deepcopy(conv)
    with torch.no_grad():
        doubled.weight.mul_(2)
    a_norm = CrossIterationBatchNorm2d(3, window=3).double()
    b_norm = CrossIterationBatchNorm2d(3, window=3).double()
    a_norm.pair_conv(conv)
    b_norm.pair_conv(doubled)
    gen = torch.Generator().manual_seed(7)
    for step in range(4):
        inp = torch.randn(3, 2, 5, 5, generator=gen, dtype=torch.float64) + step
        ya = a_norm(conv(inp.clone().requires_grad_(True)) * 2)
        yb = b_norm(doubled(inp.clone().requires_grad_(True)))
        isclose_report(ya, yb, f"output, step {step}")
        ya.sum().backward(), yb.sum().backward()
        with torch.no_grad():
            move = 0.05 * torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64)
            conv.weight.add_(move), doubled.weight.add_(2 * move)
    isclose_report(a_norm.ring_dmu, 2 * b_norm.ring_dmu, "∂μ/∂W: twice the doubled conv's (the chain rule)")


def test_compiled_model_with_a_paired_conv_equals_eager():
    """torch.compile of conv → CBN: the compensated layer runs eager inside the compiled model (a graph break
    around it), so outputs, gradients and every ring equal eager's step after step."""
    torch.manual_seed(8)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False),
                        CrossIterationBatchNorm2d(3, window=3, group_size=2)).double()
    assert center_conv_weights(net) == ["0"]
    eager = copy.deepcopy(net)
    compiled = torch.compile(net, backend="inductor")
    gen = torch.Generator().manual_seed(9)
    for step in range(4):
        x = torch.randn(4, 2, 5, 5, generator=gen, dtype=torch.float64)
        y1, y2 = compiled(x.clone().requires_grad_(True)), eager(x.clone().requires_grad_(True))
        y1.sum().backward(), y2.sum().backward()
        isclose_report(y1, y2, f"output, step {step}")
        for (name, a), b in zip(net.state_dict().items(), eager.state_dict().values(), strict=True):
            isclose_report(a.double(), b.double(), f"{name}, step {step}")
        with torch.no_grad():
            for a, b in zip(net.parameters(), eager.parameters(), strict=True):
                isclose_report(a.grad, b.grad, f"grad, step {step}")
                a.sub_(0.1 * a.grad), b.sub_(0.1 * b.grad)
                a.grad = b.grad = None
    assert int(net[1].ring_valid.sum()) == 2
