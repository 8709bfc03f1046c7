"""The detection training loop on detectron2's trainer, checkpointer and hooks: objects in, a result out.

Only train_coco.py sees the config; it builds the model, optimizer and data and calls ``fit``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer, create_ddp_model, hooks
from detectron2.solver import LRMultiplier, WarmupParamScheduler
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import JSONWriter
from detectron2.utils.logger import setup_logger
from fvcore.common.param_scheduler import MultiStepParamScheduler

from mabn.dist import all_reduce_max

from .events import WandbWriter
from .hooks import (
    FiniteWeights,
    FirstStep,
    MetricPrinter,
    RankCheckpointer,
    RankState,
    StopHook,
    StopTraining,
    WallClock,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """Iteration counts of one run (already rescaled for its SGD batch) and the step-decay shape."""

    max_iter: int
    steps: tuple[int, ...]
    warmup_iters: int
    warmup_factor: float = 0.001
    gamma: float = 0.1
    ckpt_period: int = 5000
    eval_period: int = 20000
    log_period: int = 20

    def lr_multiplier(self) -> WarmupParamScheduler:
        """Step decay at ``steps`` after a linear warm-up over ``warmup_iters`` (detectron2's schedulers)."""
        values = [self.gamma**k for k in range(len(self.steps) + 1)]
        multi = MultiStepParamScheduler(values=values, milestones=list(self.steps), num_updates=self.max_iter)
        return WarmupParamScheduler(multi, self.warmup_factor, min(self.warmup_iters / self.max_iter, 1.0))


@dataclass
class FitResult:
    """How a run ended: ``finished`` (metrics hold the last evaluation), ``stopped`` or ``nonfinite``."""

    status: str
    message: str = ""
    exit_code: int = 0
    start_iter: int = 0
    elapsed_s: float = 0.0
    metrics: dict = field(default_factory=dict)


def setup(output_dir: Path, rank: int, seed: int) -> None:
    """detectron2's loggers (console on rank 0, ``log.txt`` in the run directory) and every RNG seeded
    (torch, numpy, random: detectron2's augmentations draw from numpy's global RNG)."""
    for name in ("detectron2", "mabn"):
        setup_logger(str(output_dir), distributed_rank=rank, name=name)
    seed_all_rng(seed)


def launch(main: Callable, num_processes: int, args: tuple) -> int:
    """detectron2's launch(): ``num_processes`` local processes in one process group (gloo on CPU).

    Returns the exit code of the first process that exited with one (a stop: 143, a NaN: 3), else 0."""
    from detectron2.engine import launch as d2_launch
    from torch.multiprocessing import ProcessExitedException

    try:
        d2_launch(main, num_processes, dist_url="auto", args=args)
    except ProcessExitedException as err:
        if err.exit_code is None or err.exit_code < 0:  # killed by a signal: not a code of ours
            raise
        return err.exit_code
    return 0


def create_local_process_group(processes_per_machine: int) -> None:
    """What detectron2's launch() sets up for its utilities, for processes torchrun or SLURM started."""
    comm.create_local_process_group(processes_per_machine)


class _LossCheckedOnEveryRank:
    """detectron2 checks the summed loss on the main process only; there it raises, while the other ranks
    step on into the next collective and wait for the process group's timeout. Here every rank checks, at
    the same step, before detectron2 does: all of them stop with the same error."""

    def _write_metrics(self, loss_dict, data_time, prefix="", iter=None):
        total = sum(v.detach().float() for v in loss_dict.values())
        if all_reduce_max((~torch.isfinite(total)).float().reshape(1)).item():
            at = self.iter if iter is None else iter
            raise FloatingPointError(f"Loss became infinite or NaN at iteration={at} (on at least one rank)")
        super()._write_metrics(loss_dict, data_time, prefix=prefix, iter=iter)


class CheckedTrainer(_LossCheckedOnEveryRank, SimpleTrainer):
    pass


class CheckedAMPTrainer(_LossCheckedOnEveryRank, AMPTrainer):
    pass


def make_trainer(model, loader, optimizer, *, amp_dtype: torch.dtype | None):
    """detectron2's SimpleTrainer, or its AMPTrainer (autocast to ``amp_dtype``; loss scaling only for fp16),
    with the loss checked on every rank."""
    if amp_dtype is None:
        return CheckedTrainer(model, loader, optimizer)
    scaler = None if amp_dtype == torch.float16 else torch.amp.GradScaler(enabled=False)
    return CheckedAMPTrainer(model, loader, optimizer, precision=amp_dtype, grad_scaler=scaler)


def fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, train_loader: Callable[[int], Iterable],
        evaluate: Callable[[torch.nn.Module], dict], schedule: Schedule, output_dir: Path,
        amp_dtype: torch.dtype | None, wandb_run=None, resume: bool = True,
        on_resume: Callable[[int], None] | None = None, stop_requested: Callable[[], bool] = lambda: False,
        stop_after: int | None = None, preempted_code: int = 143, nonfinite_code: int = 3) -> FitResult:
    """Train ``model`` (DDP with per-device buffers when in a process group) with periodic checkpoints and
    COCO evaluation; resume from ``output_dir/checkpoints`` when a checkpoint is there.

    ``train_loader(start_iter)`` gives the training stream from an iteration on; ``evaluate(model)`` the
    metric dict; ``on_resume(start_iter)`` runs after a checkpoint was loaded (records to truncate).
    """
    device = next(model.parameters()).device
    # buffers are never broadcast: batch statistics stay per device (syncbn synchronises itself)
    net = create_ddp_model(model, broadcast_buffers=False,
                           device_ids=[device.index] if device.type == "cuda" else None)
    trainer = make_trainer(net, train_loader(0), optimizer, amp_dtype=amp_dtype)
    ckpt_dir = output_dir / "checkpoints"
    if comm.is_main_process():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    rank_state = RankState(model)
    checkpointer = RankCheckpointer(model, str(ckpt_dir), trainer=trainer, rank_state=rank_state)
    last_eval: dict = {}

    def run_eval() -> dict:
        last_eval.clear()
        last_eval.update(evaluate(model))
        return last_eval

    clock = WallClock()
    writers = [MetricPrinter(schedule.max_iter), JSONWriter(str(output_dir / "metrics.jsonl")),
               WandbWriter(wandb_run)] if comm.is_main_process() else []
    # registered before a resume: their state (lr, clock, each rank's norm buffers and RNG) is restored too
    trainer.register_hooks([
        clock,
        rank_state,
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=LRMultiplier(optimizer, schedule.lr_multiplier(), schedule.max_iter)),
        FiniteWeights(model),  # before the checkpointer: no checkpoint of a diverged step
        hooks.PeriodicCheckpointer(checkpointer, schedule.ckpt_period, max_to_keep=2),
        hooks.EvalHook(schedule.eval_period, run_eval),
        hooks.PeriodicWriter(writers, period=schedule.log_period),
        StopHook(checkpointer.save, stop_requested, stop_after, preempted_code), FirstStep(output_dir),
    ])
    start_iter = 0
    if resume and checkpointer.has_checkpoint():
        checkpointer.resume_or_load("", resume=True)  # model, optimizer, iteration, hooks' state
        start_iter = trainer.iter + 1
        trainer.reset_data_loader(lambda: train_loader(start_iter))
        if on_resume is not None:
            on_resume(start_iter)
        logger.info("resumed from %s at iteration %d", checkpointer.get_checkpoint_file(), start_iter)
    try:
        trainer.train(start_iter, schedule.max_iter)
    except StopTraining as stop:
        return FitResult("stopped", f"stopped by {stop.reason}; checkpoint in {ckpt_dir}", stop.exit_code,
                         start_iter, clock.elapsed())
    except FloatingPointError as err:  # detectron2's loss check, or its RPN's "boxes contain Inf/NaN" (no iteration)
        return FitResult("nonfinite", f"training diverged at iteration {trainer.iter}: {err}; the last good "
                         f"checkpoint in {ckpt_dir} is kept", nonfinite_code, start_iter, clock.elapsed())
    return FitResult("finished", "", 0, start_iter, clock.elapsed(), dict(last_eval))


def detectron2_version() -> str:
    """The installed detectron2's version (for run records)."""
    import detectron2

    return detectron2.__version__
