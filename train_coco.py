#!/usr/bin/env python
"""Mask R-CNN R50-FPN with a chosen norm through detectron2: ``python train_coco.py norm=mabn [data=coco]``.

Validate the config -> (detectron2 launch) -> register data, build the model (mabn.d2), optimizer, loaders
and trainer -> resume from the run directory -> train with periodic COCO evaluation -> summary.json.
Orchestrates; computes nothing itself.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mabn import dist, rundir
from mabn.config import ConfigError, validate_detection
from mabn.entry import EXIT_NONFINITE, RunFacts, amp_dtype, config_failure, finish, run_job
from mabn.norms import NormContext
from mabn.optim import linear_scaled_lr
from mabn.preemption import EXIT_PREEMPTED, StopSignals
from mabn.records import RunRecorder


def _scaled_schedule(cfg: DictConfig, sgd_batch: int) -> tuple[float, dict]:
    """The linear scaling rule (Goyal et al. 2017), as detectron2's auto_scale_workers applies it: lr x k and
    every iteration count / k for k = SGD batch / optim.base_batch. Returns (lr, Schedule fields)."""
    k = sgd_batch / cfg.optim.base_batch
    iters = lambda n: max(1, round(n / k))  # noqa: E731
    return linear_scaled_lr(cfg.optim, sgd_batch), {
        "max_iter": iters(cfg.solver.max_iter), "steps": tuple(iters(s) for s in cfg.solver.steps),
        "warmup_iters": round(cfg.solver.warmup_iters / k), "warmup_factor": cfg.solver.warmup_factor,
        "gamma": cfg.solver.gamma, "ckpt_period": iters(cfg.train.ckpt_period),
        "eval_period": iters(cfg.train.eval_period), "log_period": cfg.train.log_period}


@hydra.main(config_path="configs", config_name="train_coco", version_base="1.3")
def main(cfg: DictConfig) -> int:
    # Hydra's runtime state does not reach processes spawned by detectron2's launch: read it here
    experiment = HydraConfig.get().runtime.choices.get("experiment")
    job = (experiment, rundir.hydra_overrides())  # what the run's records say of its command
    ranks_from_env = dist.env_ranks()
    world = ranks_from_env[1] if ranks_from_env else cfg.train.num_gpus
    use_cuda = torch.cuda.is_available() if cfg.train.device == "auto" else cfg.train.device == "cuda"
    try:
        plan = validate_detection(cfg, world, "cuda" if use_cuda else "cpu")
    except ConfigError as err:
        return finish(config_failure(err, Path(cfg.run.dir)))
    if ranks_from_env:  # torchrun or SLURM started one process per device
        from mabn.d2 import engine

        info = dist.init_distributed(cfg.train.device, cfg.train.get("dist_timeout_s", 600))
        engine.create_local_process_group(dist.local_world_size())
        code = _worker(cfg, plan, info, job)
    elif world > 1:  # detectron2's launch() starts the processes on this machine
        from mabn.d2 import engine

        code = engine.launch(_spawned_worker, world, args=(cfg, plan, job))
    else:
        info = dist.init_distributed(cfg.train.device, cfg.train.get("dist_timeout_s", 600))
        code = _worker(cfg, plan, info, job)
    return finish(code)


def _spawned_worker(cfg: DictConfig, plan: NormContext, job: tuple) -> None:
    code = _worker(cfg, plan, dist.info_from_process_group(cfg.train.device, cfg.train.num_gpus), job)
    if code:
        sys.exit(code)


def _worker(cfg: DictConfig, plan: NormContext, info: dist.DistInfo, job: tuple) -> int:
    """``job``: the experiment's name and the command line's overrides (Hydra's, read by the parent)."""
    return run_job(lambda stops: run(cfg, plan, info, stops, job), Path(cfg.run.dir))


def _claim(cfg: DictConfig, info: dist.DistInfo, overrides: list[str] | None) -> bool:
    """The run directory is this run's (mabn.rundir) before the data set is generated or the model built;
    detectron2's checkpointer then resumes from its last_checkpoint file. True when the run is already over
    (its final checkpoint and summary.json are there: a rerun of a finished cell trains nothing)."""
    run_dir, error, over = Path(cfg.run.dir), None, False
    if info.is_main:
        try:
            rundir.check_writable(run_dir)
            last = run_dir / "checkpoints" / "last_checkpoint"
            has = last.is_file()
            config, previous = OmegaConf.to_container(cfg, resolve=True), rundir.recorded_config(run_dir)
            notices = rundir.claim(run_dir, config, has_checkpoint=has, resume=cfg.run.resume,
                                   overwrite=cfg.run.overwrite)
            changes = []
            if has and previous and not cfg.run.overwrite:  # detectron2's checkpoint holds no config of ours
                changes = rundir.resume_changes(previous, config, (), None, can_apply=False)
            over = (has and not cfg.run.overwrite and not changes and (run_dir / "summary.json").is_file()
                    and last.read_text().strip() == "model_final.pth")
            if not over:  # a finished run's files stay as its training start wrote them
                rundir.begin(run_dir, config, resuming=has and not cfg.run.overwrite, composed=cfg,
                             overrides=overrides)
            for notice in notices:
                print(notice, flush=True)
        except ConfigError as err:
            error = str(err)
    error, over = dist.broadcast_object((error, over))
    if error is not None:
        raise ConfigError(error)
    return over


def run(cfg: DictConfig, plan: NormContext, info: dist.DistInfo, stops: StopSignals, job: tuple = (None, None)
        ) -> int:
    from mabn.d2 import data as d2data
    from mabn.d2 import engine

    experiment, overrides = job
    if _claim(cfg, info, overrides):
        if info.is_main:
            print(f"already finished: records in {cfg.run.dir} kept as they are", flush=True)
        return 0
    run_dir, device, data = Path(cfg.run.dir), info.device, cfg.data
    engine.setup(run_dir, info.rank, cfg.seed + info.rank)
    plan = dataclasses.replace(plan, world_size=info.world_size)
    lr, sched = _scaled_schedule(cfg, plan.sgd_batch)
    schedule = engine.Schedule(**sched)
    train_name, val_name = d2data.register_splits(data, is_main=info.is_main)
    train_mapper, test_mapper = d2data.mappers(data, cfg.model.input_format)
    model, optimizer, recipe = _build(cfg, plan, schedule.max_iter, lr, device)
    recorder = RunRecorder(run_dir, enabled=info.is_main, wandb_cfg=OmegaConf.to_container(cfg.logger),
                           config=OmegaConf.to_container(cfg, resolve=True), name=cfg.run.name)
    facts = RunFacts(task="detection", experiment=experiment, data=data.name, model=cfg.model.name,
                     norm=cfg.norm.name, norm_params=dict(recipe.params), norm_batch=plan.norm_batch,
                     device_batch=plan.device_batch, batch_mode="device", world_size=info.world_size,
                     sgd_batch=plan.sgd_batch, lr=lr, seed=cfg.seed, iters=schedule.max_iter,
                     weights=cfg.model.weights, freeze_at=cfg.model.freeze_at, device_obj=device,
                     amp=str(amp_dtype(cfg.train.amp, device)), wandb_id=recorder.wandb_id, run_dir=str(run_dir),
                     detectron2=engine.detectron2_version())

    def stop_requested() -> bool:  # the same step on every rank
        return bool(dist.all_reduce_sum(torch.tensor([float(stops.requested)], device=device)).item() > 0)

    stops.install()
    if info.is_main:
        print(f"run {run_dir}: norm={cfg.norm.name} {plan.norm_batch} images/device x {info.world_size} = SGD "
              f"batch {plan.sgd_batch}, lr {lr:g}, {schedule.max_iter} iterations, {facts()['device']}", flush=True)
    result = engine.fit(
        model, optimizer,
        train_loader=lambda start: d2data.train_loader(
            train_name, train_mapper, images_per_device=plan.norm_batch, world_size=info.world_size,
            seed=cfg.seed, start_iter=start, workers=data.workers),
        evaluate=lambda m: d2data.evaluate_coco(m, val_name, test_mapper, str(run_dir / "inference")),
        schedule=schedule, output_dir=run_dir, amp_dtype=amp_dtype(cfg.train.amp, device),
        wandb_run=recorder.wandb, resume=cfg.run.resume,
        on_resume=lambda start: recorder.truncate_after(start - 1, key="iteration"),
        stop_requested=stop_requested, stop_after=cfg.train.stop_after_iters, preempted_code=EXIT_PREEMPTED,
        nonfinite_code=EXIT_NONFINITE)
    _summarize(result, recorder, facts, info)
    return result.exit_code


def _build(cfg: DictConfig, plan: NormContext, max_iter: int, lr: float, device: torch.device):
    """Mask R-CNN with the configured norm (mabn.d2.model) and its optimizer."""
    from mabn.d2.model import build_mask_rcnn
    from mabn.norms import build_norm
    from mabn.optim import build_optimizer

    recipe = build_norm(OmegaConf.to_container(cfg.norm, resolve=True), plan.norm_context(max_iter))
    options = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    try:
        model = build_mask_rcnn(recipe, num_classes=cfg.data.num_classes, **options).to(device)
    except ValueError as err:  # ImageNet weights that do not fit this backbone, or a norm that does not fit
        what = f"model.weights={cfg.model.weights}" if cfg.model.weights else f"norm={cfg.norm.name}"
        raise ConfigError(f"{what}: {err}") from err
    return model, build_optimizer(model, OmegaConf.to_container(cfg.optim, resolve=True), lr), recipe


def _summarize(result, recorder: RunRecorder, facts: RunFacts, info: dist.DistInfo) -> None:
    """summary.json for a finished or diverged run (a stopped one writes none: it is not over)."""
    ckpt = Path(facts.facts["run_dir"]) / "checkpoints" / "last_checkpoint"
    common = {"wall_time_s": round(result.elapsed_s, 1), "checkpoint": str(ckpt) if ckpt.is_file() else None}
    if result.status != "finished":
        print(("error: " if result.status == "nonfinite" else "") + result.message,
              file=sys.stderr if result.status == "nonfinite" else sys.stdout, flush=True)
        if result.status == "nonfinite":  # a record of the divergence; the last good checkpoint stays
            recorder.write_summary(facts(**common, status="diverged", error=result.message, bbox_AP=None,
                                         segm_AP=None))
        recorder.close()
        return
    # detectron2 reports NaN when the model made no prediction at all; the record says null
    ap = {task: {k: round(float(v), 3) if math.isfinite(v) else None for k, v in result.metrics.get(task, {}).items()}
          for task in ("bbox", "segm")}
    recorder.write_summary(facts(**common, status="finished", bbox_AP=ap["bbox"].get("AP"),
                                 segm_AP=ap["segm"].get("AP"), bbox=ap["bbox"], segm=ap["segm"]))
    recorder.close()
    if info.is_main:
        print(f"done: box AP {ap['bbox'].get('AP')} mask AP {ap['segm'].get('AP')}; records in {recorder.run_dir}",
              flush=True)


if __name__ == "__main__":
    main()
