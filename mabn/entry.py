"""What both entry scripts share: exit codes, the error/cleanup wrapper, AMP modes, run facts for summary.json."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import dist, rundir
from .config import ConfigError
from .loop import EXIT_FAILED, EXIT_NONFINITE
from .preemption import EXIT_PREEMPTED, StopSignals, end_job
from .records import git_sha, hardware

EXIT_CONFIG = 2
__all__ = ["EXIT_CONFIG", "EXIT_NONFINITE", "EXIT_PREEMPTED", "RunFacts", "amp_dtype", "config_failure", "finish",
           "precise_bn_seed", "run_job"]
# not a run's own files: hydra/ (the composed config, written by rundir.begin once the directory is this
# run's) and *.log (Hydra's job log, which Hydra opens in the run directory before the job starts)
HYDRA_FILES = ("hydra",)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """train.amp: auto is bf16 on a GPU and off on a CPU."""
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def precise_bn_seed(seed: int) -> int:
    """The seed of the loader that recomputes statistics: another order than the training loader's."""
    return seed + 7919


def config_failure(err: ConfigError, run_dir: Path | None = None) -> int:
    """Print a config error; remove ``run_dir`` when it holds nothing but what Hydra wrote for this start
    (an invalid config leaves no run directory behind)."""
    print(f"config error: {err}", file=sys.stderr, flush=True)
    if run_dir is not None and run_dir.is_dir() and dist.rank() == 0:  # one rank cleans up
        # a fresh claim this start made (run.json, an empty checkpoints/) is no run: the corrected command
        # may take the directory; any record or checkpoint, or another start's claim, keeps it
        claimed = run_dir.resolve() in rundir.FRESH_CLAIMS
        own = [p for p in run_dir.iterdir() if p.name not in (*HYDRA_FILES, rundir.LOCK_FILE)
               and p.suffix != ".log" and not (
            claimed and (p.name in (rundir.RUN_FILE, "log.txt")  # log.txt: detectron2's log of this start
                         or (p.name == "checkpoints" and not any(p.iterdir()))))]
        if not own:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:  # a resumed run refused after its claim: its start never trained, and run.json says why
            rundir.mark_failed(run_dir, f"config error: {err}")
    return EXIT_CONFIG


def run_job(body: Callable[[StopSignals], int], run_dir: Path | None = None) -> int:
    """Run one process's job: a ConfigError found while building exits 2, the process group is torn down,
    and after a stop by signal submitit's requeue handler runs (the checkpoint is written by then)."""
    stops = StopSignals()
    try:
        code = body(stops)
        # every rank ends here at the same step; tearing the group down while another rank still talks
        # over it (rank 0 writing the checkpoint) aborts the process under gloo
        dist.barrier()
    except ConfigError as err:
        code = config_failure(err, run_dir)
    except Exception as err:  # the traceback follows; run.json says this start ended before a step, and why
        if run_dir is not None and dist.rank() == 0:
            rundir.mark_failed(run_dir, f"{type(err).__name__}: {err}")
        timeout = dist.collective_timeout_message(err)
        if timeout is None:
            raise
        print(f"error: {timeout}", file=sys.stderr, flush=True)  # a lost rank: one line, no traceback
        rundir.release()
        os._exit(EXIT_FAILED)  # the group cannot be torn down with a peer gone: leave without waiting on it
    finally:
        dist.cleanup()
        rundir.release()
    if code == EXIT_PREEMPTED:
        stops.hand_over()
    return code


def finish(code: int) -> int:
    """Exit with the job's code (see ``preemption.end_job`` for multirun cells)."""
    return end_job(code)


class RunFacts:
    """What every summary.json says, whatever the task and however the run ended."""

    def __init__(self, **facts):
        self.sha = git_sha()  # the code this process runs (read once per process: run.json's start says the same)
        self.facts = facts

    def __call__(self, **more) -> dict:
        device = self.facts.get("device_obj")
        base = {k: v for k, v in self.facts.items() if k != "device_obj"}
        run_dir = self.facts.get("run_dir")
        from . import __version__
        from .norms._fused import path_report  # what impl="auto" ran: torch, fused, or torch after a mismatch
        return {**base, "device": hardware(device) if device is not None else None, "git_sha": self.sha,
                "norm_path": path_report(), "mabn_version": __version__,
                "starts": rundir.starts(run_dir) if run_dir else [],  # each start's commit (a resumed run's)
                "torch": torch.__version__, "command": " ".join(sys.argv),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **more}
