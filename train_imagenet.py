#!/usr/bin/env python
"""ResNet training with a chosen norm and normalization batch: ``python train_imagenet.py norm=mabn batch=2``.

Validate the config -> claim the run directory (resume its checkpoint, or refuse another run's) -> build
data, model, optimizer -> mabn.loop.TrainLoop -> summary.json. Orchestrates; computes nothing itself.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mabn import dist, rundir
from mabn.checkpoint import Checkpoint, Checkpointer
from mabn.checkpoint import read as read_checkpoint
from mabn.config import ConfigError, statistics_plan, validate
from mabn.data import dataset_spec
from mabn.data.loaders import build_datasets, build_loaders, iters_per_epoch, skipped_images
from mabn.diagnostics import BatchStatsTracer
from mabn.engine import StepContext, compile_model
from mabn.entry import RunFacts, amp_dtype, config_failure, finish, precise_bn_seed, run_job
from mabn.graphs import GraphedStep
from mabn.loop import Outcome, Parts, Settings, TrainLoop
from mabn.models import build_model
from mabn.norms import NormContext, build_norm
from mabn.optim import build_optimizer, linear_scaled_lr, lr_lambda
from mabn.preemption import StopSignals
from mabn.records import RunRecorder, truncate_jsonl


@hydra.main(config_path="configs", config_name="train_imagenet", version_base="1.3")
def main(cfg: DictConfig) -> int:
    run_dir = Path(cfg.run.dir)
    try:
        # train.device=cuda without a GPU, or a bad train.dist_timeout_s, is named here
        info = dist.init_distributed(cfg.train.device, cfg.train.get("dist_timeout_s", 600))
        plan = validate(cfg, info.world_size, info.device.type)
    except (ConfigError, ValueError) as err:
        dist.cleanup()
        return finish(config_failure(err, run_dir if dist.env_ranks() is None or dist.env_ranks()[0] == 0
                                     else None))
    experiment = HydraConfig.get().runtime.choices.get("experiment")
    return finish(run_job(lambda stops: run(cfg, plan, info, stops, experiment), run_dir))


def run(cfg: DictConfig, plan: NormContext, info: dist.DistInfo, stops: StopSignals, experiment: str | None = None
        ) -> int:
    config = OmegaConf.to_container(cfg, resolve=True)
    checkpointer = Checkpointer(Path(cfg.run.dir) / "checkpoints", cfg.train.keep_last)
    lr = linear_scaled_lr(cfg.optim, plan.sgd_batch)
    saved, changes = claim_run_dir(cfg, config, checkpointer, info, lr)  # before any data or model is built
    torch.manual_seed(cfg.seed + info.rank)
    parts, settings, recipe, datasets = build(cfg, plan, info, lr)
    recorder = RunRecorder(cfg.run.dir, enabled=info.is_main, wandb_cfg=OmegaConf.to_container(cfg.logger),
                           config=config, name=cfg.run.name)
    loop = TrainLoop(parts, settings, recorder=recorder, checkpointer=checkpointer, stops=stops, info=info,
                     config=config, progress=_progress(cfg.train.progress, info.is_main))
    if saved is not None:
        loop.restore(saved, keep_optimizer_settings=bool(changes))
        loop.state["changes"] = loop.state["changes"] + changes
        if info.is_main:
            changed = "".join(f"; {c['key']}: {c['old']!r} -> {c['new']!r}" for c in changes)
            print(f"resumed from {saved.path} at epoch {loop.state['epoch']} iteration {saved.iteration}"
                  f"{changed}", flush=True)
    stops.install()
    facts = RunFacts(task="classification", experiment=experiment, data=cfg.data.name, model=cfg.model.name,
                     norm=cfg.norm.name, norm_params=dict(recipe.params), norm_batch=plan.norm_batch,
                     device_batch=plan.device_batch, batch_mode=cfg.batch_mode, world_size=info.world_size,
                     sgd_batch=plan.sgd_batch, lr=lr, seed=cfg.seed, epochs=cfg.epochs, device_obj=info.device,
                     amp=str(parts.ctx.amp_dtype), wandb_id=recorder.wandb_id, run_dir=cfg.run.dir)
    if info.is_main:
        print(f"run {cfg.run.dir}: norm={cfg.norm.name} n={plan.norm_batch} device batch={plan.device_batch} x "
              f"{info.world_size} = SGD batch {plan.sgd_batch}, lr {lr:g}, {cfg.epochs} epochs x "
              f"{settings.iters_per_epoch} iterations, {facts()['device']}", flush=True)
    outcome = loop.fit()
    skipped = dist.all_reduce_sum(torch.tensor([skipped_images(*datasets)], device=info.device))  # every rank's
    _summarize(outcome, loop, recorder, facts, skipped=int(skipped.item()), info=info)
    return outcome.exit_code


def claim_run_dir(cfg: DictConfig, config: dict, checkpointer: Checkpointer, info: dist.DistInfo, lr: float
                  ) -> tuple[Checkpoint | None, list[dict]]:
    """Rank 0 makes the run directory this run's (rundir.claim), finds the checkpoint to resume and the
    settings the resume changes, and cuts the records back to it; every rank then resumes the same file, or
    raises the same ConfigError."""
    saved, found, changes, error = None, None, [], None
    if info.is_main:
        try:
            saved, changes = _claim_on_rank0(cfg, config, checkpointer, lr)
            found = str(saved.path) if saved is not None else None
        except (ConfigError, ValueError) as err:  # ValueError: a damaged record file, named with its line
            error = str(err)
    found, changes, error = dist.broadcast_object((found, changes, error))
    if error is not None:
        raise ConfigError(error)
    if found and saved is None:  # the other ranks read the file rank 0 chose
        saved = read_checkpoint(found)
    return saved, changes


def _claim_on_rank0(cfg: DictConfig, config: dict, checkpointer: Checkpointer, lr: float
                    ) -> tuple[Checkpoint | None, list]:
    run_dir = Path(cfg.run.dir)
    rundir.check_writable(run_dir)
    saved, unreadable = checkpointer.newest()
    notices = rundir.claim(run_dir, config, has_checkpoint=saved is not None, resume=cfg.run.resume,
                           overwrite=cfg.run.overwrite, checkpoint_config=saved.config if saved else None,
                           unreadable=unreadable)
    saved, changes = (None, []) if cfg.run.overwrite else (saved, [])
    if saved is not None:
        changes = rundir.resume_changes(saved.config, config, cfg.run.allow_changes, saved.iteration)
        if not any(c["key"] in rundir.RESTORED for c in changes):  # optim.* unchanged, the SGD batch maybe not
            changes += rundir.lr_change(saved, lr, cfg.run.allow_changes)
        if unreadable:
            moved = checkpointer.set_aside_unreadable()
            notices.append(f"{'; '.join(unreadable)}: resuming from the older {saved.path.name} (set aside as "
                           f"{', '.join(p.name for p in moved)})")
        for name in ("metrics.jsonl", "diag_batch_stats.jsonl"):  # records after the checkpoint: written again
            truncate_jsonl(run_dir / name, saved.iteration, "iter", epoch=saved.payload["state"]["epoch"])
    checkpointer.remove_partial()
    # a rerun of a finished run (a sweep over its cells again) trains nothing, whatever it changes: its
    # summary.json stays (the same test as TrainLoop.was_over, on the state the loop restores)
    over = saved is not None and saved.payload["state"]["epoch"] >= cfg.epochs
    if not over:  # a finished run's files stay as its training start wrote them
        rundir.begin(run_dir, config, resuming=saved is not None, composed=cfg)
    for notice in notices:
        print(notice, flush=True)
    return saved, changes


def build(cfg: DictConfig, plan: NormContext, info: dist.DistInfo, lr: float):
    """The loop's parts and settings (the optimizer at ``lr``), the norm recipe and the datasets (for their
    skip counts)."""
    device = info.device
    train_ds, val_ds = build_datasets(cfg.data, cfg.seed)
    loader_args = dict(batch_size=plan.device_batch, workers=cfg.data.workers, rank=info.rank,
                       world_size=info.world_size, pin_memory=device.type == "cuda")
    train_loader, val_loader, sampler = build_loaders(train_ds, val_ds, seed=cfg.seed, **loader_args)
    stats_plan = statistics_plan(cfg)
    precise_loader = build_loaders(train_ds, val_ds, seed=precise_bn_seed(cfg.seed), **loader_args)[0] \
        if stats_plan.precise_when != "never" else None
    ipe = iters_per_epoch(sampler, cfg.train.max_iters_per_epoch)
    recipe = build_norm(OmegaConf.to_container(cfg.norm, resolve=True), plan.norm_context(cfg.epochs * ipe))
    options = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    try:
        model = build_model(cfg.model.name, recipe, num_classes=cfg.data.num_classes,
                            in_channels=dataset_spec(cfg.data.name, "classification").in_channels, **options)
    except ValueError as err:  # a norm that does not suit the model's layers, e.g. norm.num_groups
        arch = f" (model.arch={cfg.model.arch})" if "arch" in cfg.model else ""
        raise ConfigError(f"model={cfg.model.name}{arch} with norm={cfg.norm.name}: {err}") from err
    dtype = amp_dtype(cfg.train.amp, device)
    channels_last = device.type == "cuda" if cfg.train.channels_last == "auto" else bool(cfg.train.channels_last)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    graphs = bool(cfg.train.cuda_graphs)
    optimizer = build_optimizer(model, OmegaConf.to_container(cfg.optim, resolve=True), lr, capturable=graphs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(OmegaConf.to_container(cfg.schedule, resolve=True), ipe, cfg.epochs * ipe))
    net = model
    if info.world_size > 1:  # per-device statistics: buffers are never broadcast (syncbn syncs itself)
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    if cfg.train.compile:
        net = compile_model(net, channels_last=channels_last)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    tracer = BatchStatsTracer(model, Path(cfg.run.dir) / "diag_batch_stats.jsonl", enabled=info.is_main) \
        if cfg.diag.batch_stats else None  # off: not a single hook is registered
    criterion, ctx = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing), StepContext(
        device, dtype, channels_last, scaler)
    step = GraphedStep(net, optimizer, criterion, ctx) if graphs else None  # validated: one GPU, no compile
    parts = Parts(model, net, optimizer, scheduler, criterion, ctx, train_loader, val_loader, sampler,
                  precise_loader, tracer, step)
    freeze_iter = None if stats_plan.freeze_from is None else math.ceil(stats_plan.freeze_from * cfg.epochs * ipe)
    settings = Settings(cfg.epochs, ipe, cfg.train.log_every, cfg.train.ckpt_every_iters,
                        cfg.train.stop_after_iters, cfg.train.eval_max_batches, cfg.diag.every,
                        precise_when=stats_plan.precise_when, precise_batches=stats_plan.precise_batches,
                        precise_images=stats_plan.precise_images, batch_stats_eval="batch" in stats_plan.norm_stats,
                        batch_group=plan.norm_batch, freeze_from_iter=freeze_iter,
                        headline="ema" if stats_plan.norm_stats[0] == "population" else "batch")
    return parts, settings, recipe, (train_ds, val_ds)


def _summarize(outcome: Outcome, loop: TrainLoop, recorder: RunRecorder, facts: RunFacts, *, skipped: int,
               info: dist.DistInfo) -> None:
    """summary.json for a finished or diverged run (a stopped one, or one that could not checkpoint, writes
    none: it is not over, and its rerun resumes)."""
    state = outcome.state
    common = {"iters": state["iter"], "wall_time_s": loop.elapsed(), "skipped_images": skipped,
              "config_changes": state.get("changes", []),
              "checkpoint": str(loop.ckpt.last) if loop.ckpt.last.exists() else None}
    if outcome.status in ("stopped", "failed"):
        if info.is_main:
            print(("error: " if outcome.status == "failed" else "") + outcome.message, flush=True,
                  file=sys.stderr if outcome.status == "failed" else sys.stdout)
    elif outcome.status == "diverged":
        print(f"error: {outcome.message}", file=sys.stderr, flush=True)
        recorder.write_summary(facts(**common, status="diverged", error=outcome.message, top1=None))
    elif loop.was_over and (recorder.run_dir / "summary.json").is_file():
        # nothing ran in this start: the record of the start that trained stays (its commit, time, command)
        if info.is_main:
            print(f"already finished: records in {recorder.run_dir} kept as they are", flush=True)
    else:
        final = state["last_eval"]
        recorder.write_summary(facts(
            **common, status="finished", top1=final["top1"], top5=final["top5"], val_loss=final["loss"],
            best_top1=state["best_top1"], val_count=final["count"], top1_precise=final.get("precise_top1"),
            top5_precise=final.get("precise_top5"), inference_stats=_inference_stats(loop.s),
            evals=final.get("evals", []), norms_frozen_at=state.get("norms_frozen_at")))
        if info.is_main:
            print(f"done: top1 {final['top1']:.2f} top5 {final['top5']:.2f}; records in {recorder.run_dir}",
                  flush=True)
    recorder.close()


def _inference_stats(s) -> str:
    """What the summary's top1 (and top1_precise) were evaluated with, in words."""
    words = ("running averages" if s.headline == "ema" else
             f"mini-batch statistics of groups of {s.batch_group} test samples") + " (top1)"
    if s.precise_when != "never":
        words += (f"; precise_bn at estimation batch {s.precise_batches[0] or 'the device batch'} over "
                  f"{s.precise_images or 'all'} images, {'each epoch' if s.precise_when == 'epoch' else 'at the end'}"
                  f" (top1_precise)")
    if s.freeze_from_iter is not None:
        words += f"; norms frozen from iteration {s.freeze_from_iter}"
    return words


def _progress(mode: str, enabled: bool):
    """A tqdm bar on a terminal, periodic plain lines otherwise (logs, SLURM)."""
    if not enabled:
        return lambda *a: None
    if (sys.stdout.isatty() if mode == "auto" else mode == "bar"):
        from tqdm import tqdm

        bar = tqdm(dynamic_ncols=True)

        def update(it, total, m):
            bar.total, bar.n = total, it
            bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.3g}", img_s=f"{m['img_per_s']:.0f}")

        return update
    last = [time.perf_counter()]

    def line(it, total, m):
        if time.perf_counter() - last[0] >= 30 or it == total:
            last[0] = time.perf_counter()
            print(f"iter {it}/{total} loss {m['loss']:.4f} lr {m['lr']:.4g} {m['img_per_s']:.0f} img/s", flush=True)

    return line


if __name__ == "__main__":
    main()
