"""Preemption and time limits: a signal asks for a checkpoint at the next step, then the job ends or requeues.

Outside submitit (torchrun, plain ``srun``/``sbatch``, a terminal) SIGTERM, SIGUSR1 and a first Ctrl-C (SIGINT;
a second one interrupts at once) stop the run after a checkpoint with exit code 143; scripts/sbatch/
train.sbatch then requeues the job. These signals often reach the whole process group, loader workers
included: the workers ignore them (``mabn.data.loaders.ignore_stop_signals``) and the main process decides.
Inside a submitit job
(hydra-submitit-launcher) submitit owns the signals: it ignores SIGTERM on purpose and requeues on its
preemption signal (SUBMITIT_PREEMPT_SIGNAL, USR2 by default) by resubmitting the same Hydra job. Here that
signal is caught first, the run checkpoints at the next step, and only then is the signal handed to
submitit's handler, so the requeued job resumes from a checkpoint written a step ago.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what schedulers and shells read as "terminated"


class StopSignals:
    """Installs the handlers; ``requested`` is polled once per step, ``hand_over`` runs after the checkpoint."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._chained: dict[int, object] = {}

    def install(self) -> StopSignals:
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
            self._chained[sig] = signal.getsignal(sig)  # submitit's checkpoint-and-requeue handler
            signals = [sig]
        else:
            signals = [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT]
        for sig in signals:
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, _frame) -> None:  # only records: the training loop checkpoints at a step edge
        if signum == signal.SIGINT and signal.SIGINT in self.received:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the checkpoint
        self.received.append(signum)

    @property
    def requested(self) -> bool:
        return bool(self.received)

    @property
    def signum(self) -> int:
        """The first signal received, 0 for none (what ranks reduce to agree on a stop)."""
        return self.received[0] if self.received else 0

    def describe(self, signum: int | None = None) -> str:
        """'signal SIGTERM', for this process's signal or for ``signum`` (another rank's)."""
        signum = self.signum if signum is None else signum
        name = f"signal {signal.Signals(signum).name}" if signum else "no signal"
        return name if signum == self.signum else f"{name} (received by another rank)"

    def hand_over(self) -> None:
        """After the checkpoint: let submitit requeue the job (its handler exits the process)."""
        for signum in self.received:
            handler = self._chained.get(signum)
            if callable(handler):
                handler(signum, None)


def end_job(code: int) -> int:
    """Exit with a failing run's code, except inside a Hydra multirun: there the basic (local) launcher runs
    every cell in this one process, so a diverged or misconfigured cell is reported and the sweep goes on
    (its summary.json says what happened; submitit jobs are separate processes either way). A stop signal
    ends the whole sweep: it was meant for the job, not for one cell."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if code and code != EXIT_PREEMPTED and multirun:
        print(f"this sweep cell ended with exit code {code}; the sweep goes on", file=sys.stderr, flush=True)
        return code
    if code:
        sys.exit(code)
    return 0


def _hydra_callback_base() -> type:
    from hydra.experimental.callback import Callback

    return Callback


class SweepSummary(_hydra_callback_base()):
    """A Hydra callback (``hydra.callbacks.sweep_summary`` in the entry configs): each finished cell appends its
    overrides and exit code to ``<sweep dir>/cells.jsonl`` (a file, so joblib workers and submitit jobs on a
    shared file system report too); at the end of the multirun one line per cell is printed, and the sweep
    exits 1 when any cell failed (the cells go on regardless: ``end_job``)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        path = self._path(config)
        if path is not None and path.is_file():
            path.unlink()  # an interrupted sweep's cells: this run reports its own

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return  # a single run: no sweep to summarize, no sweep directory to make

        code = job_return.return_value if job_return.status == JobStatus.COMPLETED else None
        failed = job_return.status != JobStatus.COMPLETED or (isinstance(code, int) and code != 0)
        line = {"overrides": " ".join(job_return.overrides or []), "code": code if isinstance(code, int) else 1,
                "failed": failed}
        if job_return.status != JobStatus.COMPLETED:
            line["error"] = f"{type(job_return._return_value).__name__}: {job_return._return_value}"
        path = self._path(config)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(line) + "\n")

    def on_multirun_end(self, config, **kwargs) -> None:
        path = self._path(config)
        if path is None or not path.is_file():
            return
        cells = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        failed = [c for c in cells if c["failed"]]
        print(f"sweep: {len(cells) - len(failed)} of {len(cells)} cells finished, {len(failed)} failed", flush=True)
        for c in cells:
            state = f"FAILED (exit {c['code']})" if c["failed"] else "ok"
            print(f"  {state:<16} {c['overrides']}" + (f"  {c['error']}" if c.get("error") else ""), flush=True)
        if failed:
            sys.exit(1)

    @staticmethod
    def _path(config):
        try:
            return Path(config.hydra.sweep.dir) / "cells.jsonl"
        except Exception:  # noqa: BLE001 - no sweep directory: nothing to report
            return None
