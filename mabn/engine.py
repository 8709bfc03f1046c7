"""train_one_epoch / evaluate: objects in, metric dicts out. The engine never sees the config."""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .dist import all_reduce_max, all_reduce_sum


class NonFiniteError(RuntimeError):
    """A loss, weight or buffer became NaN/inf; training stops and the last good checkpoint stays."""


def _max_abs(tensors: list[torch.Tensor]) -> torch.Tensor:
    """max |t| over all ``tensors`` in one reduction (NaN propagates), on their device: no host sync here."""
    return torch.nn.utils.get_total_norm(tensors, norm_type=float("inf"), foreach=None)


def state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The floating-point parameters and buffers of ``model`` (what a checkpoint of it holds)."""
    return [t.detach() for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()]


def finite_probe(loss: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """(loss, max |weight or buffer|) as one float64 tensor on the device: what ``read_probe`` reads."""
    return torch.stack([loss.detach().double(), _max_abs(tensors).double()])


def read_probe(probe: torch.Tensor, lr: float | torch.Tensor, iteration: int) -> tuple[float, float]:
    """The step's loss and ``lr`` as floats after ONE host sync, which also checks every weight and buffer: a
    finite loss can still come with an update that made the weights non-finite (a huge lr), and such a step
    must never reach a checkpoint or an evaluation. ``lr`` may be a device tensor (CUDA graphs). In a process
    group the verdict is every rank's (norm buffers are per device): all ranks stop at the same step."""
    bad = all_reduce_max((~torch.isfinite(probe)).to(probe.dtype))
    values = torch.cat([probe, bad])
    if isinstance(lr, torch.Tensor):  # read in the same sync
        values = torch.cat([values, lr.detach().reshape(1).to(probe)])
    loss_value, weights, bad_loss, bad_weights, *rest = values.tolist()
    where = ""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        where = " on this rank" if not (math.isfinite(loss_value) and math.isfinite(weights)) else " on another rank"
    if bad_loss:
        raise NonFiniteError(f"non-finite loss {loss_value} at iteration {iteration}{where}; stopping (the last "
                             f"good checkpoint is kept)")
    if bad_weights:
        raise NonFiniteError(f"non-finite weights after the optimizer step at iteration {iteration}{where} (loss "
                             f"{loss_value:.4g}); stopping (the last good checkpoint is kept)")
    return loss_value, rest[0] if rest else float(lr)


@dataclass
class StepContext:
    """What one training step needs besides the batch."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    scaler: torch.amp.GradScaler | None = None


def _autocast(ctx: StepContext, cache: bool = True):
    if ctx.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(ctx.device.type, dtype=ctx.amp_dtype, cache_enabled=cache)


def _to_device(images, targets, ctx: StepContext):
    images = images.to(ctx.device, non_blocking=True)
    if ctx.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(ctx.device, non_blocking=True)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, ctx: StepContext,
               images: torch.Tensor, targets: torch.Tensor, *, autocast_cache: bool = True) -> torch.Tensor:
    """Forward, loss, backward and optimizer step (through the GradScaler under fp16); returns the loss
    tensor, never synchronising (``mabn.graphs`` captures exactly this)."""
    with _autocast(ctx, autocast_cache):
        loss = criterion(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    if ctx.scaler is not None:
        ctx.scaler.scale(loss).backward()
        ctx.scaler.step(optimizer)
        ctx.scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss


def eager_step(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, ctx: StepContext
               ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The default step of ``train_one_epoch``: ``train_step`` then its ``finite_probe``."""
    tensors = state_tensors(model)

    def step(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return finite_probe(train_step(model, optimizer, criterion, ctx, images, targets), tensors)

    return step


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, scheduler,
                    criterion: nn.Module, ctx: StepContext, *, first_iter: int, num_iters: int,
                    on_step: Callable[[int, dict], bool] | None = None,
                    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Train over ``loader`` from global iteration ``first_iter`` for at most ``num_iters`` iterations.

    ``step(images, targets)`` runs one training step and returns its ``finite_probe`` (default:
    ``eager_step``; ``mabn.graphs.GraphedStep`` replays a CUDA graph). ``on_step(global_iter, metrics)`` is
    called after every step with the step's loss, lr and img/s; it returns True to stop early (preemption, a
    requested stop). Returns the epoch's mean loss, img/s, the iterations done and whether it stopped early.
    """
    model.train()
    step = step or eager_step(model, optimizer, criterion, ctx)
    loss_sum = 0.0
    seen, done, stopped = 0, 0, False
    start = tick = time.perf_counter()
    for images, targets in loader:
        if done >= num_iters:
            break
        images, targets = _to_device(images, targets, ctx)
        probe = step(images, targets)
        scheduler.step()
        it = first_iter + done
        # one sync per step: stop at the step that broke
        loss_value, lr = read_probe(probe, optimizer.param_groups[0]["lr"], it + 1)
        loss_sum += loss_value
        seen += images.shape[0]
        done += 1
        now = time.perf_counter()
        metrics = {"loss": loss_value, "lr": lr, "img_per_s": images.shape[0] / max(now - tick, 1e-9)}
        tick = now
        if on_step is not None and on_step(it + 1, metrics):
            stopped = True
            break
    elapsed = time.perf_counter() - start
    return {"loss": loss_sum / max(done, 1), "img_per_s": seen / max(elapsed, 1e-9), "iters": done,
            "stopped": stopped}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, criterion: nn.Module, ctx: StepContext,
             max_batches: int | None = None) -> dict:
    """Top-1/top-5 accuracy (%) and mean loss over this rank's shard, summed over ranks."""
    model.eval()
    sums = torch.zeros(4, device=ctx.device, dtype=torch.float64)  # loss, top1, top5, count
    for b, (images, targets) in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        images, targets = _to_device(images, targets, ctx)
        with _autocast(ctx):
            logits = model(images)
        loss = criterion(logits.float(), targets)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top5 == targets[:, None]
        sums += torch.stack([loss.double() * len(targets), hit[:, 0].sum().double(), hit.any(1).sum().double(),
                             torch.tensor(float(len(targets)), device=ctx.device, dtype=torch.float64)])
    loss, top1, top5, count = all_reduce_sum(sums).tolist()
    if not count:
        raise ValueError("evaluation saw no image (an empty validation set or shard)")
    if not math.isfinite(loss):
        raise NonFiniteError(f"non-finite validation loss {loss / count}")
    return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count, "count": int(count)}


def compile_model(net: nn.Module, *, channels_last: bool) -> nn.Module:
    """``torch.compile(net)``, keeping the memory format the run chose: with channels_last off, inductor's own
    switch of conv layouts to NHWC is off too (on AVX2-only CPUs torch 2.14's oneDNN 3.12 aborts in an NHWC
    strided 1x1 conv backward, "double free or corruption": README, Known issues)."""
    if not channels_last:
        import torch._inductor.config as inductor_config

        inductor_config.layout_optimization = False
    return torch.compile(net)
