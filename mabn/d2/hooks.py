"""Hooks of the detection loop: a printer that survives early stops, wall time and each rank's norm statistics
and RNG states kept across a resume, and the stop (preemption or a requested stop) that checkpoints first."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, get_event_storage

from mabn.checkpoint import load_norm_state, norm_state, rng_state, set_rng_state
from mabn.dist import all_reduce_max
from mabn.engine import state_tensors
from mabn.norms import batch_dependent_types


class StopTraining(BaseException):  # noqa: N818 - control flow, like SystemExit: not an error to log
    """Raised by a hook after it saved a checkpoint: the run stops here (preemption or a requested stop).

    A BaseException so that detectron2's train loop runs its ``after_train`` hooks (writers flush) without
    logging it as a failure."""

    def __init__(self, reason: str, exit_code: int):
        super().__init__(reason)
        self.reason, self.exit_code = reason, exit_code


class MetricPrinter(CommonMetricPrinter):
    """detectron2's console printer, printing each iteration once: asked twice for the same iteration before
    its timer has samples (a stop within 3 steps of a start, then ``after_train``), it divides by zero."""

    def __init__(self, max_iter: int):
        super().__init__(max_iter)
        self._printed = None

    def write(self):
        it = get_event_storage().iter
        if it != self._printed:
            self._printed = it
            super().write()


class FirstStep(HookBase):
    """After this start's first step: run.json records it as a start that trained (``rundir.mark_trained``)."""

    def __init__(self, run_dir):
        self.run_dir, self.done = run_dir, False

    def after_step(self) -> None:
        if not self.done:
            from detectron2.utils import comm

            from mabn import rundir

            if comm.is_main_process():  # rank 0 writes run.json
                rundir.mark_trained(self.run_dir)
            self.done = True


class WallClock(HookBase):
    """Training wall time that survives a resume: it is part of the trainer's checkpointed state."""

    def __init__(self):
        self._before, self._start = 0.0, time.time()

    def elapsed(self) -> float:
        return self._before + time.time() - self._start

    def state_dict(self) -> dict:
        return {"elapsed": self.elapsed()}

    def load_state_dict(self, state: dict) -> None:
        self._before, self._start = state["elapsed"], time.time()


class RankState(HookBase):
    """Each rank's batch-dependent norm buffers (MABN's moving averages, BN's running statistics) and RNG
    states (torch, numpy, Python), saved with every checkpoint and restored on resume, each rank its own:
    detectron2's checkpoint is rank 0's, so without this every rank would resume with rank 0's statistics
    and random streams. ``gather()`` (collective) runs on every rank right before each save (RankCheckpointer);
    a run resumed on fewer ranks keeps each rank's own, on more ranks the new ones get rank 0's."""

    def __init__(self, model: torch.nn.Module):
        self._model = model
        self._gathered: list = []

    def gather(self) -> None:
        self._gathered = comm.all_gather(
            {"norm_state": norm_state(self._model, batch_dependent_types()), "rng": _portable(rng_state())})

    def state_dict(self) -> dict:
        return {"per_rank": self._gathered}

    def load_state_dict(self, state: dict) -> None:
        per_rank = state["per_rank"]
        rank = comm.get_rank()
        mine = per_rank[rank] if rank < len(per_rank) else per_rank[0]
        load_norm_state(self._model, mine["norm_state"])
        kind, key, pos, has_gauss, gauss = mine["rng"]["numpy"]
        set_rng_state({**mine["rng"], "numpy": (kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss)})


def _portable(state: dict) -> dict:
    """RNG states detectron2 can load: it reads checkpoints with torch.load(weights_only=True), so numpy's key
    array travels as a tensor."""
    kind, key, pos, has_gauss, gauss = state["numpy"]
    return {**state, "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss)}


class RankCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer, with every rank's RankState gathered before each save (every rank calls
    ``save``; rank 0 writes): periodic checkpoints, the final one and a stop's all carry each rank's own."""

    def __init__(self, model: torch.nn.Module, save_dir: str, *, trainer, rank_state: RankState):
        super().__init__(model, save_dir, trainer=trainer)
        self._rank_state = rank_state

    def save(self, name: str, **kwargs) -> None:
        self._rank_state.gather()
        super().save(name, **kwargs)


class StopHook(HookBase):
    """After each step: on a signal (SLURM preemption) or after ``stop_after`` steps of this process, save a
    checkpoint and stop with StopTraining; otherwise nothing."""

    def __init__(self, save: Callable[..., None], signalled: Callable[[], bool], stop_after: int | None,
                 preempted_code: int):
        self._save, self._signalled, self._stop_after = save, signalled, stop_after
        self._code, self._steps = preempted_code, 0

    def after_step(self):
        self._steps += 1
        if self._signalled():
            reason, code = "signal", self._code
        elif self._stop_after is not None and self._steps >= self._stop_after:
            reason, code = "train.stop_after_iters", 0
        else:
            return
        self._save(f"model_{self.trainer.iter:07d}", iteration=self.trainer.iter)
        raise StopTraining(f"{reason} at iteration {self.trainer.iter + 1}", code)


class FiniteWeights(HookBase):
    """After each step and before any checkpoint hook: every rank's weights and buffers are finite, or the run
    stops here as diverged. detectron2 checks the loss only; a finite loss can come with an update that makes
    the weights non-finite (a huge lr), and that step must not become the "last good" checkpoint."""

    def __init__(self, model: torch.nn.Module):
        self._tensors = state_tensors(model)

    def after_step(self):
        worst = torch.nn.utils.get_total_norm(self._tensors, norm_type=float("inf"))
        if all_reduce_max((~torch.isfinite(worst)).float().reshape(1)).item():  # the same step on every rank
            raise FloatingPointError("non-finite weights after the optimizer step")
