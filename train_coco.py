#!/usr/bin/env python
"""Mask R-CNN R50-FPN with a chosen norm through detectron2: ``python train_coco.py norm=mabn [data=coco]``.

Validate the config -> (detectron2 launch) -> register data, build the model (mabn.d2), optimizer, loaders
and trainer -> resume from the run directory -> train with periodic COCO evaluation -> summary.json.
Orchestrates; computes nothing itself.
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

from mabn import dist
from mabn.config import ConfigError, normalize_batch_override, validate_detection
from mabn.preemption import EXIT_PREEMPTED, StopSignals, end_job
from mabn.records import RunRecorder, git_sha, hardware

EXIT_NONFINITE, EXIT_CONFIG = 3, 2
_COMMAND = " ".join(sys.argv)  # as typed, before the batch=N rewrite


def _scaled_schedule(cfg: DictConfig, sgd_batch: int) -> tuple[float, dict]:
    """The linear scaling rule (Goyal et al. 2017), as detectron2's auto_scale_workers applies it: lr x k and
    every iteration count / k for k = SGD batch / optim.base_batch. Returns (lr, Schedule fields)."""
    k = sgd_batch / cfg.optim.base_batch
    iters = lambda n: max(1, round(n / k))  # noqa: E731
    lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.base_lr * k
    return lr, {"max_iter": iters(cfg.solver.max_iter), "steps": tuple(iters(s) for s in cfg.solver.steps),
                "warmup_iters": round(cfg.solver.warmup_iters / k), "warmup_factor": cfg.solver.warmup_factor,
                "gamma": cfg.solver.gamma, "ckpt_period": iters(cfg.train.ckpt_period),
                "eval_period": iters(cfg.train.eval_period), "log_period": cfg.train.log_period}


@hydra.main(config_path="configs", config_name="train_coco", version_base="1.3")
def main(cfg: DictConfig) -> int:
    # Hydra's runtime state does not reach processes spawned by detectron2's launch: read it here
    experiment = HydraConfig.get().runtime.choices.get("experiment")
    ranks_from_env = dist.env_ranks()
    world = ranks_from_env[1] if ranks_from_env else cfg.train.num_gpus
    use_cuda = torch.cuda.is_available() if cfg.train.device == "auto" else cfg.train.device == "cuda"
    try:
        validate_detection(cfg, world, "cuda" if use_cuda else "cpu")
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return end_job(EXIT_CONFIG)
    if ranks_from_env:  # torchrun or SLURM started one process per device
        from mabn.d2 import engine

        info = dist.init_distributed(cfg.train.device)
        engine.create_local_process_group(dist.local_world_size())
        code = _worker(cfg, info, experiment)
    elif world > 1:  # detectron2's launch() starts the processes on this machine
        from mabn.d2 import engine

        code = engine.launch(_spawned_worker, world, args=(cfg, experiment))
    else:
        code = _worker(cfg, dist.init_distributed(cfg.train.device), experiment)
    return end_job(code)


def _spawned_worker(cfg: DictConfig, experiment: str | None) -> None:
    code = _worker(cfg, dist.info_from_process_group(cfg.train.device, cfg.train.num_gpus), experiment)
    if code:
        sys.exit(code)


def _worker(cfg: DictConfig, info: dist.DistInfo, experiment: str | None) -> int:
    stops = StopSignals()
    try:
        code = run(cfg, info, stops, experiment)
    except ConfigError as err:  # found while building (ImageNet weights of another norm)
        print(f"config error: {err}", file=sys.stderr)
        code = EXIT_CONFIG
    finally:
        dist.cleanup()
    if code == EXIT_PREEMPTED:
        stops.hand_over()  # inside submitit: its handler requeues the job now that the checkpoint is written
    return code


def run(cfg: DictConfig, info: dist.DistInfo, stops: StopSignals, experiment: str | None = None) -> int:
    from mabn.d2 import data as d2data
    from mabn.d2 import engine
    from mabn.d2.model import build_mask_rcnn
    from mabn.data.detection import ShapesSpec, check_coco_root, make_shapes
    from mabn.norms import NormContext, build_norm
    from mabn.optim import build_optimizer

    sha = git_sha()  # the code this process runs, read before anything can change it
    run_dir = Path(cfg.run.dir)
    engine.setup(run_dir, info.rank, cfg.seed + info.rank)
    device = info.device
    n = cfg.batch.norm_batch
    sgd_batch = n * info.world_size
    lr, sched = _scaled_schedule(cfg, sgd_batch)
    schedule = engine.Schedule(**sched)
    amp_dtype = {"auto": torch.bfloat16 if device.type == "cuda" else None, "bf16": torch.bfloat16,
                 "fp16": torch.float16, "off": None}[cfg.train.amp]

    data = cfg.data
    if data.name == "shapes":
        spec = ShapesSpec(num_train=data.num_train, num_val=data.num_val, image_size=data.image_size)
        if info.is_main:
            make_shapes(data.root, spec)
        dist.barrier()
        splits = make_shapes(data.root, spec)  # already there: returns the paths
    else:
        splits = check_coco_root(data.root)
    train_name = d2data.register_coco(f"mabn_{data.name}_train", *splits["train"])
    val_name = d2data.register_coco(f"mabn_{data.name}_val", *splits["val"])
    fmt = cfg.model.input_format
    train_mapper = d2data.mapper(is_train=True, min_size=data.min_size_train, max_size=data.max_size_train,
                                 image_format=fmt, mask_format=data.mask_format)
    test_mapper = d2data.mapper(is_train=False, min_size=data.min_size_test, max_size=data.max_size_test,
                                image_format=fmt, mask_format=data.mask_format)

    norm_cfg = OmegaConf.to_container(cfg.norm, resolve=True)
    recipe = build_norm(norm_cfg, NormContext(norm_batch=n, device_batch=n, world_size=info.world_size,
                                              total_iters=schedule.max_iter))
    model_opts = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    try:
        model = build_mask_rcnn(recipe, num_classes=data.num_classes, **model_opts).to(device)
    except ValueError as err:  # ImageNet weights that do not fit this backbone (another norm, no centring)
        raise ConfigError(f"model.weights={cfg.model.weights}: {err}") from err
    optimizer = build_optimizer(model, OmegaConf.to_container(cfg.optim, resolve=True), lr)
    recorder = RunRecorder(run_dir, enabled=info.is_main, wandb_cfg=OmegaConf.to_container(cfg.logger),
                           config=OmegaConf.to_container(cfg, resolve=True), name=cfg.run.name)

    def stop_requested() -> bool:  # the same step on every rank
        flag = torch.tensor([float(stops.requested)], device=device)
        return bool(dist.all_reduce_sum(flag).item() > 0)

    stops.install()
    if info.is_main:
        print(f"run {run_dir}: norm={cfg.norm.name} {n} images/device x {info.world_size} = SGD batch "
              f"{sgd_batch}, lr {lr:g}, {schedule.max_iter} iterations, {hardware(device)}", flush=True)
    result = engine.fit(
        model, optimizer,
        train_loader=lambda start: d2data.train_loader(
            train_name, train_mapper, images_per_device=n, world_size=info.world_size, seed=cfg.seed,
            start_iter=start, workers=data.workers),
        evaluate=lambda m: d2data.evaluate_coco(m, val_name, test_mapper, str(run_dir / "inference")),
        schedule=schedule, output_dir=run_dir, amp_dtype=amp_dtype, wandb_run=recorder.wandb,
        resume=cfg.run.resume, on_resume=lambda start: recorder.truncate_after(start - 1, key="iteration"),
        stop_requested=stop_requested, stop_after=cfg.train.stop_after_iters, preempted_code=EXIT_PREEMPTED,
        nonfinite_code=EXIT_NONFINITE)
    facts = {
        "task": "detection", "experiment": experiment, "data": data.name, "model": cfg.model.name,
        "norm": cfg.norm.name, "norm_params": dict(recipe.params), "norm_batch": n, "device_batch": n,
        "batch_mode": "device", "world_size": info.world_size, "sgd_batch": sgd_batch, "lr": lr, "seed": cfg.seed,
        "iters": schedule.max_iter, "weights": cfg.model.weights, "freeze_at": cfg.model.freeze_at,
        "wall_time_s": round(result.elapsed_s, 1), "device": hardware(device), "amp": str(amp_dtype),
        "git_sha": sha, "wandb_id": recorder.wandb_id, "torch": torch.__version__,
        "detectron2": engine.detectron2_version(), "command": _COMMAND, "run_dir": str(run_dir),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if result.status != "finished":
        print(("error: " if result.status == "nonfinite" else "") + result.message,
              file=sys.stderr if result.status == "nonfinite" else sys.stdout, flush=True)
        if result.status == "nonfinite":  # a record of the divergence; the last good checkpoint stays
            recorder.write_summary({**facts, "status": "diverged", "error": result.message,
                                    "bbox_AP": None, "segm_AP": None})
        recorder.close()
        return result.exit_code

    # detectron2 reports NaN when the model made no prediction at all; the record says null
    ap = {task: {k: round(float(v), 3) if math.isfinite(v) else None for k, v in result.metrics.get(task, {}).items()}
          for task in ("bbox", "segm")}
    recorder.write_summary({**facts, "status": "finished", "bbox_AP": ap["bbox"].get("AP"),
                            "segm_AP": ap["segm"].get("AP"), "bbox": ap["bbox"], "segm": ap["segm"]})
    recorder.close()
    if info.is_main:
        print(f"done: box AP {ap['bbox'].get('AP')} mask AP {ap['segm'].get('AP')}; records in {run_dir}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.argv = normalize_batch_override(sys.argv)
    main()
