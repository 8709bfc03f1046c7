"""Estimation shift: ~0 right after the running statistics were recomputed, positive otherwise; the script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mabn.diagnostics import estimation_shift
from mabn.models import build_model
from mabn.norms import NormContext, build_norm
from mabn.precise_bn import recompute_norm_stats

from .tinydata import make_fmnist_like

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["bn", "brn", "mabn"])
def test_estimation_shift_zero_after_recompute_positive_before(name):
    recipe = build_norm(name, NormContext(norm_batch=2, device_batch=8))
    model = build_model("cifar_resnet20", recipe, num_classes=10, in_channels=1, depth=8, width=8)  # centered
    batches = [(torch.randn(8, 1, 12, 12) * 3 + 1, torch.zeros(8, dtype=torch.long)) for _ in range(4)]
    before = estimation_shift(model, batches, torch.device("cpu"))  # running stats still at their init
    assert len(before) == len([m for m in model.modules() if type(m) is type(recipe.ctor(4))])
    assert all(r["var_rel"] > 0.05 for r in before)
    recompute_norm_stats(model, batches, torch.device("cpu"))
    after = estimation_shift(model, batches, torch.device("cpu"))
    assert all(r["var_rel"] < 1e-6 and r["var_l2"] < 1e-6 for r in after)
    if name != "mabn":
        assert all(r["mean_rel"] < 1e-6 for r in after) and any(r["mean_rel"] > 0.05 for r in before)
    else:
        assert all("mean_rel" not in r for r in after)  # MABN keeps no mean


def test_estimation_shift_script_on_a_training_checkpoint(tmp_path):
    data = make_fmnist_like(tmp_path / "fmnist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MABN_RUNS": str(tmp_path / "runs")}
    train = [sys.executable, str(ROOT / "train_imagenet.py"), "data=fmnist", f"data.root={data}",
             "model=cifar_resnet20_xbn", "model.depth=8", "model.width=4", "data.batch_size=8", "data.workers=0",
             "logger=none", "epochs=1", "train.max_iters_per_epoch=3", "train.eval_max_batches=1", "norm=bn",
             "batch=2"]
    subprocess.run(train, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    (ckpt,) = (tmp_path / "runs").glob("*/checkpoints/last.pt")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "estimation_shift.py"), str(ckpt), "--batches", "3",
                          "--out", str(tmp_path / "diag")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = json.loads((tmp_path / "diag" / "estimation_shift.json").read_text())
    assert result["norm"] == "bn" and result["model"] == "cifar_resnet20_xbn"
    # depth counts the XBNBlock GroupNorms too (stem and each block's bn1: 0, 1, 3, 6, ...), which have no shift
    assert [r["depth"] for r in result["layers"]] == [2, 4, 5, 7, 8]
    assert all(r["type"] == "BatchNorm2d" for r in result["layers"])
    assert (tmp_path / "diag" / "estimation_shift.png").stat().st_size > 1000
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "estimation_shift.py"), "nope.pt"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no such checkpoint: nope.pt" in bad.stderr
    # PreciseBN after training, on the same checkpoint: every evaluation recorded in the run's summary.json
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "precise_bn.py"), str(ckpt), "--batch", "n", "N",
                          "--images", "16", "--batch-stats", "--record", "--out", str(tmp_path / "precise.json")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(ckpt.parent.parent.joinpath("summary.json").read_text())
    kinds = sorted((r["stats"], r.get("batch"), r.get("images")) for r in summary["evals"]
                   if r.get("command", "").startswith("scripts/precise_bn.py"))
    assert kinds == [("batch", 2, None), ("ema", None, None), ("precise", 2, 16), ("precise", 16, 16)]
    recorded = [r for r in summary["evals"] if r.get("command", "").startswith("scripts/precise_bn.py")]
    assert len({r["count"] for r in recorded}) == 1 and all(r["git_sha"] for r in recorded)
    assert json.loads((tmp_path / "precise.json").read_text())["evals"] == recorded


def _tiny(norm):
    return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1, bias=False), norm, torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2)).double()


@pytest.mark.parametrize("name", ["bn", "mabn"])
def test_tracer_statistics_equal_hand_computed_values(name, tmp_path):
    from mabn.diagnostics import BatchStatsTracer

    norm = build_norm(name, NormContext(norm_batch=2, device_batch=6)).ctor(3)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
    net = _tiny(norm)
    tracer = BatchStatsTracer(net, tmp_path / "trace.jsonl")
    seen = {}

    def keep(module, inputs, output):
        output.retain_grad()
        seen.update(x=inputs[0].detach(), y=output)

    net[1].register_forward_hook(keep)
    tracer.arm(True, 7)
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    torch.nn.functional.cross_entropy(net(x), torch.tensor([0, 1, 0, 1, 1, 0])).backward()
    (rec,) = tracer.records
    xs, dy = seen["x"], seen["y"].grad
    gamma = norm.weight.detach().double()
    mus, vars_, gs, psis = [], [], [], []
    for k in range(3):  # three normalization batches of 2 samples, by hand
        xk, gk = xs[2 * k:2 * k + 2], dy[2 * k:2 * k + 2] * gamma.view(1, -1, 1, 1)
        mu = xk.mean(dim=(0, 2, 3))
        var = ((xk - mu.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))
        xhat = (xk - mu.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + norm.eps)
        mus.append(mu), vars_.append(var)
        gs.append(gk.mean(dim=(0, 2, 3))), psis.append((gk * xhat).mean(dim=(0, 2, 3)))
    mu, var, g, psi = (torch.stack(v) for v in (mus, vars_, gs, psis))
    assert rec["iter"] == 7 and rec["n"] == 2 and rec["groups"] == 3 and rec["layer"] == "1"
    for key, value in (("mu", mu), ("var", var), ("g", g), ("psi", psi)):
        assert rec[key] == pytest.approx(float(value.mean()), rel=1e-12, abs=1e-15)
    if name == "bn":  # against the layer's running statistics (updated by this very forward)
        ref_mu, ref_var = norm.running_mean.double(), norm.running_var.double()
    else:  # MABN keeps no mean: against the tracer's average over the batches traced so far
        ref_mu, ref_var = mu.mean(0), var.mean(0)
    assert rec["mu_dev"] == pytest.approx(float(((mu - ref_mu).abs() / (ref_var + norm.eps).sqrt()).mean()), rel=1e-9)
    assert rec["var_dev"] == pytest.approx(float((var / (ref_var + norm.eps) - 1).abs().mean()), rel=1e-9)
    rms = torch.stack([(dy[2 * k:2 * k + 2] * gamma.view(1, -1, 1, 1)).square().mean(dim=(0, 2, 3)).sqrt()
                       for k in range(3)])
    assert rec["psi_dev"] == pytest.approx(float(((psi - psi.mean(0)).abs() / rms).mean()), rel=1e-9)
    assert rec["g_dev"] == pytest.approx(float(((g - g.mean(0)).abs() / rms).mean()), rel=1e-9)
    assert json.loads((tmp_path / "trace.jsonl").read_text().splitlines()[0]) == rec


def test_tracer_off_adds_no_hooks_and_unarmed_records_nothing(tmp_path):
    from mabn.diagnostics import BatchStatsTracer

    net = _tiny(build_norm("bn").ctor(3))
    assert not net[1]._forward_hooks
    tracer = BatchStatsTracer(net, None)
    assert len(net[1]._forward_hooks) == 1
    net(torch.randn(4, 1, 4, 4, dtype=torch.float64)).sum().backward()
    assert tracer.records == []  # not armed
    tracer.close()
    assert not net[1]._forward_hooks


def test_training_with_the_tracer_writes_every_layer_at_the_traced_steps(tmp_path):
    data = make_fmnist_like(tmp_path / "fmnist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MABN_RUNS": str(tmp_path / "runs")}
    cmd = [sys.executable, str(ROOT / "train_imagenet.py"), "data=fmnist", f"data.root={data}", "model=cifar_resnet20",
           "model.depth=8", "model.width=4", "data.batch_size=8", "data.workers=0", "logger=none", "epochs=1",
           "train.max_iters_per_epoch=5", "train.eval_max_batches=1", "norm=mabn", "batch=2"]
    subprocess.run([*cmd, "diag.batch_stats=true", "diag.every=2"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    (trace,) = (tmp_path / "runs").glob("*/diag_batch_stats.jsonl")
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    layers = {r["layer"] for r in records}
    assert len(layers) == 9 and sorted({r["iter"] for r in records}) == [2, 4]  # stem, 3 blocks x 2, 2 shortcuts
    assert all(r["n"] == 2 and r["groups"] == 4 and r["type"] == "MABN2d" for r in records)
    assert all(r[k] >= 0 for r in records for k in ("mu_dev", "var_dev", "g_dev", "psi_dev"))
    subprocess.run([*cmd, "run.name=off"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    assert not list((tmp_path / "runs" / "off").glob("diag_*"))


def test_plot_batch_stats_medians_and_figures(tmp_path):
    runs = []
    for norm, n, scale, model in (("bn", 2, 4.0, "cifar_resnet20"), ("bn", 32, 1.0, "cifar_resnet20"),
                                  ("mabn", 2, 2.0, "cifar_resnet20"), ("bn", 2, 3.0, "cifar_resnet20_xbn")):
        run = tmp_path / f"{norm}-{n}-{model}"
        (run / "hydra").mkdir(parents=True)
        (run / "hydra" / "config.yaml").write_text(
            f"norm:\n  name: {norm}\nbatch:\n  norm_batch: {n}\nmodel:\n  name: {model}\nseed: 0\n")
        lines = [{"iter": it, "layer": f"l{d}", "depth": d, "mu_dev": scale * it, "var_dev": scale,
                  "g_dev": scale * d, "psi_dev": 1.0} for it in (1, 2, 3) for d in (0, 1)]
        if norm == "mabn":
            for x in lines:
                x.update(chi2_bar_dev=0.5, psi_bar_dev=0.25 * x["depth"])
        (run / "diag_batch_stats.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        runs.append(str(run))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_batch_stats.py"), *runs, "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    table = {(r["series"], r["n"]): r for r in json.loads((tmp_path / "out" / "batch_stats.json").read_text())}
    bn, xbn = "bn cifar_resnet20", "bn cifar_resnet20_xbn"  # two models: each norm x model is its own curve
    assert table[(bn, 2)]["mu_dev"] == 8.0 and table[(bn, 32)]["var_dev"] == 1.0  # medians over steps, layers
    assert table[(bn, 2)]["layers"][1]["g_dev"] == 4.0 and table[(xbn, 2)]["mu_dev"] == 6.0
    page = (tmp_path / "out" / "batch_stats.md").read_text()
    assert f"| {bn} | 32 | 2.0000 | 1.0000 | 0.5000 | 1.0000 |  |  |" in page
    assert "| mabn cifar_resnet20 | 2 | 4.0000 | 2.0000 | 1.0000 | 1.0000 | 0.5000 | 0.1250 |" in page
    assert ("- mabn cifar_resnet20 n=2: used χ̄² 0.5000 against variance σ²_B 2.0000 (0.25x); "
            "used Ψ̄ 0.1250 against Ψ_B 1.0000 (0.12x)") in page
    for name in ("batch_stats_vs_n", "batch_stats_by_layer_bn_cifar_resnet20",
                 "batch_stats_by_layer_mabn_cifar_resnet20",
                 "batch_stats_by_layer_bn_cifar_resnet20_xbn"):
        assert (tmp_path / "out" / f"{name}.png").stat().st_size > 1000 and (tmp_path / "out" / f"{name}.svg").exists()
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_batch_stats.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "diag.batch_stats=true" in bad.stderr


@pytest.mark.parametrize("switches", [{}, {"average": "ema", "backward_stat": "batch"}], ids=["sma", "ema"])
def test_tracer_records_what_mabn_normalizes_with(switches, tmp_path):
    """χ̄², Ψ̄, r and their deviations against the float64 re-statement fed the same normalization batches:
    an untraced step fills the averages (nothing recorded, no statistics kept), then a traced one."""
    from mabn.diagnostics import BatchStatsTracer

    from .reference import RefMABN

    params = {"name": "mabn", "window": 2, "warmup_iters": 1, "renorm_iters": 1, "r_max": 1.2, **switches}
    norm = build_norm(params, NormContext(norm_batch=2, device_batch=6)).ctor(3)  # 3 groups per step
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
    net = _tiny(norm)
    tracer = BatchStatsTracer(net, tmp_path / "trace.jsonl")
    seen = []

    def keep(module, inputs, output):
        output.retain_grad()
        seen.append((inputs[0].detach(), output))

    net[1].register_forward_hook(keep)
    ref = RefMABN(3, 2, 3, 3, r_max=1.2, backward_stat=switches.get("backward_stat", "sma"),
                  average=switches.get("average", "sma"))
    gamma = norm.weight.detach().double()
    for it, armed in ((1, False), (2, True)):
        tracer.arm(armed, it)
        x = torch.randn(6, 1, 4, 4, dtype=torch.float64) * (1 + it)
        torch.nn.functional.cross_entropy(net(x), torch.tensor([0, 1, 0, 1, 1, 0])).backward()
        assert (norm.used_stats is None) != armed
        xs, dy = seen[-1][0], seen[-1][1].grad
        used = []
        for k in range(3):  # the re-statement, one normalization batch at a time
            ref.step(xs[2 * k:2 * k + 2], gamma, norm.bias.detach().double(), dy[2 * k:2 * k + 2])
            used.append(ref.used)
    (rec,) = tracer.records
    chi2_bar, r, psi, psi_bar = (
        torch.stack([u[k] for u in used]) for k in ("chi2_bar", "r", "psi", "psi_bar"))
    assert ref.t == 6 and (r != 1).any() and (r.abs() == 1.2).any()  # averaging, renorm on, r clipped
    x2 = torch.stack([(xs[2 * k:2 * k + 2] ** 2).mean(dim=(0, 2, 3)) for k in range(3)])
    ghat = [(r[k] * gamma).view(1, -1, 1, 1) * dy[2 * k:2 * k + 2] for k in range(3)]  # MABN's ĝ = r·γ·dy
    rms = torch.stack([g.square().mean(dim=(0, 2, 3)).sqrt() for g in ghat])
    for key, value in (("chi2_bar", chi2_bar), ("psi_bar", psi_bar), ("r", r)):
        assert rec[key] == pytest.approx(float(value.mean()), rel=1e-10), key
    # one traced step: the population references are the averages over its three normalization batches
    assert rec["chi2_bar_dev"] == pytest.approx(float((chi2_bar / (x2.mean(0) + norm.eps) - 1).abs().mean()),
                                                rel=1e-9)
    assert rec["psi_bar_dev"] == pytest.approx(float(((psi_bar - psi.mean(0)).abs() / rms).mean()), rel=1e-9)
    assert rec["chi2_bar_dev"] > 0 and rec["psi_bar_dev"] > 0
    assert json.loads((tmp_path / "trace.jsonl").read_text().splitlines()[0]) == rec
    tracer.close()
    assert norm.used_stats is None


def test_plot_batch_stats_draws_what_mabn_uses(tmp_path):
    """A MABN trace with the used statistics: their medians in batch_stats.json, beside the batch ones."""
    runs = []
    for norm, n in (("bn", 2), ("mabn", 2), ("mabn", 32)):
        run = tmp_path / f"{norm}-{n}"
        (run / "hydra").mkdir(parents=True)
        (run / "hydra" / "config.yaml").write_text(
            f"norm:\n  name: {norm}\nbatch:\n  norm_batch: {n}\nmodel:\n  name: cifar_resnet8\nseed: 0\n")
        used = {"chi2_bar_dev": 0.1, "psi_bar_dev": 0.2} if norm == "mabn" else {}
        lines = [{"iter": it, "layer": f"l{d}", "depth": d, "mu_dev": 1.0, "var_dev": 2.0, "g_dev": 3.0,
                  "psi_dev": 4.0, **{k: v * it for k, v in used.items()}} for it in (1, 2, 3) for d in (0, 1)]
        (run / "diag_batch_stats.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        runs.append(str(run))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_batch_stats.py"), *runs, "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    table = {(r["norm"], r["n"]): r for r in json.loads((tmp_path / "out" / "batch_stats.json").read_text())}
    assert table[("mabn", 2)]["chi2_bar_dev"] == pytest.approx(0.2)  # median over steps 1-3, then layers
    assert table[("mabn", 32)]["layers"][1]["psi_bar_dev"] == pytest.approx(0.4)
    assert "chi2_bar_dev" not in table[("bn", 2)] and "psi_bar_dev 0.4000" in out.stdout
    svg = (tmp_path / "out" / "batch_stats_vs_n.svg").read_text()
    assert "used χ̄²" in svg and "used Ψ̄" in svg
    assert (tmp_path / "out" / "batch_stats_by_layer_mabn.png").stat().st_size > 1000


def test_traced_run_stopped_and_resumed_writes_the_straight_runs_trace(tmp_path):
    """The tracer's averages (the references of g_dev, psi_dev, MABN's χ̄² and Ψ̄ deviations) travel in the
    checkpoint: a run stopped after a traced step and resumed writes the same records as one straight run."""
    data = make_fmnist_like(tmp_path / "fmnist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MABN_RUNS": str(tmp_path / "runs")}
    cmd = [sys.executable, str(ROOT / "train_imagenet.py"), "data=fmnist", f"data.root={data}", "model=cifar_resnet20",
           "model.depth=8", "model.width=4", "data.batch_size=8", "data.workers=0", "logger=none", "epochs=1",
           "train.max_iters_per_epoch=6", "train.eval_max_batches=1", "norm=mabn", "batch=2", "norm.warmup_iters=1",
           "norm.window=2", "diag.batch_stats=true", "diag.every=2"]
    subprocess.run([*cmd, "run.name=straight"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    subprocess.run([*cmd, "run.name=resumed", "train.stop_after_iters=3"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    subprocess.run([*cmd, "run.name=resumed"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)

    def trace(name):
        lines = (tmp_path / "runs" / name / "diag_batch_stats.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    straight, resumed = trace("straight"), trace("resumed")
    assert sorted({r["iter"] for r in straight}) == [2, 4, 6] and len(straight) == len(resumed)
    for a, b in zip(straight, resumed, strict=True):
        assert a == b, (a, b)
