"""The sweep scripts print the exact commands they would submit (DRY_RUN=1), with the cluster settings."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "scripts/sweeps").glob("*.sh") if p.name != "common.sh")


def _dry_run(script, **env):
    res = subprocess.run(["bash", f"scripts/sweeps/{script}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "DRY_RUN": "1", "PY": "python", **env})
    assert res.returncode == 0, res.stderr
    return [line[2:] for line in res.stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_sweep_scripts_print_their_multiruns(script):
    commands = _dry_run(script, SLURM_PARTITION="gpu", SLURM_TIME_MIN="90")
    assert commands
    assert all(" -m launcher=slurm " in c and c.endswith("launcher.timeout_min=90") for c in commands)
    assert all(c.startswith("SLURM_PARTITION=gpu python ") for c in commands)


def test_cpu_reproduction_order_and_cells():
    commands = _dry_run("fmnist_cpu.sh", LAUNCHER="joblib", JOBS="2")
    # the cells of the paper's claim first
    assert [c.split("batch=")[1].split()[0] for c in commands] == ["2,32", "1", "4,8", "2,32", "2,32,1,4,8"]
    assert "norm=bn,gn,brn,mabn" in commands[0] and all("norm=bn,brn,mabn" in c for c in commands[1:3])
    # the later norms after the paper's: cbn at every n, the batch-free ones at n = 2 and 32 like gn
    assert "norm=ln,in,gnws,evonorm_s0,frn" in commands[3] and "norm=cbn " in commands[4]
    assert all(c.endswith("launcher.n_jobs=2") and "experiment=fmnist_cpu" in c for c in commands)


def test_ablation_cells():
    """fmnist_ablation.sh: the cells of the ablation table, three seeds each, under experiment=fmnist_ablation."""
    commands = _dry_run("fmnist_ablation.sh", LAUNCHER="joblib", JOBS="2")
    assert all("experiment=fmnist_ablation" in c and c.endswith("seed=0,1,2 launcher.n_jobs=2") for c in commands)
    cells = set()
    for c in commands:
        args = c.split()
        norms = next(a for a in args if a.startswith("norm=")).split("=")[1].split(",")
        switches = tuple(a for a in args if a.startswith("norm."))
        for n in next(a for a in args if a.startswith("batch=")).split("=")[1].split(","):
            cells |= {(norm, switches, int(n)) for norm in norms}
    small = {("bn", ()), ("mabn", ()), ("mabn", ("norm.backward_stat=batch",)),
             ("mabn", ("norm.forward_stat=batch",)), ("mabn", ("norm.forward_stat=batch", "norm.backward_stat=batch")),
             ("mabn", ("norm.weight_centering=false",)), ("mabn", ("norm.average=ema",))}
    large = {("bn", ()), ("mabn", ()), ("mabn", ("norm.weight_centering=false",)),
             ("mabn", ("norm.forward_stat=batch", "norm.backward_stat=batch"))}
    centered_bn = {("bn", ("norm.weight_centering=true",), n) for n in (2, 32)}
    assert cells == {(*cell, n) for n in (1, 2) for cell in small} | {(*cell, 32) for cell in large} | centered_bn


def test_brn_schedule_cells():
    """fmnist_brn_schedule.sh: bn and brn at n = 2, then brn with r only, d only and neither; three seeds."""
    commands = _dry_run("fmnist_brn_schedule.sh", LAUNCHER="joblib", JOBS="2")
    assert all("experiment=fmnist_brn_schedule" in c and " batch=2 " in c for c in commands)
    assert [c.split("batch=2 ")[1] for c in commands] == [
        f"{cell} seed=0,1,2 launcher.n_jobs=2" for cell in
        ("norm=bn,brn", "norm=brn norm.d_max=0", "norm=brn norm.r_max=1", "norm=brn norm.schedule_ref_iters=null")]


def test_full_length_cells_seed_by_seed():
    """fmnist.sh: bn, brn, mabn at n = 1, 2, 32, gn and the later norms at n = 2; a seed's 16 cells before the next."""
    commands = _dry_run("fmnist.sh", LAUNCHER="joblib", JOBS="2", RECORDS="none")
    cells = _cells(commands)
    per_seed = {(norm, n) for norm in ("bn", "brn", "mabn") for n in (1, 2, 32)}
    per_seed |= {(norm, 2) for norm in ("gn", "gnws", "evonorm_s0", "frn", "ln", "in", "cbn")}
    assert len(commands) == 6 and len(cells) == len(set(cells)) == 48  # two multiruns a seed
    assert [seed for seed, *_ in cells] == sorted(seed for seed, *_ in cells)  # seed by seed
    assert {(norm, n) for seed, norm, n in cells if seed == 0} == per_seed
    assert {seed for seed, *_ in cells} == {0, 1, 2}


def test_full_length_sweep_leaves_out_recorded_cells(tmp_path):
    """A cell recorded in results/records/fmnist/ (an earlier session's) is not run again; the rest are."""
    for norm, n in (("bn", 2), ("mabn", 2), ("gn", 2), ("brn", 1)):
        (tmp_path / f"fmnist-cifar_resnet20-{norm}-n{n}-b32-s0").mkdir()
        (tmp_path / f"fmnist-cifar_resnet20-{norm}-n{n}-b32-s0" / "summary.json").write_text("{}")
    (tmp_path / "fmnist-cifar_resnet20-brn-n32-b32-s0").mkdir()  # no summary: not recorded
    commands = _dry_run("fmnist.sh", LAUNCHER="joblib", JOBS="2", RECORDS=str(tmp_path), SEEDS="0")
    assert [c.split("logger=none ")[1] for c in commands] == [
        "norm=brn batch=2 seed=0 launcher.n_jobs=2", "norm=bn,mabn,brn batch=32 seed=0 launcher.n_jobs=2",
        "norm=bn,mabn batch=1 seed=0 launcher.n_jobs=2",
        "norm=gnws,evonorm_s0,frn,ln,in,cbn batch=2 seed=0 launcher.n_jobs=2"]


def test_longer_runs_of_the_claims_cells_seed_by_seed(tmp_path):
    """fmnist_long.sh: bn, mabn, brn at n = 2 and bn, mabn at n = 32 at 6 epochs, seed by seed; recorded cells
    left out."""
    commands = _dry_run("fmnist_long.sh", LAUNCHER="joblib", JOBS="2", RECORDS="none")
    cells = _cells(commands, "fmnist_long")
    assert len(cells) == len(set(cells)) == 15
    assert [seed for seed, *_ in cells] == sorted(seed for seed, *_ in cells)
    assert {(norm, n) for seed, norm, n in cells if seed == 2} == {("bn", 2), ("mabn", 2), ("brn", 2), ("bn", 32),
                                                                ("mabn", 32)}
    for cell in ("bn-n2", "bn-n32"):
        (tmp_path / f"fmnist_long-fmnist-cifar_resnet20-{cell}-b32-s0").mkdir()
        (tmp_path / f"fmnist_long-fmnist-cifar_resnet20-{cell}-b32-s0" / "summary.json").write_text("{}")
    commands = _dry_run("fmnist_long.sh", LAUNCHER="joblib", JOBS="2", RECORDS=str(tmp_path), SEEDS="0")
    assert _cells(commands, "fmnist_long") == [(0, "mabn", 2), (0, "brn", 2), (0, "mabn", 32)]


@pytest.mark.parametrize("script,experiment", [("fmnist.sh", "fmnist"), ("fmnist_long.sh", "fmnist_long")])
def test_recorded_cells_are_looked_up_under_the_run_names_the_config_gives(script, experiment):
    """The prefix a sweep script looks recorded cells up by is the one configs name the runs with."""
    from hydra import compose, initialize_config_dir

    import mabn.config  # noqa: F401  (registers the ${model_label:...} resolver run names use)

    prefix = next(line.split("=", 1)[1].split()[0] for line in (ROOT / "scripts/sweeps" / script).read_text()
                  .splitlines() if line.startswith("RUN="))
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train_imagenet", overrides=[f"experiment={experiment}", "norm=mabn", "batch=2", "seed=1"])
    assert cfg.run.name == f"{prefix}-mabn-n2-b32-s1"


def _cells(commands, experiment="fmnist"):
    cells = []
    for c in commands:
        args = dict(a.split("=", 1) for a in c.split()[3:])
        assert args["experiment"] == experiment and args["launcher.n_jobs"] == "2"
        cells += [(int(args["seed"]), norm, int(n)) for norm in args["norm"].split(",")
                  for n in args["batch"].split(",")]
    return cells


def test_precise_bn_sweep_cells():
    """results/fmnist_precise_bn.md's cells: bn at n = 1-32 evaluated four ways and trained frozen, mabn and brn at
    n = 2 and 32, three seeds, the n = 2 and 32 cells first: 30 + 18 runs."""
    commands = _dry_run("fmnist_precise_bn.sh", LAUNCHER="local")
    assert [c.split("experiment=")[1].split()[0] for c in commands] == [
        "fmnist_precise_bn", "fmnist_frozen_bn", "fmnist_precise_bn", "fmnist_frozen_bn"]
    cells = 0
    for c in commands:
        norms = c.split("norm=")[1].split()[0].split(",")
        batches = c.split("batch=")[1].split()[0].split(",")
        cells += len(norms) * len(batches) * 3
        assert "seed=0,1,2" in c and "logger=none" in c
    assert cells == 48 and commands[0].split("batch=")[1].startswith("2,32")
