"""The benchmarks: their eager baseline is a correct MABN, they run end to end on CPU, and
results/performance.md is rendered from their records only."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mabn.norms import MABN2d

from .reference import isclose_report

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("n", [1, 2, 6])
def test_naive_baseline_is_the_grouped_mabn(n):
    """The speed baseline computes what MABN2d computes (outputs, gradients, state) through every phase."""
    bench = _script("bench_layer")
    kw = dict(window=3, warmup_iters=4, renorm_iters=8, momentum=0.1)
    fast = MABN2d(3, group_size=n if n < 6 else None, **kw).double()
    naive = bench.NaiveMABN2d(3, **kw).double()
    with torch.no_grad():
        for layer in (fast, naive):
            layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    for step in range(8):
        x = torch.randn(6, 3, 2, 2, dtype=torch.float64) * (1 + step % 3)
        dy = torch.randn_like(x)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        fast.zero_grad(set_to_none=True)
        naive.zero_grad(set_to_none=True)
        fast(x1).backward(dy)
        bench.sequential_step(naive, x2, dy, n)
        isclose_report(x1.grad, x2.grad, f"dx step {step}")
        isclose_report(fast.weight.grad, naive.weight.grad, f"dgamma step {step}")
        isclose_report(fast.bias.grad, naive.bias.grad, f"dbeta step {step}")
    isclose_report(fast.running_var, naive.running_var, "running_var")
    assert int(fast.num_batches_tracked) == naive.t == 8 * 6 // n


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_benchmarks_run_and_render(tmp_path):
    """Tiny settings of the three benchmarks on CPU, then the page: every table row and target is there."""
    out = tmp_path / "performance"
    layer = _run("scripts/bench_layer.py", "--device", "cpu", "--shapes", "small", "--batch", "4",
                 "--norm-batch", "2", "--repeats", "1", "--warmup", "1", "--out", out / "layer.json")
    assert layer.returncode == 0, layer.stderr
    assert "naive-mabn" in layer.stdout and "record:" in layer.stdout
    model = _run("scripts/bench_model.py", "--device", "cpu", "--model", "cifar_resnet20",
                 "--image-size", "8", "--batches", "4", "--norm-batches", "2,4", "--repeats", "1",
                 "--warmup", "1", "--out", out / "model.json")
    assert model.returncode == 0, model.stderr
    infer = _run("scripts/bench_inference.py", "--device", "cpu", "--model", "cifar_resnet20",
                 "--image-size", "8", "--batches", "1,4", "--repeats", "1", "--warmup", "1",
                 "--out", out / "inference.json")
    assert infer.returncode == 0, infer.stderr
    page = tmp_path / "performance.md"
    render = _run("scripts/make_performance.py", "--records", out, "--out", page)
    assert render.returncode == 0, render.stderr
    text = page.read_text()

    records = {name: json.loads((out / f"{name}.json").read_text())
               for name in ("layer", "model", "inference")}
    assert {r["norm"] for r in records["layer"]["rows"]} == \
        {"copy", "torch-bn", "bn", "brn", "mabn", "gn", "naive-mabn", "ln", "in", "gnws", "evonorm_s0", "frn"}
    # bandwidth: a copy of x timed per shape in the same run; every norm row's floor bandwidth is over it
    for row in records["layer"]["rows"]:
        if not row["shape"].endswith(")"):
            copy = next(r for r in records["layer"]["rows"] if r["norm"] == "copy" and r["shape"] == row["shape"])
            assert row["of_copy"] == pytest.approx(row["gb_s"] / copy["gb_s"]) and row["gb_s"] > 0, row
    assert "| memory floor reached by mabn forward+backward (n=2; reported) |" in text
    modes = {(r["norm"], r["mode"]) for r in records["model"]["rows"]}
    assert {("mabn", "grouped"), ("mabn", "true small batch"), ("gn", "batch-free")} <= modes
    # the later norms: cbn grouped like the batch norms (with its paired convs), the others once per batch
    assert {("cbn", "grouped"), ("cbn", "whole batch")} | {(n, "batch-free") for n in
                                                           ("gnws", "evonorm_s0", "frn", "ln", "in")} <= modes
    assert sum(r["mode"] == "batch-free" for r in records["model"]["rows"]) == 6
    assert {(r["norm"], r["folded"], r["batch"]) for r in records["inference"]["rows"]} == {
        (n, f, b) for n, f in (("bn", True), ("mabn", True), ("gn", False), ("bn", False)) for b in (1, 4)}
    for record in records.values():
        env = record["environment"]
        assert env["device"].startswith("CPU") and env["torch"] == torch.__version__
        assert f"`{record['environment']['command']}`" in text
    # the CPU target is judged, the GPU targets stay open on a CPU record
    assert "| CPU: mabn layer forward+backward <= 2x nn.BatchNorm2d (n=2) |" in text
    assert text.count("open: GPU target, this record ran on CPU") >= 5
    speedup = next(r["speedup"] for r in records["model"]["rows"]
                   if r["norm"] == "mabn" and r["mode"] == "grouped")
    assert f"{speedup:.1f}x" in text  # numbers on the page are the record's
    # launches: per layer forward and backward, per training step; judged as a GPU target
    for row in records["layer"]["rows"]:
        assert row["norm"] == "copy" or row["launches_fwd"] >= 1 and row["launches_bwd"] >= 1, row
    assert all(r["launches"] > 10 for r in records["model"]["rows"])
    assert not any("CUDA graph" in r["mode"] for r in records["model"]["rows"])  # CPU: no graph rows
    mabn = next(r for r in records["layer"]["rows"] if r["norm"] == "mabn" and r["n"] == 2)
    assert (f"| <= 4 kernel launches forward + <= 4 backward per layer (mabn, brn, grouped bn): mabn | worst "
            f"shape {mabn['launches_fwd']} forward + {mabn['launches_bwd']} backward;") in text
    assert "| true device batch 2 with CUDA graphs >= 2x eager | not measured: CUDA graphs need a GPU" in text
    assert "not measured" not in text.split("## Layer benchmark")[1]


def test_layer_benchmark_times_each_path(tmp_path):
    """--variants: bn, brn and mabn on the torch path and compiled, as separate rows; the launch target judges the
    hand-written paths only (inductor's kernels are not counted); the fused path is refused on a CPU."""
    out = tmp_path / "performance"
    res = _run("scripts/bench_layer.py", "--device", "cpu", "--shapes", "small", "--batch", "4", "--norm-batch", "2",
               "--repeats", "1", "--warmup", "0", "--variants", "torch,compiled", "--out", out / "layer.json")
    assert res.returncode == 0, res.stderr
    rows = json.loads((out / "layer.json").read_text())["rows"]
    labels = {(r["norm"], r["n"]) for r in rows}
    assert {(f"{norm}[{v}]", n) for norm in ("bn", "brn", "mabn") for v in ("torch", "compiled") for n in (2, 4)} \
        <= labels and ("mabn", 2) not in labels
    assert all(r["launches_fwd"] is None for r in rows if r["norm"].endswith("[compiled]"))
    page = tmp_path / "performance.md"
    assert _run("scripts/make_performance.py", "--records", out, "--out", page).returncode == 0
    text = page.read_text()
    assert "per layer (mabn, brn, grouped bn): mabn[torch] | worst shape" in text
    assert "mabn[compiled] | worst shape" not in text
    assert "| mabn[torch] layer >= 3x faster than the eager sequential baseline (n=2) |" in text
    res = _run("scripts/bench_layer.py", "--device", "cpu", "--shapes", "small", "--batch", "4", "--variants",
               "fused", "--out", out / "x.json")
    assert res.returncode == 2 and "--variants fused needs a CUDA device" in res.stderr
    res = _run("scripts/bench_layer.py", "--device", "cpu", "--variants", "fast", "--out", out / "x.json")
    assert res.returncode == 2 and "--variants must be a comma-separated list of auto, fused, torch, compiled, " \
        "got 'fast'" in res.stderr


def test_records_without_launch_counts_render(tmp_path):
    """Records made before launch counting (the committed CPU records, with the launch keys taken out): the
    page says "not measured", it does not fail."""
    records = tmp_path / "records"
    records.mkdir()
    for path in (ROOT / "results" / "performance").glob("*.json"):
        record = json.loads(path.read_text())
        for row in record.get("rows", []):
            for key in ("launches_fwd", "launches_bwd", "launches"):
                row.pop(key, None)
        (records / path.name).write_text(json.dumps(record))
    page = tmp_path / "performance.md"
    render = _run("scripts/make_performance.py", "--records", records, "--out", page)
    assert render.returncode == 0, render.stderr
    text = page.read_text()
    assert "| <= 4 kernel launches forward + <= 4 backward per layer (mabn, brn, grouped bn) | not measured: " \
           "this record predates launch counting" in text
    assert "| not measured | not measured |" in text.split("## Layer benchmark")[1]


def test_make_performance_without_records(tmp_path):
    page = tmp_path / "p.md"
    assert _run("scripts/make_performance.py", "--records", tmp_path / "none", "--out", page).returncode == 0
    assert "No benchmark records yet." in page.read_text()


def test_bad_benchmark_arguments_are_named():
    res = _run("scripts/bench_layer.py", "--device", "cpu", "--shapes", "small", "--batch", "4",
               "--norm-batch", "3", "--out", "/dev/null")
    assert res.returncode != 0 and "--norm-batch 3 must divide --batch 4" in res.stderr
    res = _run("scripts/bench_model.py", "--batches", "32,x")
    assert res.returncode != 0 and "expected comma-separated integers, got '32,x'" in res.stderr
    res = _run("scripts/bench_inference.py", "--device", "tpu")
    assert res.returncode != 0 and "--device must be auto, cpu or cuda, got 'tpu'" in res.stderr
    res = _run("scripts/bench_model.py", "--norms", "bn,wsbn")
    assert res.returncode != 0 and "--norms: unknown ['wsbn']; choose from" in res.stderr
    res = _run("scripts/bench_model.py", "--norms", "mabn,bn")
    assert res.returncode != 0 and "--norms must start with bn (the baseline of the ratios), got mabn,bn" in res.stderr


def test_the_committed_kernel_record_renders_every_kernel_for_both_architectures(tmp_path):
    """results/performance/kernels.json (python -m mabn.norms._aot compile --record): every fused kernel, sm_80 and
    sm_90, without spills, in its own section of the page."""
    record = json.loads((ROOT / "results" / "performance" / "kernels.json").read_text())
    from .test_fused_aot import KERNELS

    assert record["benchmark"] == "kernels" and record["settings"]["arch"] == ["sm_80", "sm_90"]
    assert {(r["kernel"], r["arch"]) for r in record["rows"]} == {(k, a) for k in KERNELS for a in ("sm_80", "sm_90")}
    assert all(r["local"] == 0 and r["stack"] == 0 for r in record["rows"])
    page = tmp_path / "performance.md"
    assert _run("scripts/make_performance.py", "--out", page).returncode == 0
    text = page.read_text()
    assert "## Fused kernels compiled for real GPUs (no GPU involved)" in text
    for kernel in KERNELS:
        assert f"| {kernel} | sm_90 |" in text and f"| {kernel} | sm_80 |" in text
