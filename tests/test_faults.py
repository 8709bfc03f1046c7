"""Fault injection through the real entry points: whatever goes wrong, the records and checkpoints on disk say
what really ran (stop signals to the whole process group, restarts without a checkpoint, divergence, changed
settings on resume, torn files, unwritable run directories, bad hyper-parameters, skipped images, DDP stops)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .test_train import ROOT, TINY, run_dir, train
from .tinydata import make_fmnist_like, make_imagefolder

pytestmark = pytest.mark.slow  # each drives the real entry point once or more (10-60 s on a 2-core CPU)

SHORT = ["norm=mabn", "batch=2", "epochs=2", "train.max_iters_per_epoch=6"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_fmnist_like(tmp_path_factory.mktemp("fmnist"))


def _records(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


def _train_iters(d: Path) -> list[int]:
    return [r["iter"] for r in _records(d) if "train/loss" in r]


def _checkpoints(d: Path) -> list[Path]:
    return sorted((d / "checkpoints").glob("*.pt"))


def _popen(args, runs, data_root, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MABN_RUNS": str(runs)}
    cmd = [sys.executable, str(ROOT / "train_imagenet.py"), *TINY, f"data.root={data_root}", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


def _wait_for(pattern: str, root: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not list(root.glob(pattern)) and time.time() < deadline:
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_stop_signal_to_the_process_group_with_workers_checkpoints(sig, tmp_path, data_root):
    """Ctrl-C, `timeout` and SLURM signal every process of the job, DataLoader workers included."""
    proc = _popen(["norm=bn", "batch=8", "epochs=1000", "train.max_iters_per_epoch=null", "data.workers=2"],
                  tmp_path, data_root)
    try:
        _wait_for("*/metrics.jsonl", tmp_path)
        time.sleep(1.0)  # well inside an epoch: workers are running
        os.killpg(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    assert f"stopped by signal {signal.Signals(sig).name}" in stdout
    assert "Traceback" not in stderr and "killed by signal" not in stderr, stderr[-3000:]
    saved = torch.load(run_dir(tmp_path) / "checkpoints" / "last.pt", weights_only=False)
    assert saved["state"]["iter"] >= 1
    assert _train_iters(run_dir(tmp_path))[-1] == saved["state"]["iter"]  # records end at the checkpoint


def test_start_without_a_checkpoint_discards_the_earlier_records(tmp_path, data_root):
    """Killed (or checkpoint deleted) before any checkpoint: the next start keeps no record of the first."""
    r = tmp_path / "R"
    train([*SHORT, f"run.dir={r}", "train.stop_after_iters=8"], tmp_path, data_root)
    for path in _checkpoints(r):
        path.unlink()
    out = train([*SHORT, f"run.dir={r}"], tmp_path, data_root)
    assert "has no checkpoint: the records of an earlier start" in out.stdout
    assert _train_iters(r) == list(range(1, 13))  # once each, not 1..8 twice
    assert json.loads((r / "summary.json").read_text())["status"] == "finished"


def test_another_run_in_the_same_directory_is_refused(tmp_path, data_root):
    r = tmp_path / "R"
    train([*SHORT, f"run.dir={r}", "epochs=1"], tmp_path, data_root)
    before = {p.name: p.read_bytes() for p in _checkpoints(r)}
    summary, composed = (r / "summary.json").read_bytes(), (r / "hydra" / "config.yaml").read_bytes()
    assert b"seed: 0" in composed and "seed=" not in (r / "hydra" / "overrides.yaml").read_text()
    out = train([*SHORT, f"run.dir={r}", "epochs=1", "seed=1"], tmp_path, data_root, check=False)
    assert out.returncode == 2 and f"run.dir={r} holds another run (seed: 0 -> 1)" in out.stderr
    out = train([*SHORT, f"run.dir={r}", "epochs=1", "run.resume=false"], tmp_path, data_root, check=False)
    assert out.returncode == 2 and "holds this run's checkpoint" in out.stderr
    assert {p.name: p.read_bytes() for p in _checkpoints(r)} == before
    assert (r / "summary.json").read_bytes() == summary
    assert (r / "hydra" / "config.yaml").read_bytes() == composed  # the refused commands' configs are not there
    out = train([*SHORT, f"run.dir={r}", "epochs=1", "seed=1", "run.overwrite=true"], tmp_path, data_root)
    assert "deleted the earlier run's files" in out.stdout
    assert json.loads((r / "summary.json").read_text())["seed"] == 1 and _train_iters(r) == list(range(1, 7))
    assert b"seed: 1" in (r / "hydra" / "config.yaml").read_bytes()


def test_weights_made_nonfinite_by_a_step_never_reach_a_checkpoint(tmp_path, data_root):
    """lr 1e6: the loss of a step is finite, the update is not (or the weights only evaluate to NaN)."""
    out = train(["norm=mabn", "batch=2", "optim.lr=1e6", "train.ckpt_every_iters=1", "epochs=1",
                 "train.max_iters_per_epoch=6"], tmp_path, data_root, check=False)
    assert out.returncode == 3, out.stdout + out.stderr[-2000:]
    assert "non-finite" in out.stderr and "iteration" in out.stderr
    in_step = "at iteration " in out.stderr
    bad = int(out.stderr.split("at iteration " if in_step else "(iteration ")[1].split()[0].rstrip(";)"))
    d = run_dir(tmp_path)
    for path in _checkpoints(d):
        saved = torch.load(path, weights_only=False)
        assert saved["state"]["iter"] < bad if in_step else saved["state"]["iter"] <= bad
        momentum = {f"opt.{k}": v["momentum_buffer"] for k, v in saved["optimizer"]["state"].items()}
        tensors = {**saved["model"], **momentum}
        for key, value in tensors.items():
            assert not value.is_floating_point() or torch.isfinite(value).all(), f"{path.name}: {key}"
    summary = json.loads((d / "summary.json").read_text())
    assert summary["status"] == "diverged" and f"iteration {bad}" in summary["error"]
    assert summary["checkpoint"] == (str(d / "checkpoints" / "last.pt") if _checkpoints(d) else None)
    assert "val/top1" not in (d / "metrics.jsonl").read_text()  # no evaluation of diverged weights recorded


def test_changed_optimizer_settings_are_refused_or_really_applied(tmp_path, data_root):
    r = tmp_path / "R"
    train([*SHORT, f"run.dir={r}", "train.stop_after_iters=4"], tmp_path, data_root)
    out = train([*SHORT, f"run.dir={r}", "optim.lr=0.01"], tmp_path, data_root, check=False)
    assert out.returncode == 2 and "the checkpoint restores optim.lr=0.05 (now 0.01)" in out.stderr
    assert "run.allow_changes=[optim.lr]" in out.stderr
    out = train([*SHORT, f"run.dir={r}", "optim.lr=0.01", "run.allow_changes=[optim.lr]"], tmp_path, data_root)
    assert "optim.lr: 0.05 -> 0.01" in out.stdout
    import math

    lrs = {x["iter"]: x["train/lr"] for x in _records(r) if "train/lr" in x}
    for it in (5, 12):  # after the resume at iteration 4: the new lr under the same cosine schedule
        assert math.isclose(lrs[it], 0.01 * 0.5 * (1 + math.cos(math.pi * it / 12)), rel_tol=1e-9, abs_tol=1e-12)
    summary = json.loads((r / "summary.json").read_text())
    assert summary["lr"] == 0.01 and summary["config_changes"] == [
        {"iter": 4, "key": "optim.lr", "old": 0.05, "new": 0.01}]
    # a change on a finished run trains nothing: its records stay as the start that trained wrote them
    before = {name: (r / name).read_bytes() for name in ("summary.json", "run.json", "metrics.jsonl")}
    out = train([*SHORT, f"run.dir={r}", "optim.lr=0.02", "run.allow_changes=[optim.lr]"], tmp_path, data_root)
    assert "already finished" in out.stdout
    assert {name: (r / name).read_bytes() for name in before} == before


def test_torn_last_record_is_dropped_and_other_damage_is_named(tmp_path, data_root):
    r = tmp_path / "R"
    train([*SHORT, f"run.dir={r}", "train.stop_after_iters=4"], tmp_path, data_root)
    metrics = r / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"iter": 5, "train/lo')  # killed mid-write
    out = train([*SHORT, f"run.dir={r}", "train.stop_after_iters=2"], tmp_path, data_root)
    assert "dropped a torn last line" in out.stdout and _train_iters(r) == list(range(1, 7))
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:-3]
    metrics.write_text("\n".join(lines) + "\n")
    out = train([*SHORT, f"run.dir={r}"], tmp_path, data_root, check=False)
    assert out.returncode == 2 and f"{metrics}:2 is not a JSON record" in out.stderr


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, data_root):
    r = tmp_path / "R"
    train([*SHORT, f"run.dir={r}", "train.stop_after_iters=8"], tmp_path, data_root)  # epoch end 6, stop 8
    last = r / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    (r / "checkpoints" / ".next.pt.tmp-123").write_bytes(b"half a save")  # killed mid-save
    out = train([*SHORT, f"run.dir={r}"], tmp_path, data_root)
    assert f"cannot read checkpoint {last}" in out.stdout and "resuming from the older last.1.pt" in out.stdout
    assert (r / "checkpoints" / "last.pt.unreadable").is_file()  # set aside: no rotation pushes it over a good one
    assert not list((r / "checkpoints").glob(".*.tmp-*"))  # partial saves removed
    assert "iteration 6" in out.stdout and _train_iters(r) == list(range(1, 13))
    for path in _checkpoints(r):
        path.write_bytes(b"torn")
    out = train([*SHORT, f"run.dir={r}"], tmp_path, data_root, check=False)
    assert out.returncode == 2 and "can be read" in out.stderr and "run.overwrite=true" in out.stderr


def test_resume_from_the_step_before_an_evaluation_logs_that_evaluation_once(tmp_path, data_root):
    """The last step of an epoch is checkpointed (last.1.pt), the epoch is evaluated and logged, and the
    process dies in the epoch-end save (last.pt torn): the resume evaluates that epoch again, and its
    validation record is in metrics.jsonl once."""
    r = tmp_path / "R"
    train([*SHORT, f"run.dir={r}", "epochs=1", "train.ckpt_every_iters=6"], tmp_path, data_root)
    last = r / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    out = train([*SHORT, f"run.dir={r}", "epochs=1", "train.ckpt_every_iters=6"], tmp_path, data_root)
    assert "resuming from the older last.1.pt" in out.stdout and "iteration 6" in out.stdout
    vals = [x for x in _records(r) if "val/top1" in x]
    assert [(x["iter"], x["epoch"]) for x in vals] == [(6, 1)] and _train_iters(r) == list(range(1, 7))


def test_unwritable_checkpoint_folder_fails_in_the_first_second(tmp_path, data_root):
    r = tmp_path / "R"
    r.mkdir()
    (r / "checkpoints").write_text("not a folder")
    out = train([*SHORT, f"run.dir={r}"], tmp_path, data_root, check=False)
    assert out.returncode == 2 and f"run.dir={r} is not writable" in out.stderr
    assert "epoch 1" not in out.stdout


@pytest.mark.parametrize("arg, message", [
    ("norm.window=0", "norm.window must be a positive integer or null, got 0"),
    ("norm.momentum=2", "norm.momentum must be a number in (0, 1]"),
    ("optim.lr=-1", "optim.lr must be a positive number"),
    ("optim.lr=abc", "optim.lr must be a positive number, or null for the linear scaling rule, got 'abc'"),
    ("train.eval_max_batches=0", "train.eval_max_batches must be a positive integer or null, got 0"),
    ("train.max_iters_per_epoch=0", "train.max_iters_per_epoch must be a positive integer or null, got 0"),
    ("schedule.warmup_factor=0", "schedule.warmup_factor must be a number in (0, 1]"),
    ("logger.mode=bogus", "logger.mode must be online, offline or disabled, got 'bogus'"),
])
def test_bad_hyper_parameters_are_named_and_leave_no_run_directory(arg, message, tmp_path, data_root):
    out = train(["norm=mabn", "batch=2", arg], tmp_path, data_root, check=False)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not [p for p in Path(tmp_path).iterdir() if p.name != "multirun"]


def test_skipped_images_are_counted_in_the_summary(tmp_path):
    root = make_imagefolder(tmp_path / "imagefolder")
    bad = next((root / "train" / "n00000001").iterdir())
    bad.write_bytes(b"not a jpeg")
    base = ["data=imagenet", "data.image_size=32", "data.batch_size=4", "data.workers=2", "model=resnet18",
            "logger=none", "epochs=1", "optim.lr=0.05", "data.num_classes=3", "norm=bn", "batch=4",
            "data.skip_corrupt=true"]
    train([], tmp_path / "runs", root, base=base)
    summary = json.loads((run_dir(tmp_path / "runs") / "summary.json").read_text())
    assert summary["skipped_images"] == 1 and summary["status"] == "finished"


def _processes():
    """(pid, fields after the command name: state, ppid, pgrp, session, ...) of every process in /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            yield int(stat.parent.name), stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue


def _children(pid: int) -> list[int]:
    return [child for child, fields in _processes() if int(fields[1]) == pid]


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def test_ddp_rank_stopped_by_another_ranks_signal_says_so(tmp_path, data_root):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MABN_RUNS": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_imagenet.py"), *TINY, f"data.root={data_root}", "norm=bn", "batch=2", "epochs=1000",
           "train.max_iters_per_epoch=null"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for("*/metrics.jsonl", tmp_path)
        (rank1,) = [p for p in _children(proc.pid) if _rank_of(p) == 1]
        os.kill(rank1, signal.SIGTERM)  # one rank only, as a node's own time limit would
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert "stopped by signal SIGTERM (received by another rank)" in stdout, stdout + stderr[-3000:]
    assert "exitcode  : 0" not in stderr  # neither rank claims a normal end
    saved = torch.load(run_dir(tmp_path) / "checkpoints" / "last.pt", weights_only=False)
    assert len(saved["per_rank"]) == 2 and saved["state"]["iter"] >= 1


def test_a_checkpoint_of_the_old_format_resumes(tmp_path, data_root):
    """Format 1 kept the normalization batch in a `batch` group ({norm_batch, mode}) and had no run.json."""
    from mabn.diagnostics import model_from_checkpoint

    r = tmp_path / "R"
    train([*SHORT, f"run.dir={r}", "train.stop_after_iters=4"], tmp_path, data_root)
    for path in _checkpoints(r):
        saved = torch.load(path, weights_only=False)
        config = {k: v for k, v in saved["config"].items() if k not in ("batch", "batch_mode")}
        saved["config"] = {**config, "batch": {"norm_batch": 2, "mode": "grouped"}}
        saved.pop("format")
        torch.save(saved, path)
    (r / "run.json").unlink()
    model, cfg, plan = model_from_checkpoint(r / "checkpoints" / "last.pt")
    assert (plan.norm_batch, plan.device_batch, cfg.batch_mode) == (2, 8, "grouped")
    out = train([*SHORT, f"run.dir={r}"], tmp_path, data_root)
    assert "resumed from" in out.stdout and "iteration 4" in out.stdout and _train_iters(r) == list(range(1, 13))
    starts = json.loads((r / "summary.json").read_text())["starts"]  # the first start's commit was not recorded
    assert [start["git_sha"] for start in starts] == [None, json.loads((r / "summary.json").read_text())["git_sha"]]


def test_another_sgd_batch_on_resume_changes_the_lr_only_when_allowed():
    """With optim.lr null the lr follows the SGD batch: resuming on other devices changes it with no key."""
    from types import SimpleNamespace

    from mabn.config import ConfigError
    from mabn.rundir import lr_change

    saved = SimpleNamespace(payload={"optimizer": {"param_groups": [{"initial_lr": 0.1}]}}, iteration=5)
    assert lr_change(saved, 0.1, []) == []
    with pytest.raises(ConfigError, match=r"restores lr 0.1, but this start computes lr 0.2 .*\[optim.lr\]"):
        lr_change(saved, 0.2, [])
    assert lr_change(saved, 0.2, ["optim.lr"]) == [{"iter": 5, "key": "lr", "old": 0.1, "new": 0.2}]


def test_a_checkpoint_that_cannot_be_written_ends_the_run_clearly(tmp_path, data_root):
    """A full disk at a checkpoint: a one-line error, exit 1, the previous checkpoint kept, no summary."""
    r = tmp_path / "R"
    train([*SHORT, f"run.dir={r}", "train.stop_after_iters=3"], tmp_path, data_root)
    before = (r / "checkpoints" / "last.pt").read_bytes()
    (r / "checkpoints" / "last.1.pt").mkdir()  # the rotation's rename onto it fails, as a full disk would
    out = train([*SHORT, f"run.dir={r}"], tmp_path, data_root, check=False)
    assert out.returncode == 1 and "error: cannot write a checkpoint in" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not (r / "summary.json").exists()
    assert (r / "checkpoints" / "last.pt").read_bytes() == before


def test_a_setting_the_saved_config_lacks_is_no_change():
    """A key added to a config after a run started (e.g. bn's weight_centering) is at its default: resuming
    or rerunning that run records no change (and a finished run stays as it is)."""
    from mabn import rundir

    saved = {"norm": {"name": "bn", "eps": 1e-5}, "seed": 0}
    now = {"norm": {"name": "bn", "eps": 1e-5, "weight_centering": False}, "seed": 0}
    assert rundir.resume_changes(saved, now, (), 5) == []
    assert rundir.resume_changes({**saved, "seed": 1}, now, (), 5) == [{"iter": 5, "key": "seed", "old": 1, "new": 0}]



def test_run_json_names_each_starts_commit_and_a_fresh_start_begins_again(tmp_path, monkeypatch):
    """A run resumed on other code trained on two commits: run.json (and so summary.json) says which."""
    from mabn import rundir

    shas = iter(["aaa", "bbb", "ccc"])
    monkeypatch.setattr(rundir, "git_sha", lambda: next(shas))
    cfg = {"norm": {"name": "bn"}, "seed": 0}
    rundir.record_config(tmp_path, cfg, resuming=False)
    rundir.record_config(tmp_path, cfg, resuming=True)
    assert [s["git_sha"] for s in rundir.starts(tmp_path)] == ["aaa", "bbb"]
    assert all(s["started"] for s in rundir.starts(tmp_path))
    rundir.record_config(tmp_path, cfg, resuming=False)  # no checkpoint to resume: this start is the first
    assert [s["git_sha"] for s in rundir.starts(tmp_path)] == ["ccc"]
    assert rundir.starts(tmp_path / "none") == []


def test_a_second_process_cannot_train_a_run_that_one_is_training(tmp_path, data_root):
    """A sweep submitted twice, or a cell started by hand beside its sweep: the second start is refused and
    names the process training the run; once that one has stopped, the run resumes."""
    proc = _popen(["norm=bn", "batch=8", "epochs=1000", "train.max_iters_per_epoch=null"], tmp_path, data_root)
    try:
        _wait_for("*/metrics.jsonl", tmp_path)
        second = train(["norm=bn", "batch=8", "epochs=1000", "train.max_iters_per_epoch=null"], tmp_path, data_root,
                       check=False)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by pid {proc.pid} on " in second.stderr and "one process trains a run" in second.stderr
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143
    d = run_dir(tmp_path)
    stopped_at = torch.load(d / "checkpoints" / "last.pt", weights_only=False)["state"]["iter"]
    assert _train_iters(d)[-1] == stopped_at  # the refused start wrote nothing of its own
    out = train(["norm=bn", "batch=8", "epochs=1000", "train.max_iters_per_epoch=null",
                 "train.stop_after_iters=2"], tmp_path, data_root)  # two iterations of this start
    assert f"iteration {stopped_at}" in out.stdout
    assert _train_iters(d)[-1] == stopped_at + 2


def test_run_directory_lock_is_released_when_the_job_ends(tmp_path):
    """The lock lives as long as the job: the next cell of a multirun in the same process, or any other
    process, may take the directory afterwards."""
    from mabn import rundir

    probe = [sys.executable, "-c", "import sys; from pathlib import Path; from mabn import rundir; "
             "rundir.hold(Path(sys.argv[1]))", str(tmp_path)]
    rundir.hold(tmp_path)
    try:
        refused = subprocess.run(probe, cwd=ROOT, capture_output=True, text=True)
        assert refused.returncode != 0 and f"is in use by pid {os.getpid()}" in refused.stderr
        assert rundir.hold(tmp_path) == []  # this process holds it already
    finally:
        rundir.release()
    assert subprocess.run(probe, cwd=ROOT, capture_output=True, text=True).returncode == 0
    try:  # and the kernel let go of that process's lock when it exited
        assert rundir.hold(tmp_path) == []
    finally:
        rundir.release()


def test_run_json_records_only_starts_that_trained_or_why_one_did_not(tmp_path):
    """A start that fails before its first step (every training image unreadable: the first batch raises) is in
    run.json as not trained, with the reason, and no summary.json claims a run; one that steps is marked trained.
    The results' provenance counts the commits of starts that trained (tests/test_results.py)."""
    root = make_imagefolder(tmp_path / "imagefolder")
    base = ["data=imagenet", "data.image_size=32", "data.batch_size=4", "data.workers=0", "model=resnet18",
            "logger=none", "epochs=1", "train.max_iters_per_epoch=2", "optim.lr=0.05", "data.num_classes=3",
            "norm=bn", "batch=4"]
    good = train([], tmp_path / "good", root, base=base)
    assert good.returncode == 0
    [start] = json.loads((run_dir(tmp_path / "good") / "run.json").read_text())["starts"]
    assert start["trained"] is True and "failed" not in start
    for image in (root / "train").rglob("*.JPEG"):
        image.write_bytes(b"not a jpeg")
    out = train([], tmp_path / "bad", root, base=base, check=False)
    assert out.returncode != 0 and "cannot read image" in out.stderr, out.stderr[-2000:]
    d = run_dir(tmp_path / "bad")
    [start] = json.loads((d / "run.json").read_text())["starts"]
    assert start["trained"] is False and start["failed"].startswith("RuntimeError: cannot read image"), start
    assert not (d / "summary.json").exists()


@pytest.fixture
def small_fs(tmp_path):
    """A real 8 MiB file system (tmpfs; mounting needs root, else the test is skipped with the reason)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}): needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(fs: Path, leave: int) -> None:
    """Fill ``fs`` up to ``leave`` free bytes with one file."""
    import shutil as _shutil

    free = _shutil.disk_usage(fs).free
    with open(fs / "filler", "wb") as f:
        try:
            f.write(b"\0" * max(0, free - leave))
            f.flush()
        except OSError:  # full before the count (the file system's own blocks): full is what was asked
            pass


def test_a_real_full_disk_at_a_checkpoint_is_one_line_naming_the_errno(small_fs, tmp_path, data_root):
    """Before: torch.save's "[enforce fail at inline_container.cc] unexpected pos" traceback and a partial temp
    file. Now: one line naming ENOSPC, exit 1, no partial file, the previous checkpoint intact, no summary."""
    r = small_fs / "R"
    train([*SHORT, f"run.dir={r}", "train.stop_after_iters=3"], tmp_path, data_root)
    last = r / "checkpoints" / "last.pt"
    before = last.read_bytes()
    _fill(small_fs, leave=len(before) // 2)  # room for the records, not for another checkpoint
    out = train([*SHORT, f"run.dir={r}"], tmp_path, data_root, check=False)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "error: cannot write a checkpoint in" in out.stderr and "ENOSPC: No space left on device" in out.stderr
    assert "Traceback" not in out.stderr and "inline_container" not in out.stderr, out.stderr[-3000:]
    assert not list((r / "checkpoints").glob(".*tmp*")) and last.read_bytes() == before
    assert not (r / "summary.json").exists()


def test_a_metrics_line_on_a_real_full_disk_is_kept_as_an_error_not_raised(small_fs):
    """A metrics line that cannot be appended is no traceback in the middle of training: the recorder keeps the
    error (TrainLoop._on_step then stops every rank at that step with it, mabn.loop.RECORDS_FAILED; that
    agreement is not driven here: filling the disk at a chosen step of a running trainer would be a race)."""
    from mabn.records import RunRecorder

    recorder = RunRecorder(small_fs / "run", enabled=True, wandb_cfg={"mode": "disabled"}, config={}, name="x")
    recorder.log({"iter": 1, "train/loss": 1.0})
    _fill(small_fs, leave=0)
    with open(recorder.metrics_path, "ab", buffering=0) as f:  # the first line's tmpfs page has room: use it up
        try:
            while True:
                f.write(b"x" * 512)
        except OSError:
            pass
    recorder.log({"iter": 2, "train/loss": 1.0})
    assert recorder.write_error and "No space left on device" in recorder.write_error
    recorder.close()


def _session(sid: int) -> list[int]:
    """The pids of the live (not zombie) processes in session ``sid``."""
    return [pid for pid, fields in _processes() if int(fields[3]) == sid and fields[0] != "Z"]


def test_kill_9_of_the_trainer_leaves_no_loader_process(tmp_path, data_root):
    """kill -9 of the trainer (what the OOM killer does) with data.workers=2: before, its fork server, both
    workers and the resource tracker lived on (~1.6 GB, for ever: the stop signals are blocked in them and the
    workers' parent, the server, was alive). Now the server dies with the trainer and the workers with the
    server: nothing of the run's session is left after 10 s."""
    proc = _popen(["norm=bn", "batch=8", "epochs=1000", "train.max_iters_per_epoch=null", "data.workers=2"],
                  tmp_path, data_root)
    try:
        _wait_for("*/metrics.jsonl", tmp_path)
        deadline = time.time() + 60  # inside an epoch (workers restart each epoch): trainer, server, tracker, workers
        while len(_session(proc.pid)) < 5 and time.time() < deadline:
            time.sleep(0.1)
        assert len(_session(proc.pid)) >= 5, _session(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 10
        while _session(proc.pid) and time.time() < deadline:
            time.sleep(0.2)
        left = _session(proc.pid)
    finally:
        proc.kill()
        for pid in _session(proc.pid):
            os.kill(pid, signal.SIGKILL)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left if Path(f"/proc/{p}").exists()]


def test_a_stalled_ddp_rank_ends_the_job_after_the_timeout_in_one_line(tmp_path, data_root):
    """SIGSTOP one rank (a hung node): before, the other waited in its collective for gloo's 30 minutes with no
    message. Now train.dist_timeout_s bounds the wait: the waiting rank says, in one line, which rank it is, what
    it waited for and that a rerun resumes, and the job ends, its checkpoint there to resume from."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MABN_RUNS": str(tmp_path)}
    args = [*TINY, f"data.root={data_root}", "norm=bn", "batch=2", "epochs=1000", "train.max_iters_per_epoch=null",
            "train.dist_timeout_s=10", "train.ckpt_every_iters=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_imagenet.py"), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rank1 = None
    try:
        _wait_for("*/checkpoints/last.pt", tmp_path)
        (rank1,) = [p for p in _children(proc.pid) if _rank_of(p) == 1]
        os.kill(rank1, signal.SIGSTOP)
        start = time.time()
        stdout, stderr = proc.communicate(timeout=150)
        waited = time.time() - start
    finally:
        if rank1 is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rank1, sig)
        proc.kill()
    assert proc.returncode != 0 and waited < 120, (waited, stderr[-3000:])
    line = next((x for x in stderr.splitlines() if x.startswith("error: rank 0 of 2 waited train.dist_timeout_s=10 s "
                                                                 "in a collective")), None)
    assert line and "rerun the command to resume from the last checkpoint" in line, stderr[-3000:]
    assert (run_dir(tmp_path) / "checkpoints" / "last.pt").exists()


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        for child in _children(todo.pop()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_kill_9_of_one_rank_under_torchrun_leaves_no_loader_process(tmp_path, data_root):
    """Under torchrun each rank runs in a session of its own, so torchrun's cleanup never reached the loader
    processes of a rank killed with -9 (before: its fork server and workers lived on). Now every process of
    the job is gone within 10 s of torchrun ending the job."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MABN_RUNS": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_imagenet.py"), *TINY, f"data.root={data_root}", "norm=bn", "batch=2", "epochs=1000",
           "train.max_iters_per_epoch=null", "data.workers=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job: set[int] = set()
    try:
        _wait_for("*/metrics.jsonl", tmp_path)
        deadline = time.time() + 60  # two ranks, each with a fork server, a resource tracker and two workers
        while len(job := _descendants(proc.pid)) < 10 and time.time() < deadline:
            time.sleep(0.2)
        assert len(job) >= 10, job
        (rank0,) = [p for p in _children(proc.pid) if _rank_of(p) == 0]
        os.kill(rank0, signal.SIGKILL)
        proc.communicate(timeout=120)
        deadline = time.time() + 10
        while any(_alive(p) for p in job) and time.time() < deadline:
            time.sleep(0.2)
        left = [p for p in job if _alive(p)]
    finally:
        proc.kill()
        for pid in job:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:100] for p in left if Path(f"/proc/{p}").exists()]
