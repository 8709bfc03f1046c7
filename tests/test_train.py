"""The training entry point for real: every norm trains, resume is exact, DDP runs, bad input is named."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mabn.norms import registered_norms

from .procs import sigterm_once
from .tinydata import make_fmnist_like, make_imagefolder, write_idx

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data=fmnist", "model=cifar_resnet20", "model.depth=8", "model.width=4", "data.batch_size=8",
        "data.workers=0", "logger=none", "train.log_every=1", "train.eval_max_batches=2", "epochs=2",
        "train.max_iters_per_epoch=2", "schedule=cosine", "optim.lr=0.05"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_fmnist_like(tmp_path_factory.mktemp("fmnist"))


def train(args, runs, data_root, *, timeout=300, check=True, launcher=None, base=TINY):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MABN_RUNS": str(runs), "WANDB_SILENT": "true"}
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train_imagenet.py"), *base, f"data.root={data_root}", *args]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout}\n{out.stderr[-4000:]}")
    return out


def run_dir(runs):
    (d,) = [p for p in Path(runs).iterdir() if p.is_dir() and p.name != "multirun"]
    return d


@pytest.mark.parametrize("norm", registered_norms())
def test_two_epochs_per_norm(norm, tmp_path, data_root):
    batch = "batch=8" if norm == "syncbn" else "batch=2"
    train([f"norm={norm}", batch], tmp_path, data_root)
    d = run_dir(tmp_path)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["norm"] == norm and summary["iters"] == 4 and summary["device_batch"] == 8
    assert summary["norm_batch"] == (8 if norm == "syncbn" else 2)
    assert 0 <= summary["top1"] <= 100 and summary["val_count"] == 16
    assert summary["status"] == "finished" and summary["experiment"] is None  # no experiment= given
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in lines if "train/loss" in x] == [1, 2, 3, 4]
    assert (d / "checkpoints" / "last.pt").exists() and (d / "hydra" / "config.yaml").exists()


def test_device_mode_and_window(tmp_path, data_root):
    train(["norm=mabn", "batch=4", "batch_mode=device"], tmp_path, data_root)
    summary = json.loads((run_dir(tmp_path) / "summary.json").read_text())
    assert summary["device_batch"] == 4 and summary["norm_batch"] == 4 and summary["norm_params"]["window"] == 8


def test_rerun_of_a_finished_run_keeps_its_record(tmp_path, data_root):
    """A sweep rerun over a finished cell trains nothing and leaves summary.json as the training start wrote
    it (its commit, time and command), byte for byte, and adds no metrics."""
    train(["norm=bn", "batch=2"], tmp_path, data_root)
    d = run_dir(tmp_path)
    summary, metrics = (d / "summary.json").read_bytes(), (d / "metrics.jsonl").read_bytes()
    # the record names the processor model, not only the architecture (Linux: /proc/cpuinfo)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    for model in [x.split(":", 1)[1].strip() for x in cpuinfo if x.startswith("model name")][:1]:
        assert json.loads(summary)["device"].startswith(f"CPU {model} (")
    out = train(["norm=bn", "batch=2"], tmp_path, data_root)
    assert "already finished" in out.stdout
    assert (d / "summary.json").read_bytes() == summary and (d / "metrics.jsonl").read_bytes() == metrics


def _final_state(runs):
    saved = torch.load(run_dir(runs) / "checkpoints" / "last.pt", weights_only=False)
    return saved["model"], saved["optimizer"]["state"], saved["state"]


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["mabn", "brn"])
def test_resume_is_bitwise(norm, tmp_path, data_root):
    """N steps straight == N/2 steps, stop, resume (same command), N/2 steps: weights, norm state, optimizer."""
    args = [f"norm={norm}", "batch=2", "norm.warmup_iters=1", "epochs=3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(args, straight, data_root)
    out = train(args + ["train.stop_after_iters=3"], resumed, data_root)  # stops mid-epoch 2
    assert "stopped by train.stop_after_iters at iteration 3" in out.stdout
    out = train(args, resumed, data_root)
    assert "resumed from" in out.stdout and "iteration 3" in out.stdout
    (m1, o1, s1), (m2, o2, s2) = _final_state(straight), _final_state(resumed)
    assert m1.keys() == m2.keys()
    for key in m1:
        assert torch.equal(m1[key], m2[key]), key
    for key in o1:
        assert torch.equal(o1[key]["momentum_buffer"], o2[key]["momentum_buffer"])
    assert s1["iter"] == s2["iter"] == 6 and s1["last_eval"] == s2["last_eval"]
    lines = [json.loads(x) for x in (run_dir(resumed) / "metrics.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in lines if "train/loss" in x] == list(range(1, 7))  # no duplicates
    # the record names the code of each start (a run resumed after a git pull trained on two commits)
    summary = json.loads((run_dir(resumed) / "summary.json").read_text())
    assert [start["git_sha"] for start in summary["starts"]] == [summary["git_sha"]] * 2
    assert len(json.loads((run_dir(straight) / "summary.json").read_text())["starts"]) == 1


def test_sigterm_checkpoints_and_exits(tmp_path, data_root):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MABN_RUNS": str(tmp_path)}
    cmd = [sys.executable, str(ROOT / "train_imagenet.py"), *TINY, f"data.root={data_root}", "norm=bn", "batch=8",
           "epochs=1000", "train.max_iters_per_epoch=null"]
    code, stdout, stderr = sigterm_once(cmd, env, Path(tmp_path), "*/metrics.jsonl", timeout=120)
    assert code == 143, stderr[-3000:]
    assert "stopped by signal SIGTERM" in stdout
    state = torch.load(run_dir(tmp_path) / "checkpoints" / "last.pt", weights_only=False)["state"]
    assert state["iter"] >= 1


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path, data_root):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = train(["norm=mabn", "batch=2", "epochs=1"], tmp_path, data_root, launcher=launcher, timeout=600)
    summary = json.loads((run_dir(tmp_path) / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sgd_batch"] == 16 and summary["val_count"] == 32
    saved = torch.load(run_dir(tmp_path) / "checkpoints" / "last.pt", weights_only=False)
    assert len(saved["per_rank"]) == 2  # each rank's own norm statistics
    a, b = (r["norm_state"]["bn1.running_var"] for r in saved["per_rank"])
    assert not torch.equal(a, b), "per-device statistics must differ between ranks (no buffer broadcast)"
    assert out.stdout.count("done: top1") == 1  # rank 0 alone prints


def test_wandb_offline_writes_a_run(tmp_path, data_root):
    train(["norm=bn", "batch=8", "logger=wandb", "epochs=1"], tmp_path, data_root)
    d = run_dir(tmp_path)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["wandb_id"] and list((d / "wandb").glob(f"offline-run-*-{summary['wandb_id']}"))


@pytest.mark.parametrize("args, message", [
    (["data=imagenet", "data.root=/nonexistent", "batch=8"], "ImageFolder layout"),
    (["batch=3"], "batch=3, data.batch_size=8: normalization batch 3 does not divide the device batch 8"),
    (["batch=16"], "batch=16, data.batch_size=8: normalization batch 16 does not divide the device batch 8"),
    (["norm.name=nope"], "unknown norm 'nope'; registered norms: bn, brn"),
    (["batch=0"], "batch must be a positive integer, got 0"),
    (["norm=syncbn", "batch=2"], "syncbn normalizes over the global batch"),
    (["norm=mabn", "batch=2", "norm.impl=fused"], "norm.impl=fused runs the Triton kernels on CUDA, but this "
     "process runs on cpu"),
    (["batch=2", "data.workers=-1"], "data.workers must be an integer >= 0 (0: load in the training process), got -1"),
])
def test_bad_config_named_before_training(args, message, tmp_path, data_root):
    out = train(args, tmp_path, data_root, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr
    assert not [p for p in Path(tmp_path).iterdir()]  # refused before the run directory was claimed


@pytest.mark.slow
def test_imagefolder_trains_and_class_folders_are_checked(tmp_path):
    """data=imagenet on a tiny ImageFolder (ImageNet's layout): JPEG decoding, crops, ResNet-18, evaluation."""
    root = make_imagefolder(tmp_path / "imagefolder")
    base = ["data=imagenet", "data.image_size=32", "data.batch_size=4", "data.workers=0", "model=resnet18",
            "logger=none", "train.log_every=1", "epochs=1", "train.max_iters_per_epoch=3", "optim.lr=0.05"]
    train(["data.num_classes=3", "norm=mabn", "batch=2"], tmp_path / "runs", root, base=base)
    summary = json.loads((run_dir(tmp_path / "runs") / "summary.json").read_text())
    assert summary["data"] == "imagenet" and summary["model"] == "resnet18" and summary["iters"] == 3
    assert summary["val_count"] == 12 and 0 <= summary["top1"] <= 100

    out = train(["norm=bn", "batch=4"], tmp_path / "bad", root, base=base, check=False)  # num_classes 1000
    assert out.returncode == 2 and "data.num_classes=1000 but" in out.stderr and "set data.num_classes=3" in out.stderr
    (root / "val" / "n00000001").rename(root / "val" / "n00000009")  # labels would shift silently
    out = train(["data.num_classes=3", "norm=bn", "batch=4"], tmp_path / "bad", root, base=base, check=False)
    assert out.returncode == 2 and "only in train/: ['n00000001']" in out.stderr, out.stderr[-2000:]
    assert not list((tmp_path / "bad").glob("*/checkpoints"))


def test_missing_imagenet_root_mentions_fmnist(tmp_path, data_root):
    out = train(["data=imagenet", "data.root=null", "batch=8"], tmp_path, data_root, check=False)
    assert out.returncode == 2 and "data=fmnist" in out.stderr and "IMAGENET_ROOT" in out.stderr


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_root):
    out = train(["norm=bn", "batch=4", "optim.lr=1e30", "train.ckpt_every_iters=1", "epochs=1"], tmp_path, data_root,
                check=False)
    assert out.returncode == 3, out.stdout + out.stderr[-2000:]
    assert "non-finite loss" in out.stderr and "at iteration" in out.stderr
    bad = int(out.stderr.split("at iteration ")[1].split(";")[0])
    state = torch.load(run_dir(tmp_path) / "checkpoints" / "last.pt", weights_only=False)["state"]
    assert state["iter"] == bad - 1
    summary = json.loads((run_dir(tmp_path) / "summary.json").read_text())  # results tables count divergences
    assert summary["status"] == "diverged" and summary["top1"] is None and summary["iters"] == bad - 1
    assert f"at iteration {bad}" in summary["error"] and summary["norm"] == "bn" and summary["norm_batch"] == 4


def test_local_multirun_goes_on_after_a_diverged_cell(tmp_path, data_root):
    out = train(["norm=bn", "batch=4,3", "optim.lr=1e30", "epochs=1", "seed=0,1"], tmp_path, data_root,
                base=["-m", *TINY], check=False)
    assert out.stderr.count("this sweep cell ended with exit code 3") == 2
    # the sweep goes on, then says which cells failed, one line each, and exits 1 (batch=3: a config error)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "sweep: 0 of 4 cells finished, 4 failed" in out.stdout
    summary = out.stdout.split("sweep: ")[1].splitlines()[1:]
    assert sum("FAILED (exit 3)" in line for line in summary) == 2 and \
        sum("FAILED (exit 2)" in line and "batch=3" in line for line in summary) == 2
    for seed in (0, 1):
        (d,) = Path(tmp_path).glob(f"fmnist-*-s{seed}")
        assert json.loads((d / "summary.json").read_text())["status"] == "diverged"


@pytest.mark.slow
def test_joblib_launcher_runs_cells_in_parallel_processes(tmp_path, data_root):
    # with loader workers, as experiment=fmnist has: loky's own start method is the default in a joblib cell
    out = train(["norm=bn,mabn", "batch=2", "epochs=1", "launcher=joblib", "launcher.n_jobs=2", "data.workers=1"],
                tmp_path, data_root, base=["-m", *TINY])
    assert "Joblib.Parallel(n_jobs=2" in out.stdout + out.stderr
    assert "sweep: 2 of 2 cells finished, 0 failed" in out.stdout  # reported from the worker processes too
    for norm in ("bn", "mabn"):
        (d,) = Path(tmp_path).glob(f"fmnist-*-{norm}-n2-*")
        assert json.loads((d / "summary.json").read_text())["status"] == "finished"


def test_the_three_treatments_of_inference_statistics_are_recorded(tmp_path, data_root):
    """PreciseBN at two estimation batches, mini-batch statistics at test, and norms frozen for the second half:
    one run, every evaluation in summary.json, the frozen norms' counters stopped where the records say."""
    train(["norm=mabn", "batch=2", "epochs=1", "train.precise_bn.when=end", "train.precise_bn.batch=[2,8]",
           "train.precise_bn.images=16", "eval.norm_stats=[population,batch]", "train.freeze_norms_from=0.5"],
          tmp_path, data_root)
    d = run_dir(tmp_path)
    summary = json.loads((d / "summary.json").read_text())
    rows = {(r["stats"], r.get("batch"), r.get("images")): r for r in summary["evals"]}
    assert set(rows) == {("ema", None, None), ("batch", 2, None), ("precise", 2, 16), ("precise", 8, 16)}
    assert summary["top1"] == rows["ema", None, None]["top1"]
    assert summary["top1_precise"] == rows["precise", 2, 16]["top1"]
    assert all(r["count"] == 16 for r in rows.values())
    assert summary["norms_frozen_at"] == 1  # ceil(0.5 x 2 iterations)
    state = torch.load(d / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]
    counters = {int(v) for k, v in state.items() if k.endswith("num_batches_tracked")}
    assert counters == {4}  # one step of 4 normalization batches, then frozen: no batch statistics taken
    line = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if "val/ema/top1" in x][-1]
    assert line["val/precise_B8_N16/top1"] == rows["precise", 8, 16]["top1"]


def test_batch_statistics_as_the_recorded_evaluation(tmp_path, data_root):
    train(["norm=bn", "batch=2", "epochs=1", "eval.norm_stats=batch"], tmp_path, data_root)
    summary = json.loads((run_dir(tmp_path) / "summary.json").read_text())
    (batch,) = [r for r in summary["evals"] if r["stats"] == "batch"]
    assert summary["top1"] == batch["top1"] and batch["batch"] == 2
    assert summary["inference_stats"].startswith("mini-batch statistics of groups of 2")


@pytest.mark.slow
def test_resume_refuses_another_config_and_keeps_the_checkpoint(tmp_path, data_root):
    train(["norm=bn", "batch=2", "epochs=1"], tmp_path, data_root)
    last = run_dir(tmp_path) / "checkpoints" / "last.pt"
    before = last.read_bytes()
    out = train(["norm=bn", "batch=2", "epochs=1", "norm.momentum=0.2"], tmp_path, data_root, check=False)
    assert out.returncode == 2 and "holds another run (norm.momentum: 0.1 -> 0.2)" in out.stderr
    assert "run.resume=false" not in out.stderr  # no message suggests a destructive fix
    assert last.read_bytes() == before


def test_ablation_variant_trains_in_its_own_run_and_records_its_switches(tmp_path):
    """experiment=fmnist_ablation with a switch: the run directory and summary.json name the variant."""
    root = make_fmnist_like(tmp_path / "fmnist")
    train(["experiment=fmnist_ablation", "norm=mabn", "norm.backward_stat=batch", "norm.average=ema", "batch=2",
           "model=cifar_resnet20", "model.depth=8", "model.width=4", "train.max_iters_per_epoch=2"],
          tmp_path / "runs", root)
    d = run_dir(tmp_path / "runs")
    assert d.name == "ablation-fmnist-cifar_resnet20-mabn-backward_stat_batch-average_ema-n2-b8-s0"
    summary = json.loads((d / "summary.json").read_text())
    assert summary["experiment"] == "fmnist_ablation"
    assert summary["norm_params"]["backward_stat"] == "batch" and summary["norm_params"]["average"] == "ema"


def _broken_fmnist(root: Path, case: str) -> Path:
    """A copy of the tiny set with one thing wrong."""
    make_fmnist_like(root)
    labels, images = root / "train-labels-idx1-ubyte.gz", root / "t10k-images-idx3-ubyte.gz"
    if case == "label 255":
        write_idx(labels, np.array([255] + [1] * 95))
    elif case == "test images 32x32":
        write_idx(images, np.zeros((32, 32, 32)))
    elif case == "count mismatch":
        write_idx(labels, np.ones(95))
    elif case == "truncated":
        data = gzip.decompress(images.read_bytes())
        images.write_bytes(gzip.compress(data[:-100]))
    elif case == "bad magic":
        data = bytearray(gzip.decompress(images.read_bytes()))
        data[2] = 0x42
        images.write_bytes(gzip.compress(bytes(data)))
    return root


@pytest.mark.parametrize("case, message", [
    ("label 255", "train-labels-idx1-ubyte.gz: 1 label(s) outside [0, data.num_classes=10), e.g. 255"),
    ("test images 32x32", "t10k-images-idx3-ubyte.gz: images of 32x32 but the training images"),
    ("count mismatch", "shapes (96, 28, 28) and (95,) do not match"),
    ("truncated", "t10k-images-idx3-ubyte.gz: IDX header says shape (32, 28, 28)"),
    ("bad magic", "t10k-images-idx3-ubyte.gz is not an IDX file (bad magic 00004203)"),
])
def test_bad_data_is_named_before_the_run_directory_is_claimed(case, message, tmp_path):
    """Labels outside the classes (before: IndexError at the first step, naming no file), test images of another
    size (before: accepted), counts, truncation, bad magic (before: a traceback after the claim): exit 2, the
    file named, nothing claimed."""
    root = _broken_fmnist(tmp_path / "data", case)
    out = train(["batch=2"], tmp_path / "runs", root, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
