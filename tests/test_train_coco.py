"""train_coco.py for real on a tiny generated shapes set: training, COCO evaluation, records, resume, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .procs import sigterm_once

pytest.importorskip("detectron2", reason="detectron2 not installed (MABN_D2_SOURCE=skip?)")
pytestmark = [pytest.mark.detectron2, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TINY = ["experiment=shapes", "data.num_train=6", "data.num_val=4", "data.image_size=64",
        "data.min_size_train=[64]", "data.max_size_train=64", "data.min_size_test=64", "data.max_size_test=64",
        "data.workers=0", "model.rois_per_image=16", "model.proposals_per_image=[50,20]",
        "model.anchor_sizes=[8,16,32,64,128]", "solver.max_iter=4", "solver.steps=[3]", "solver.warmup_iters=1",
        "train.eval_period=4", "train.ckpt_period=100", "train.log_period=1", "logger=none"]


def train_coco(args, runs, data, *, check=True, base=tuple(TINY)):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MABN_RUNS": str(runs), "MABN_DATA": str(data),
           "WANDB_SILENT": "true"}
    out = subprocess.run([sys.executable, str(ROOT / "train_coco.py"), *base, *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-4000:]}")
    return out


def only_run(runs):
    (d,) = [p for p in Path(runs).iterdir() if p.is_dir()]
    return d


def test_trains_evaluates_and_records(tmp_path):
    out = train_coco(["norm=mabn", "batch=2", "logger=wandb"], tmp_path / "runs", tmp_path / "data")
    d = only_run(tmp_path / "runs")
    summary = json.loads((d / "summary.json").read_text())
    assert summary["task"] == "detection" and summary["norm"] == "mabn" and summary["iters"] == 4
    assert summary["status"] == "finished" and summary["experiment"] == "shapes"  # the table it belongs to
    assert summary["norm_batch"] == summary["device_batch"] == 2 and summary["norm_params"]["window"] == 16
    for task in ("bbox", "segm"):  # pycocotools' numbers, whatever 4 iterations give (null: no prediction)
        ap = summary[f"{task}_AP"]
        assert (ap is None or 0.0 <= ap <= 100.0) and {"AP", "AP50", "AP75"} <= set(summary[task])
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines if "total_loss" in x] == [0, 1, 2, 3]
    assert any("bbox/AP" in x and "segm/AP" in x for x in lines)
    assert list((d / "wandb").glob("offline-run-*")) and summary["wandb_id"]
    assert "done: box AP" in out.stdout and (d / "checkpoints" / "model_final.pth").exists()
    assert [s["trained"] for s in summary["starts"]] == [True]  # marked once its first step ran


def test_resume_after_a_stop_continues_exactly(tmp_path):
    train_coco(["norm=mabn"], tmp_path / "straight", tmp_path / "data")
    train_coco(["norm=mabn", "train.stop_after_iters=2"], tmp_path / "resumed", tmp_path / "data")
    d = only_run(tmp_path / "resumed")
    assert not (d / "summary.json").exists()
    out = train_coco(["norm=mabn"], tmp_path / "resumed", tmp_path / "data")
    assert "at iteration 2" in out.stdout
    assert len(json.loads((d / "summary.json").read_text())["starts"]) == 2  # each start's commit
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines if "total_loss" in x] == [0, 1, 2, 3]
    straight = torch.load(only_run(tmp_path / "straight") / "checkpoints" / "model_final.pth", weights_only=False)
    resumed = torch.load(d / "checkpoints" / "model_final.pth", weights_only=False)
    for key, value in straight["model"].items():  # weights and MABN state (rings, counters, running_var)
        assert torch.equal(value, resumed["model"][key]), key
    # a rerun of the finished run (a sweep over its cells again) trains and evaluates nothing: the records stay
    records = {name: (d / name).read_bytes() for name in ("summary.json", "metrics.jsonl")}
    out = train_coco(["norm=mabn"], tmp_path / "resumed", tmp_path / "data")
    assert "already finished" in out.stdout and "Starting training" not in out.stdout + out.stderr
    assert records == {name: (d / name).read_bytes() for name in records}


def test_resume_with_another_lr_is_refused(tmp_path):
    """detectron2's checkpointer restores the lr schedule: train_coco.py refuses rather than record a change
    that would not happen."""
    train_coco(["norm=bn", "train.stop_after_iters=2"], tmp_path / "runs", tmp_path / "data")
    out = train_coco(["norm=bn", "optim.base_lr=0.05"], tmp_path / "runs", tmp_path / "data", check=False)
    assert out.returncode == 2 and "optim.base_lr=0.02 (now 0.05)" in out.stderr, out.stderr[-2000:]
    assert "cannot apply it to a resumed run" in out.stderr


def test_nonfinite_loss_exits_3_with_a_diverged_record(tmp_path):
    out = train_coco(["norm=bn", "optim.lr=1e30", "train.ckpt_period=1"], tmp_path / "runs", tmp_path / "data",
                     check=False)
    assert out.returncode == 3 and "at iteration" in out.stderr, out.stderr[-2000:]
    summary = json.loads((only_run(tmp_path / "runs") / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["bbox_AP"] is None and "at iteration" in summary["error"]
    for path in (only_run(tmp_path / "runs") / "checkpoints").glob("*.pth"):  # no diverged step saved
        model = torch.load(path, weights_only=False)["model"]
        assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point()), path.name


@pytest.mark.parametrize(("args", "message"), [
    (["data=coco", "data.root=/nonexistent"], "train2017"),
    (["data=coco"], "data.root is not set for data=coco"),
    (["solver.steps=[200000]"], "solver.steps must be increasing iterations inside"),
    (["batch_mode=grouped"], "detection trains with batch_mode=device"),
    (["norm.name=nope"], "unknown norm 'nope'; registered norms: bn, brn, cbn, evonorm_s0, frn, frozenbn, gn"),
    (["model.weights=/nonexistent.pt"], "model.weights=/nonexistent.pt is not a file"),
    (["norm=mabn", "norm.window=0"], "norm.window must be a positive integer or null, got 0"),
    (["optim.lr=-1"], "optim.lr must be a positive number"),
])
def test_bad_configs_fail_before_building(tmp_path, args, message):
    out = train_coco(args, tmp_path / "runs", tmp_path / "data", check=False, base=("logger=none",))
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())  # no run directory
    assert not (tmp_path / "data").exists()  # nothing generated either


def test_imagenet_weights_of_another_norm_exit_2(tmp_path):
    from mabn.models import build_model
    from mabn.norms import build_norm

    net = build_model("resnet50", build_norm("bn"), num_classes=10)
    torch.save({"model": net.state_dict()}, tmp_path / "bn.pt")
    out = train_coco(["norm=mabn", f"model.weights={tmp_path / 'bn.pt'}"], tmp_path / "runs", tmp_path / "data",
                     check=False)
    assert out.returncode == 2 and "does not fit this backbone" in out.stderr, out.stderr[-2000:]


def compose_coco(*overrides, return_hydra_config=False):
    from hydra import compose, initialize_config_dir


    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train_coco", overrides=list(overrides),
                       return_hydra_config=return_hydra_config)


def test_every_norm_and_experiment_composes(tmp_path):
    from mabn.config import ConfigError, validate_detection
    from mabn.norms import registered_norms

    for norm in registered_norms():
        cfg = compose_coco(f"norm={norm}", "batch=2")
        assert (cfg.batch, cfg.batch_mode, cfg.data.name) == (2, "device", "shapes")
        validate_detection(cfg)
    scratch = compose_coco("experiment=coco_2x_scratch", "norm=mabn")
    assert (scratch.solver.max_iter, list(scratch.solver.steps), scratch.solver.warmup_iters) == \
        (180000, [120000, 160000], 500)
    assert scratch.optim.base_lr == 0.02 and scratch.optim.base_batch == 16 and scratch.model.freeze_at == 0
    with pytest.raises(ConfigError, match="data.root is not set for data=coco"):
        validate_detection(scratch)
    fine = compose_coco("experiment=coco_2x_finetune", f"model.weights={tmp_path}")
    assert fine.model.freeze_at == 2
    one = compose_coco("experiment=coco_1x", "model.weights=x.pt")
    assert (one.solver.max_iter, list(one.solver.steps)) == (90000, [60000, 80000])
    slurm = compose_coco("experiment=coco_2x_scratch", "launcher=slurm", return_hydra_config=True)
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher") and slurm.hydra.launcher.tasks_per_node == 8


def test_linear_scaling_rule():
    import train_coco

    cfg = compose_coco("experiment=coco_2x_scratch")
    lr, paper = train_coco._scaled_schedule(cfg, sgd_batch=16)  # 8 GPUs x 2 images: the recipe as written
    assert (lr, paper["max_iter"], paper["steps"], paper["warmup_iters"]) == (0.02, 180000, (120000, 160000), 500)
    lr, four = train_coco._scaled_schedule(cfg, sgd_batch=8)  # 4 GPUs: half the lr, twice the iterations
    assert (lr, four["max_iter"], four["steps"], four["warmup_iters"], four["eval_period"]) == \
        (0.01, 360000, (240000, 320000), 1000, 40000)


def test_sigterm_checkpoints_and_exits(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MABN_RUNS": str(tmp_path / "runs"),
           "MABN_DATA": str(tmp_path / "data")}
    cmd = [sys.executable, str(ROOT / "train_coco.py"), *TINY, "solver.max_iter=1000", "solver.steps=[900]"]
    code, stdout, stderr = sigterm_once(cmd, env, tmp_path / "runs", "*/metrics.jsonl")
    assert code == 143, stderr[-3000:]
    assert "stopped by signal at iteration" in stdout
    (last,) = (tmp_path / "runs").glob("*/checkpoints/last_checkpoint")
    saved = torch.load(last.parent / last.read_text().strip(), weights_only=False)
    assert saved["iteration"] >= 0 and len(saved["trainer"]["hooks"]["RankState"]["per_rank"]) == 1


@pytest.mark.parametrize("launcher", ["torchrun", "detectron2_launch"])
def test_ddp_two_processes_gloo(tmp_path, launcher):
    if launcher == "torchrun":
        cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train_coco.py")]
    else:  # train.num_gpus=2: detectron2's launch() spawns the processes (gloo on CPU)
        cmd = [str(ROOT / "train_coco.py"), "train.num_gpus=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MABN_RUNS": str(tmp_path / "runs"),
           "MABN_DATA": str(tmp_path / "data")}
    out = subprocess.run([sys.executable, *cmd, *TINY, "norm=mabn", "batch=1", "solver.max_iter=2",
                          "solver.steps=[1]", "train.eval_period=2"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads((only_run(tmp_path / "runs") / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sgd_batch"] == 2 and summary["norm_batch"] == 1
    # the command line's overrides reach the record from the parent process (spawned workers lack Hydra's)
    assert "norm=mabn" in (only_run(tmp_path / "runs") / "hydra" / "overrides.yaml").read_text()
    assert {"AP", "AP50"} <= set(summary["bbox"])
    if launcher == "detectron2_launch":  # a stop inside spawned workers comes out as the run's exit code
        out = subprocess.run([sys.executable, *cmd, *TINY, "norm=mabn", "batch=1", "solver.max_iter=4",
                              "solver.steps=[3]", "run.name=stopped", "train.stop_after_iters=1"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0 and "stopped by train.stop_after_iters at iteration 1" in out.stdout


def test_ddp_resume_gives_each_rank_its_own_statistics_and_random_streams(tmp_path):
    """Two gloo ranks, mabn at n = 1 (each rank's moving averages are of its own batches): a run stopped after
    2 of 4 iterations and resumed ends bitwise where a straight run does. detectron2's checkpoint is rank 0's;
    resumed from it alone, rank 1 would continue with rank 0's statistics and RNG states."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MABN_DATA": str(tmp_path / "data")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_coco.py"), *TINY, "norm=mabn", "batch=1", "train.eval_period=100"]
    for runs, extra in (("straight", []), ("resumed", ["train.stop_after_iters=2"]), ("resumed", [])):
        out = subprocess.run([*cmd, *extra], cwd=ROOT, env={**env, "MABN_RUNS": str(tmp_path / runs)},
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-4000:]
    straight, resumed = (torch.load(only_run(tmp_path / runs) / "checkpoints" / "model_final.pth",
                                    weights_only=False) for runs in ("straight", "resumed"))
    ranks = [state["norm_state"] for state in straight["trainer"]["hooks"]["RankState"]["per_rank"]]
    assert len(ranks) == 2 and any(not torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # own batches
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for mine, theirs in zip(ranks, (s["norm_state"] for s in resumed["trainer"]["hooks"]["RankState"]["per_rank"]),
                            strict=True):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
