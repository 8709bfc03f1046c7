"""A real one-node SLURM (Debian's slurmctld/slurmd/munge) on localhost: sweeps, preemption, requeue, tables.

Needs root and apt-get to install the packages (scripts/slurm_local/cluster.sh); skipped otherwise.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .test_train import TINY
from .tinydata import make_fmnist_like

# one cluster, one worker; minutes per test (Debian's packages installed, trainings queued and requeued)
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.xdist_group("slurm")]
ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "scripts" / "slurm_local" / "cluster.sh"
# one CPU task per job, no GPU line: the local node has 2 CPUs and no GRES
CPU_JOB = ["launcher.gpus_per_node=null", "launcher.tasks_per_node=1", "launcher.cpus_per_task=1",
           "launcher.mem_gb=null", "launcher.timeout_min=30"]
# 1200 iterations at device batch 8 (600 in the two-rank job): time to preempt. 384 training samples, so
# 25 epochs: every epoch forks its loader workers, and fewer forks of a threaded process are fewer chances
# of the rare fork-time deadlock seen once in a loader worker (README, "Known issues")
LONG = ["train.max_iters_per_epoch=null", "epochs=25", "logger=wandb"]
# DataLoader workers, as on a real cluster: a stop signal sent to a SLURM job reaches every process of the
# job step, the loader workers included, and the run must still checkpoint, requeue and resume
JOB_TINY = [*(arg for arg in TINY if not arg.startswith("data.workers=")), "data.workers=2"]


@pytest.fixture(scope="module")
def slurm():
    """SLURM_CONF and PATH of a running cluster; stopped (jobs cancelled) after the module."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("a real SLURM needs root and apt-get (Debian's slurmctld, slurmd, munge); this "
                    "machine has " + ("no root" if os.geteuid() != 0 else "no apt-get"))
    # room for apt-get to wait (up to 600 s per call, cluster.sh) for a lock another apt holds
    subprocess.run(["bash", str(CLUSTER), "install"], check=True, timeout=1500)
    # not under pytest's 0700 temp folders: munged refuses a socket whose parents others cannot traverse
    state = Path(tempfile.mkdtemp(prefix="mabn-slurm-"))
    started = subprocess.run(["bash", str(CLUSTER), "start", str(state)], capture_output=True, text=True,
                             timeout=180)
    assert started.returncode == 0, started.stderr
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf"),
           "PATH": os.environ["PATH"] + ":/usr/sbin:/sbin", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    yield env
    subprocess.run(["bash", str(CLUSTER), "stop", str(state)], timeout=180, check=False)
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_fmnist_like(tmp_path_factory.mktemp("fmnist"), train=384)


def wait_for(predicate, timeout: float, what: str, env=None, output: Path | None = None):
    """Poll until predicate() holds; on time-out, say what SLURM thinks of the jobs and what they printed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    state = ""
    if env:
        state = subprocess.run(["scontrol", "show", "job"], env=env, capture_output=True, text=True).stdout
    printed = output.read_text()[-3000:] if output is not None and output.exists() else "(no output file)"
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{state}\n{printed}")


def last_iter(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return max((x["iter"] for x in lines), default=0)


def jobs(env) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def assert_resumed_once(run_dir: Path, iters: int):
    """One continuous record: every training iteration once, one wandb run id across both processes."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["iters"] == iters
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in lines if "train/loss" in x] == list(range(1, iters + 1))
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and {p.name.rsplit("-", 1)[1] for p in wandb_runs} == {summary["wandb_id"]}


def test_submitit_multirun_two_jobs_and_the_table(slurm, tmp_path, data_root):
    runs = tmp_path / "runs"
    env = {**slurm, "MABN_RUNS": str(runs)}
    cmd = [sys.executable, str(ROOT / "train_imagenet.py"), "-m", "launcher=slurm", "experiment=fmnist",
           *JOB_TINY, f"data.root={data_root}", "norm=bn,mabn", "batch=2", *CPU_JOB]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dirs = sorted(p for p in runs.iterdir() if p.name.startswith("fmnist-"))
    assert [p.name for p in run_dirs] == ["fmnist-cifar_resnet20-bn-n2-b8-s0",
                                          "fmnist-cifar_resnet20-mabn-n2-b8-s0"]
    for run_dir in run_dirs:
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["experiment"] == "fmnist"
        assert summary["iters"] == 4
    logs = sorted((runs / "multirun" / ".submitit").glob("*/*_0_log.out"))  # one SLURM job per cell
    assert len(logs) == 2 and all("done: top1" in p.read_text() for p in logs)

    table = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tables.py"),
                            "--collect", *map(str, run_dirs),
                            "--records", str(tmp_path / "records"), "--out", str(tmp_path / "results")],
                           capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr
    text = (tmp_path / "results" / "fmnist.md").read_text()
    assert "| bn | 2 |" in text and "| mabn | 2 |" in text
    assert (tmp_path / "results" / "figures" / "fmnist_vs_n.png").exists()


def test_submitit_preemption_checkpoints_requeues_and_resumes(slurm, tmp_path, data_root):
    runs = tmp_path / "runs"
    env = {**slurm, "MABN_RUNS": str(runs)}
    cmd = [sys.executable, str(ROOT / "train_imagenet.py"), "-m", "launcher=slurm", "experiment=fmnist",
           *JOB_TINY, f"data.root={data_root}", "norm=mabn", "batch=2", *CPU_JOB, *LONG]
    sweep = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        run_dir = runs / "fmnist-cifar_resnet20-mabn-n2-b8-s0"
        wait_for(lambda: last_iter(run_dir) >= 20, 300, "the job to train 20 iterations", env)
        (job,) = jobs(env)
        # what SLURM sends ahead of a time limit to a submitit job (--signal=USR2@...), and what preemption
        # uses; to every process of the step, the loader workers too
        subprocess.run(["scancel", "--signal=USR2", job], env=env, check=True)
        output, _ = sweep.communicate(timeout=900)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, output[-4000:]
    log = "".join(p.read_text() for p in (runs / "multirun" / ".submitit").glob("*/*_log.*"))
    assert "stopped by signal SIGUSR2" in log and "resumed from" in log
    assert_resumed_once(run_dir, 1200)


def test_sbatch_wrapper_ddp_preemption_requeues_and_resumes(slurm, tmp_path, data_root):
    """Plain sbatch + srun with two tasks (gloo DDP): USR1 to the batch shell -> both ranks checkpoint ->
    scontrol requeue -> the same script runs again and resumes."""
    runs = tmp_path / "runs"
    env = {**slurm, "MABN_RUNS": str(runs), "PY": sys.executable}
    out_file = tmp_path / "job.out"
    submit = subprocess.run(
        ["sbatch", "--parsable", "--ntasks-per-node=2", f"--output={out_file}",
         str(ROOT / "scripts" / "sbatch" / "train.sbatch"), "train_imagenet.py", "experiment=fmnist",
         *JOB_TINY, f"data.root={data_root}", "norm=bn", "batch=2", *LONG],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    job = submit.stdout.strip().split(";")[0]
    run_dir = runs / "fmnist-cifar_resnet20-bn-n2-b8-s0"
    try:
        wait_for(lambda: last_iter(run_dir) >= 20, 300, "the job to train 20 iterations", env, out_file)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)
        wait_for(lambda: (run_dir / "summary.json").exists() and job not in jobs(env), 900,
                 "the requeued job to finish", env, out_file)
    finally:
        subprocess.run(["scancel", job], env=env, check=False)
    text = out_file.read_text()
    assert "preemption signal" in text and "(restart 1)" in text and "resumed from" in text, text[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sgd_batch"] == 16
    assert_resumed_once(run_dir, 600)  # 384 samples / (2 ranks x 8) = 24 iterations per epoch
