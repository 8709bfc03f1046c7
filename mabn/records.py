"""Run records: metrics.jsonl (one line per logged step/epoch), summary.json, and the wandb mirror (rank 0)."""

from __future__ import annotations

import functools
import json
import os
import platform
import secrets
import string
import subprocess
import time
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def git_sha() -> str:
    """The project's commit, with '-dirty' when tracked files differ from it; 'unknown' outside git. Read once
    per process (the code a process runs is the code it imported), so run.json's start and summary.json agree."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), e.g. "AMD EPYC 7763 64-Core Processor"; the
    architecture where the system does not say. Two CPUs of one architecture can give a run other numbers."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> str:
    """A one-line description of the device the run used."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()} x{os.cpu_count()} threads={torch.get_num_threads()}"


def write_json_atomic(obj, path: Path) -> None:
    """Write ``obj`` as indented JSON via a temporary file and a rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _lines(path: Path):
    """(byte offset, record or None for a torn last line) per line; other damage raises a ValueError naming
    the file and the line number."""
    data = path.read_bytes()
    offset, lines = 0, data.split(b"\n")
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield offset, json.loads(line)
            except json.JSONDecodeError as err:
                if number < len(lines) - (not lines[-1]):
                    raise ValueError(f"{path}:{number} is not a JSON record ({err.msg}); the file is damaged: "
                                     f"repair or remove that line") from err
                yield offset, None  # a kill mid-write
        offset += len(line) + 1


def truncate_jsonl(path: Path, iteration: int, key: str, epoch: int | None = None) -> None:
    """Cut ``path`` before its first record whose ``key`` is past ``iteration`` — or, given the checkpoint's
    ``epoch`` (epochs completed), whose ``epoch`` is past it: the validation of an epoch whose last step was
    checkpointed but whose evaluation was not — or a torn last line: a resumed run writes those again. Records
    are appended in order, so what stays is a prefix, and the file is cut in place: a writer that already
    holds it open for appending (detectron2's) keeps writing to it."""
    if not path.exists():
        return
    for offset, record in _lines(path):
        if record is None or record.get(key, 0) > iteration or (epoch is not None and record.get("epoch", 0) > epoch):
            if record is None:
                print(f"{path}: dropped a torn last line (the process was killed while writing it)", flush=True)
            os.truncate(path, offset)
            return


class RunRecorder:
    """Writes the run's records on the main process; every other rank gets a no-op recorder."""

    def __init__(self, run_dir: Path, *, enabled: bool, wandb_cfg: dict, config: dict, name: str):
        self.run_dir, self.enabled, self.wandb = Path(run_dir), enabled, None
        self.write_error: str | None = None  # a metrics line that could not be written (TrainLoop stops on it)
        self.wandb_id = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        mode = wandb_cfg.get("mode", "disabled")
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"logger.mode must be online, offline or disabled, got {mode!r}")
        if mode != "disabled":
            import wandb

            id_file = self.run_dir / "wandb_id.txt"  # a stable id: a resumed run appends to the same wandb run
            if not id_file.exists():
                alphabet = string.ascii_lowercase + string.digits
                id_file.write_text("".join(secrets.choice(alphabet) for _ in range(8)) + "\n")
            self.wandb_id = id_file.read_text().strip()
            self.wandb = wandb.init(project=wandb_cfg.get("project", "mabn"), entity=wandb_cfg.get("entity"),
                                    id=self.wandb_id, resume="allow", dir=str(self.run_dir), mode=mode,
                                    name=name, config=config)

    def truncate_after(self, iteration: int, key: str = "iter") -> None:
        """On resume: drop records logged after the checkpoint's iteration (they will be logged again).

        ``key`` names the iteration field (detectron2's JSONWriter writes ``iteration``)."""
        if self.enabled:
            truncate_jsonl(self.metrics_path, iteration, key)

    def log(self, record: dict) -> None:
        """One metrics.jsonl line (with wall-clock time) and the same scalars to wandb."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk: the loop stops every rank at this step (write_error)
            self.write_error = f"cannot append to {self.metrics_path}: {err}"
            return
        if self.wandb is not None:
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("iter", "time")}
            self.wandb.log(scalars, step=record.get("iter"))

    def write_summary(self, summary: dict) -> None:
        if not self.enabled:
            return
        write_json_atomic(summary, self.run_dir / "summary.json")
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


# what every record pooled into one table must share: a cell pools seeds of one protocol, never more
PROTOCOL = ("task", "data", "model", "device_batch", "batch_mode", "world_size", "sgd_batch", "epochs", "iters",
            "val_count")


def check_protocol(records: list[dict], rows: tuple[str, ...] = ()) -> None:
    """ValueError naming the keys (and their values) in which the records' protocols differ; ``rows``: keys a
    table splits into rows of their own instead (results.cells puts several models in rows of their own)."""
    differ = {key: sorted({str(r.get(key)) for r in records}) for key in PROTOCOL if key not in rows}
    differ = {key: values for key, values in differ.items() if len(values) > 1}
    if differ:
        raise ValueError("the records of one table differ in their protocol, which a cell would pool: "
                         + "; ".join(f"{key}: {', '.join(values)}" for key, values in differ.items())
                         + " (collect each protocol into its own table: make_tables.py --table NAME)")
