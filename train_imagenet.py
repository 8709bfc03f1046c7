#!/usr/bin/env python
"""ResNet training with a chosen norm and normalization batch: ``python train_imagenet.py norm=mabn batch=2``.

Validate the config -> build data, model, optimizer -> resume if the run directory has a checkpoint -> loop
(engine.train_one_epoch / engine.evaluate) -> summary.json. Orchestrates; computes nothing itself.
"""

from __future__ import annotations

import copy
import itertools
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mabn import checkpoint as ckpt
from mabn import dist
from mabn.config import ConfigError, normalize_batch_override, validate
from mabn.data.loaders import build_datasets, build_loaders, iters_per_epoch
from mabn.diagnostics import BatchStatsTracer
from mabn.engine import NonFiniteLossError, StepContext, evaluate, train_one_epoch
from mabn.models import build_model
from mabn.norms import NormContext, batch_dependent_types, build_norm, center_conv_weights
from mabn.optim import build_optimizer, lr_lambda
from mabn.precise_bn import recompute_norm_stats
from mabn.preemption import EXIT_PREEMPTED, StopSignals, end_job
from mabn.records import RunRecorder, git_sha, hardware

EXIT_NONFINITE, EXIT_CONFIG = 3, 2
_COMMAND = " ".join(sys.argv)  # as typed, before the batch=N rewrite


def _amp(mode: str, device: torch.device):
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def _norm_state(model: nn.Module) -> dict:
    """This rank's batch-dependent norm buffers: statistics are per device, so each rank keeps its own."""
    return {f"{name}.{b}": t.detach().cpu().clone() for name, m in model.named_modules()
            if isinstance(m, batch_dependent_types()) for b, t in m.named_buffers(recurse=False)}


def _check_same_run(saved: dict, current: dict, path: Path) -> None:
    """A checkpoint resumes only the run that wrote it (same norm, batch, model and data; roots may move)."""
    keys = [("norm",), ("batch",), ("model",), ("seed",)]
    keys += [("data", k) for k in ("name", "batch_size", "num_classes", "image_size")]
    for key in keys:
        old, new = saved, current
        for k in key:
            old, new = old[k], new[k]
        if old != new:
            raise ConfigError(f"{path} was written with {'.'.join(key)}={old}, not {new}; keep the checkpoint "
                              f"and start elsewhere with another run.name, or set run.resume=false")


def _load_norm_state(model: nn.Module, state: dict) -> None:
    own = dict(model.named_buffers())
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)


@hydra.main(config_path="configs", config_name="train_imagenet", version_base="1.3")
def main(cfg: DictConfig) -> int:
    info = dist.init_distributed(cfg.train.device)
    try:
        plan = validate(cfg, info.world_size, info.device.type)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        dist.cleanup()
        return end_job(EXIT_CONFIG)
    stops = StopSignals()
    try:
        code = run(cfg, plan, info, stops, HydraConfig.get().runtime.choices.get("experiment"))
    except ConfigError as err:  # found while resuming (a checkpoint from another config)
        print(f"config error: {err}", file=sys.stderr)
        code = EXIT_CONFIG
    finally:
        dist.cleanup()
    if code == EXIT_PREEMPTED:
        stops.hand_over()  # inside submitit: its handler requeues the job now that the checkpoint is written
    return end_job(code)


def run(cfg: DictConfig, plan, info: dist.DistInfo, stops: StopSignals, experiment: str | None = None) -> int:
    started, sha = time.time(), git_sha()  # the code this process runs, read before anything can change it
    torch.manual_seed(cfg.seed + info.rank)
    run_dir = Path(cfg.run.dir)
    device = info.device
    amp_dtype = _amp(cfg.train.amp, device)
    channels_last = device.type == "cuda" if cfg.train.channels_last == "auto" else bool(cfg.train.channels_last)

    train_ds, val_ds, in_channels = build_datasets(cfg.data, cfg.seed)
    train_loader, val_loader, sampler = build_loaders(
        train_ds, val_ds, batch_size=plan.device_batch, workers=cfg.data.workers, rank=info.rank,
        world_size=info.world_size, seed=cfg.seed, pin_memory=device.type == "cuda")
    ipe = iters_per_epoch(sampler, cfg.train.max_iters_per_epoch)
    total_iters = cfg.epochs * ipe

    norm_cfg = OmegaConf.to_container(cfg.norm, resolve=True)
    recipe = build_norm(norm_cfg, NormContext(norm_batch=plan.norm_batch, device_batch=plan.device_batch,
                                              world_size=info.world_size, total_iters=total_iters))
    model_opts = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    model = build_model(cfg.model.name, recipe.ctor, num_classes=cfg.data.num_classes, in_channels=in_channels,
                        **model_opts)
    if recipe.weight_centering:
        center_conv_weights(model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.base_lr * plan.sgd_batch / cfg.optim.base_batch
    optimizer = build_optimizer(model, OmegaConf.to_container(cfg.optim, resolve=True), lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(OmegaConf.to_container(cfg.schedule, resolve=True), ipe, total_iters))
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    net = model
    if info.world_size > 1:  # per-device statistics: buffers are never broadcast (syncbn syncs itself)
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    if cfg.train.compile:
        net = torch.compile(net)

    ckpt_dir = run_dir / "checkpoints"
    state = {"epoch": 0, "iter_in_epoch": 0, "iter": 0, "best_top1": None, "elapsed": 0.0, "last_eval": None}
    last = ckpt_dir / "last.pt"
    if cfg.run.resume and last.exists():
        saved = ckpt.load(last)
        _check_same_run(saved["config"], OmegaConf.to_container(cfg, resolve=True), last)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        mine = saved["per_rank"][info.rank] if info.rank < len(saved["per_rank"]) else saved["per_rank"][0]
        _load_norm_state(model, mine["norm_state"])
        ckpt.set_rng_state(mine["rng"])
        state.update(saved["state"])
    recorder = RunRecorder(run_dir, enabled=info.is_main, wandb_cfg=OmegaConf.to_container(cfg.logger),
                           config=OmegaConf.to_container(cfg, resolve=True), name=cfg.run.name)
    if state["iter"]:
        recorder.truncate_after(state["iter"])  # records after the checkpoint are written again
        if info.is_main:
            print(f"resumed from {last} at epoch {state['epoch']} iteration {state['iter']}", flush=True)

    def save(best: bool = False) -> None:
        per_rank = [{"norm_state": _norm_state(model), "rng": ckpt.rng_state()}]
        if info.world_size > 1:
            gathered = [None] * info.world_size
            torch.distributed.all_gather_object(gathered, per_rank[0])
            per_rank = gathered
        if not info.is_main:
            return
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                   "per_rank": per_rank, "config": OmegaConf.to_container(cfg, resolve=True),
                   "state": {**state, "elapsed": state["elapsed"] + time.time() - started}}
        ckpt.save_atomic(payload, last)
        if best:
            ckpt.save_atomic(payload, ckpt_dir / "best.pt")

    precise_batches = cfg.train.precise_bn_batches
    precise_loader = None
    if precise_batches:
        precise_loader, _, _ = build_loaders(train_ds, val_ds, batch_size=plan.device_batch, workers=cfg.data.workers,
                                             rank=info.rank, world_size=info.world_size, seed=cfg.seed + 7919,
                                             pin_memory=device.type == "cuda")
    stops.install()
    tracer, every = None, cfg.diag.every
    if cfg.diag.batch_stats:  # off: not a single hook is registered
        tracer = BatchStatsTracer(model, run_dir / "diag_batch_stats.jsonl", enabled=info.is_main)
        tracer.truncate_after(state["iter"])
        tracer.arm((state["iter"] + 1) % every == 0, state["iter"] + 1)
    progress = _progress(cfg.train.progress, info.is_main)
    ctx = StepContext(device, amp_dtype, channels_last, scaler)
    stop_after = cfg.train.stop_after_iters
    iters_this_process = 0
    if info.is_main:
        print(f"run {run_dir}: norm={cfg.norm.name} n={plan.norm_batch} device batch={plan.device_batch} "
              f"x {info.world_size} = SGD batch {plan.sgd_batch}, lr {lr:g}, {cfg.epochs} epochs x {ipe} "
              f"iterations, {hardware(device)}", flush=True)

    def on_step(it: int, metrics: dict) -> bool:
        nonlocal iters_this_process
        iters_this_process += 1
        state["iter"], state["iter_in_epoch"] = it, state["iter_in_epoch"] + 1
        if it % cfg.train.log_every == 0:  # the same step on every rank: the loss is averaged over ranks
            if info.world_size > 1:
                metrics["loss"] = float(dist.all_reduce_sum(torch.tensor([metrics["loss"]], device=device))) / info.world_size
            recorder.log({"iter": it, "epoch": state["epoch"], **{f"train/{k}": v for k, v in metrics.items()}})
        progress(it, total_iters, metrics)
        if tracer is not None:
            tracer.arm((it + 1) % every == 0, it + 1)
        stop = torch.tensor([float(stops.requested)])
        if info.world_size > 1:  # all ranks must stop at the same step
            stop = dist.all_reduce_sum(stop.to(device)).cpu()
        requested = stop_after is not None and iters_this_process >= stop_after
        if stop.item() > 0 or requested or it % cfg.train.ckpt_every_iters == 0:
            save()
        return bool(stop.item() > 0 or requested)

    def run_facts() -> dict:  # what every summary.json of this run says, however it ended
        return {
            "task": "classification", "experiment": experiment, "data": cfg.data.name, "model": cfg.model.name,
            "norm": cfg.norm.name, "norm_params": dict(recipe.params), "norm_batch": plan.norm_batch,
            "device_batch": plan.device_batch, "batch_mode": cfg.batch.mode, "world_size": info.world_size,
            "sgd_batch": plan.sgd_batch, "lr": lr, "seed": cfg.seed, "epochs": cfg.epochs, "iters": state["iter"],
            "wall_time_s": round(state["elapsed"] + time.time() - started, 1), "device": hardware(device),
            "amp": str(amp_dtype), "git_sha": sha, "wandb_id": recorder.wandb_id, "torch": torch.__version__,
            "command": _COMMAND, "run_dir": str(run_dir), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    try:
        while state["epoch"] < cfg.epochs:
            epoch = state["epoch"]
            if state["iter_in_epoch"] < ipe:
                sampler.set_epoch(epoch, start_batch=state["iter_in_epoch"])
                train_ds.set_epoch(epoch)
                stats = train_one_epoch(net, train_loader, optimizer, scheduler, criterion, ctx,
                                        first_iter=state["iter"], num_iters=ipe - state["iter_in_epoch"],
                                        on_step=on_step)
                if stats["stopped"]:
                    why = stops.describe() if stops.requested else "train.stop_after_iters"
                    if info.is_main:
                        print(f"stopped by {why} at iteration {state['iter']}; checkpoint {last}", flush=True)
                    recorder.close()
                    return EXIT_PREEMPTED if stops.requested else 0
            metrics = evaluate(net, val_loader, criterion, ctx, cfg.train.eval_max_batches)
            if precise_batches:  # the same weights with recomputed statistics, on a copy: training is untouched
                recomputed = copy.deepcopy(model)
                precise_loader.sampler.set_epoch(epoch)
                recompute_norm_stats(recomputed, itertools.islice(precise_loader, precise_batches), device)
                precise = evaluate(recomputed, val_loader, criterion, ctx, cfg.train.eval_max_batches)
                metrics.update({f"precise_{k}": v for k, v in precise.items() if k != "count"})
                del recomputed
            best = state["best_top1"] is None or metrics["top1"] > state["best_top1"]
            state["best_top1"] = max(metrics["top1"], state["best_top1"] or 0.0)
            state["last_eval"] = metrics
            recorder.log({"iter": state["iter"], "epoch": epoch + 1,
                          **{f"val/{k}": v for k, v in metrics.items()}})
            if info.is_main:
                extra = f" (recomputed statistics: top1 {metrics['precise_top1']:.2f})" if precise_batches else ""
                print(f"epoch {epoch + 1}/{cfg.epochs}: val top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f} "
                      f"loss {metrics['loss']:.4f}{extra}", flush=True)
            state["epoch"], state["iter_in_epoch"] = epoch + 1, 0
            save(best=best)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        # a record of the divergence (results tables count it); the last good checkpoint stays as it was
        recorder.write_summary({**run_facts(), "status": "diverged", "error": str(err), "top1": None})
        recorder.close()
        return EXIT_NONFINITE

    final = state["last_eval"]
    recorder.write_summary({
        **run_facts(), "status": "finished", "top1": final["top1"], "top5": final["top5"],
        "val_loss": final["loss"], "best_top1": state["best_top1"], "val_count": final["count"],
        "top1_precise": final.get("precise_top1"), "top5_precise": final.get("precise_top5"),
        "inference_stats": f"precise_bn over {precise_batches} batches per rank, each epoch (top1_precise); "
                           "running averages (top1)" if precise_batches else "running averages"})
    recorder.close()
    if info.is_main:
        print(f"done: top1 {final['top1']:.2f} top5 {final['top5']:.2f}; records in {run_dir}", flush=True)
    return 0


def _progress(mode: str, enabled: bool):
    """A tqdm bar on a terminal, periodic plain lines otherwise (logs, SLURM)."""
    if not enabled:
        return lambda *a: None
    use_bar = sys.stdout.isatty() if mode == "auto" else mode == "bar"
    if use_bar:
        from tqdm import tqdm

        bar = tqdm(dynamic_ncols=True)

        def update(it, total, m):
            bar.total = total
            bar.n = it
            bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.3g}", img_s=f"{m['img_per_s']:.0f}")

        return update
    last = [time.perf_counter()]

    def line(it, total, m):
        if time.perf_counter() - last[0] >= 30 or it == total:
            last[0] = time.perf_counter()
            print(f"iter {it}/{total} loss {m['loss']:.4f} lr {m['lr']:.4g} {m['img_per_s']:.0f} img/s", flush=True)

    return line


if __name__ == "__main__":
    sys.argv = normalize_batch_override(sys.argv)
    main()
