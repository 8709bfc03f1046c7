"""The classification training loop: epochs of engine.train_one_epoch / engine.evaluate, with the per-step
policy around them (loss averaged over ranks at log steps, stop consensus, checkpoint cadence, resume).

Objects in, an ``Outcome`` out; like ``mabn.d2.engine.fit`` for detection. Only the entry script sees the
config: it builds the parts and hands them over in a ``Parts``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import dist, rundir
from .checkpoint import (
    Checkpoint,
    Checkpointer,
    CheckpointError,
    load_norm_state,
    norm_state,
    rng_state,
    set_rng_state,
)
from .engine import NonFiniteError, StepContext, evaluate, train_one_epoch
from .norms import batch_dependent_types, protocol
from .precise_bn import evaluate_statistics
from .preemption import EXIT_PREEMPTED, StopSignals

EXIT_NONFINITE = 3  # exit code of a diverged run (train_coco.py uses the same, through mabn.entry)
EXIT_FAILED = 1  # a checkpoint could not be written


@dataclass
class Settings:
    """The loop's numbers (from train.* and epochs)."""

    epochs: int
    iters_per_epoch: int
    log_every: int
    ckpt_every: int
    stop_after: int | None = None
    eval_max_batches: int | None = None
    trace_every: int = 100
    # PreciseBN (train.precise_bn): never, at the end, or after every epoch, at each estimation batch B over
    # N images (None: the loader's batches / every image)
    precise_when: str = "never"
    precise_batches: tuple = (128,)
    precise_images: int | None = 10000
    # evaluations also made with mini-batch statistics, in groups of batch_group test samples (eval.norm_stats)
    batch_stats_eval: bool = False
    batch_group: int | None = None
    headline: str = "ema"  # what top1 reports: ema (running averages) or batch
    freeze_from_iter: int | None = None  # train.freeze_norms_from as an iteration (None: never)


@dataclass
class Parts:
    """What the loop runs: the model (``net`` is its DDP/compiled wrapper), its optimization, its data."""

    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    ctx: StepContext
    train_loader: object
    val_loader: object
    sampler: object
    precise_loader: object | None = None
    tracer: object | None = None
    step: object | None = None  # the training step (engine.eager_step by default; mabn.graphs.GraphedStep)


@dataclass
class Outcome:
    """How a run ended: finished (0), stopped (0 or 143), diverged (3) or failed (1: no checkpoint written)."""

    status: str
    exit_code: int = 0
    message: str = ""
    state: dict = field(default_factory=dict)


class TrainLoop:
    """Runs ``Parts`` for ``Settings``; writes records through ``recorder``, checkpoints through ``checkpointer``."""

    def __init__(self, parts: Parts, settings: Settings, *, recorder, checkpointer: Checkpointer,
                 stops: StopSignals, info: dist.DistInfo, config: dict,
                 progress: Callable[[int, int, dict], None] = lambda *a: None):
        self.p, self.s, self.recorder, self.ckpt = parts, settings, recorder, checkpointer
        self.stops, self.info, self.config, self.progress = stops, info, config, progress
        self.state = {"epoch": 0, "iter_in_epoch": 0, "iter": 0, "best_top1": None, "elapsed": 0.0,
                      "last_eval": None, "changes": []}
        self._started, self._steps, self._stop = time.time(), 0, (0, False)
        self._was_over = False
        self._frozen: list = []  # hooks holding the batch-dependent norms at their eval map (freeze_from_iter)
        self.scaler = parts.ctx.scaler

    @property
    def total_iters(self) -> int:
        return self.s.epochs * self.s.iters_per_epoch

    def elapsed(self) -> float:
        return round(self.state["elapsed"] + time.time() - self._started, 1)

    def restore(self, saved: Checkpoint, keep_optimizer_settings: bool = False) -> None:
        """Continue from ``saved``: weights, optimizer, scheduler, this rank's norm state and RNGs, loop state.

        With ``keep_optimizer_settings`` the optimizer's hyper-parameters (lr, momentum, weight decay) are the
        configured ones, not the checkpoint's: a change the user allowed is really applied."""
        payload = saved.payload
        self.p.model.load_state_dict(payload["model"])
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.p.optimizer.param_groups]
        self.p.optimizer.load_state_dict(payload["optimizer"])
        self.p.scheduler.load_state_dict(payload["scheduler"])
        if keep_optimizer_settings:
            for group, settings in zip(self.p.optimizer.param_groups, configured, strict=True):
                group.update({k: v for k, v in settings.items() if k != "lr"})
            sched = self.p.scheduler
            sched.base_lrs = [g["initial_lr"] for g in configured]
            for group, base, fn in zip(self.p.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
                group["lr"] = base * fn(sched.last_epoch)
        if self.scaler is not None and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        if self.p.tracer is not None and payload.get("tracer"):  # its averages over the traced steps so far
            self.p.tracer.load_state_dict(payload["tracer"])
        mine = saved.rank_state(self.info.rank)
        load_norm_state(self.p.model, mine["norm_state"])
        set_rng_state(mine["rng"])
        self.state.update(payload["state"])
        self.state.setdefault("changes", [])
        self._started = time.time()

    def save(self, best: bool = False) -> None:
        """Every rank's norm state and RNGs gathered; rank 0 writes (collective: all ranks call it)."""
        per_rank = [{"norm_state": norm_state(self.p.model, batch_dependent_types()), "rng": rng_state()}]
        if self.info.world_size > 1:
            gathered = [None] * self.info.world_size
            torch.distributed.all_gather_object(gathered, per_rank[0])
            per_rank = gathered
        error = None
        if self.info.is_main:
            payload = {"model": self.p.model.state_dict(), "optimizer": self.p.optimizer.state_dict(),
                       "scheduler": self.p.scheduler.state_dict(),
                       "tracer": self.p.tracer.state_dict() if self.p.tracer is not None else None,
                       "scaler": self.scaler.state_dict() if self.scaler else None, "per_rank": per_rank,
                       "config": self.config, "state": {**self.state, "elapsed": self.elapsed()}}
            try:
                self.ckpt.save(payload, best=best)
            except Exception as err:  # noqa: BLE001 - a full disk, or any failure: every rank stops, none waits
                error = f"cannot write a checkpoint in {self.ckpt.dir}: {err}"
        if self.info.world_size > 1:
            error = dist.broadcast_object(error)
        if error is not None:
            raise CheckpointError(error)

    @property
    def was_over(self) -> bool:
        """True when this start found the run already trained and evaluated (a rerun of a finished cell)."""
        return self._was_over

    def fit(self) -> Outcome:
        """Train to the last epoch, or until a stop or a divergence."""
        self._was_over = self.state["epoch"] >= self.s.epochs
        self._maybe_freeze(self.state["iter"])  # a resumed run past the point trains frozen again
        try:
            while self.state["epoch"] < self.s.epochs:
                if self._train_epoch():
                    return self._stopped()
                self._evaluate_epoch()
        except NonFiniteError as err:
            where = f"after epoch {self.state['epoch'] + 1} (iteration {self.state['iter']})"
            message = str(err) if "iteration" in str(err) else f"{err} {where}; the last good checkpoint is kept"
            return Outcome("diverged", EXIT_NONFINITE, message, self.state)
        except CheckpointError as err:
            return Outcome("failed", EXIT_FAILED, f"{err}; the previous checkpoint is kept", self.state)
        return Outcome("finished", 0, "", self.state)

    def _train_epoch(self) -> bool:
        """The rest of the current epoch; True when a stop ended it early."""
        epoch, done = self.state["epoch"], self.state["iter_in_epoch"]
        if done >= self.s.iters_per_epoch:
            return False
        self.p.sampler.set_epoch(epoch, start_batch=done)
        getattr(self.p.train_loader.dataset, "set_epoch", lambda e: None)(epoch)
        if self.p.tracer is not None:
            self._arm_tracer(self.state["iter"] + 1)
        stats = train_one_epoch(self.p.net, self.p.train_loader, self.p.optimizer, self.p.scheduler,
                                self.p.criterion, self.p.ctx, first_iter=self.state["iter"],
                                num_iters=self.s.iters_per_epoch - done, on_step=self._on_step,
                                step=self.p.step)
        return stats["stopped"]

    def _arm_tracer(self, it: int) -> None:
        self.p.tracer.arm(it % self.s.trace_every == 0, it)

    def _on_step(self, it: int, metrics: dict) -> bool:
        """After each step: log, progress, then agree on a stop and checkpoint (the same step on every rank)."""
        self._steps += 1
        if self._steps == 1 and self.info.is_main:  # run.json: this start trained
            rundir.mark_trained(self.recorder.run_dir)
        self.state["iter"], self.state["iter_in_epoch"] = it, self.state["iter_in_epoch"] + 1
        if it % self.s.log_every == 0:
            if self.info.world_size > 1:  # the same step on every rank: the loss is averaged over ranks
                total = dist.all_reduce_sum(torch.tensor([metrics["loss"]], device=self.p.ctx.device))
                metrics["loss"] = float(total) / self.info.world_size
            self.recorder.log({"iter": it, "epoch": self.state["epoch"],
                               **{f"train/{k}": v for k, v in metrics.items()}})
        self.progress(it, self.total_iters, metrics)
        if self.p.tracer is not None:
            self._arm_tracer(it + 1)
        signum = self.stops.signum
        if self.recorder.write_error is not None:  # the records could not be written: stop here, every rank
            signum = RECORDS_FAILED
        if self.info.world_size > 1:  # a signal seen by any rank stops all of them, with its name
            signum = int(dist.all_reduce_max(torch.tensor([signum], device=self.p.ctx.device)).item())
        if signum == RECORDS_FAILED:
            raise CheckpointError(self.recorder.write_error or "rank 0 could not append to metrics.jsonl")
        self._maybe_freeze(it)
        requested = self.s.stop_after is not None and self._steps >= self.s.stop_after
        self._stop = (signum, requested)
        if signum or requested or it % self.s.ckpt_every == 0:
            self.save()
        return bool(signum or requested)

    def _maybe_freeze(self, it: int) -> None:
        """From iteration ``freeze_from_iter`` on, every batch-dependent norm trains with its eval map
        (population statistics; its affine still learns): Wu & Johnson's "frozen BN" treatment."""
        if self.s.freeze_from_iter is None or it < self.s.freeze_from_iter or self._frozen:
            return
        self._frozen = protocol.freeze_statistics(self.p.model)
        self.state["norms_frozen_at"] = self.state.get("norms_frozen_at") or it
        if self.info.is_main:
            print(f"iteration {it}: {len(self._frozen)} batch-dependent norm layers frozen at their population "
                  f"statistics for the rest of training", flush=True)

    def _evaluations(self, last: bool) -> list[dict]:
        """This epoch's evaluations: the running averages, mini-batch statistics, recomputed statistics."""
        def run(model):
            return evaluate(model, self.p.val_loader, self.p.criterion, self.p.ctx, self.s.eval_max_batches)

        rows = [evaluate_statistics(self.p.net, run, stats="ema")]
        if self.s.batch_stats_eval:
            rows.append(evaluate_statistics(self.p.model, run, stats="batch", group_size=self.s.batch_group))
        if self.s.precise_when == "epoch" or (self.s.precise_when == "end" and last):
            for b in self.s.precise_batches:  # the same weights with recomputed statistics, on a copy
                self.p.precise_loader.sampler.set_epoch(self.state["epoch"])
                rows.append(evaluate_statistics(self.p.model, run, stats="precise", batches=self.p.precise_loader,
                                                batch_size=b, max_images=self.s.precise_images,
                                                device=self.p.ctx.device))
        return rows

    def _evaluate_epoch(self) -> None:
        """Validation (and the other treatments of the statistics) at an epoch end, then the checkpoint."""
        epoch = self.state["epoch"]
        rows = self._evaluations(last=epoch + 1 == self.s.epochs)
        headline = next(r for r in rows if r["stats"] == self.s.headline)
        metrics = {k: v for k, v in headline.items() if k in ("loss", "top1", "top5", "count")}
        for row in rows:
            if row["stats"] == "precise" and "precise_top1" not in metrics:  # the first B: what top1_precise is
                metrics.update({f"precise_{k}": row[k] for k in ("loss", "top1", "top5")})
        metrics["evals"] = rows
        best = self.state["best_top1"] is None or metrics["top1"] > self.state["best_top1"]
        self.state["best_top1"] = max(metrics["top1"], self.state["best_top1"] or 0.0)
        self.state["last_eval"] = metrics
        self.recorder.log({"iter": self.state["iter"], "epoch": epoch + 1,
                           **{f"val/{k}": v for k, v in metrics.items() if k != "evals"},
                           **{f"val/{_eval_name(r)}/top1": r["top1"] for r in rows}})
        if self.info.is_main:
            extra = f" (recomputed statistics: top1 {metrics['precise_top1']:.2f})" if "precise_top1" in metrics else ""
            print(f"epoch {epoch + 1}/{self.s.epochs}: val top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f} "
                  f"loss {metrics['loss']:.4f}{extra}", flush=True)
        self.state["epoch"], self.state["iter_in_epoch"] = epoch + 1, 0
        self.save(best=best)

    def _stopped(self) -> Outcome:
        signum, _ = self._stop
        why = self.stops.describe(signum) if signum else "train.stop_after_iters"
        message = f"stopped by {why} at iteration {self.state['iter']}; checkpoint {self.ckpt.last}"
        return Outcome("stopped", EXIT_PREEMPTED if signum else 0, message, self.state)


RECORDS_FAILED = 1 << 16  # above every signal number: the stop agreed when rank 0 cannot write its records


def _eval_name(row: dict) -> str:
    """A metric name for one evaluation: ema, batch_n2, precise_B128_N10000."""
    if row["stats"] == "batch":
        return f"batch_n{row['batch']}" if row["batch"] else "batch"
    if row["stats"] == "precise":
        return f"precise_B{row['batch'] or 'loader'}_N{row['images']}"
    return row["stats"]
