"""Whole-step CUDA graph capture (``train.cuda_graphs``): forward, loss, backward, optimizer step and the
finiteness probe replayed as one graph, for static shapes. True small batches are where it pays: a step of
a few samples is bound by kernel launches, not arithmetic.

What makes the whole step capturable, and the same as eager:

- the norms never synchronise and write their state (counters, rings, running statistics) in place with
  tensor ops (no host sync on the training path), so a replay advances them exactly as an eager step does;
- the lr is a device tensor per parameter group read by the fused SGD kernel; the scheduler fills it between
  replays (``LRScheduler`` fills a tensor lr in place). A Python float lr would be baked into the graph, and
  the foreach/for-loop SGD paths turn a tensor lr into a host scalar (a sync);
- fp16's GradScaler is refused (``mabn.config``): bf16 autocast needs no loss scaling. Autocast runs with its
  weight-cast cache off, as ``torch.cuda.graph`` requires;
- the per-step finiteness check reads the probe the graph wrote, after the replay: still one sync per step;
- the first ``warmup`` steps run eagerly on a side stream (cuBLAS/cuDNN workspaces, autograd's streams and
  the optimizer's momentum buffers exist before capture), and they are real training steps, so a graphed
  run takes the same steps as an eager one.
"""

from __future__ import annotations

import torch
from torch import nn

from .engine import StepContext, finite_probe, state_tensors, train_step


def check_capturable(optimizer: torch.optim.Optimizer) -> None:
    """ValueError unless every param group is fused with a tensor lr (build_optimizer(capturable=True))."""
    for i, group in enumerate(optimizer.param_groups):
        if not group.get("fused") or not isinstance(group["lr"], torch.Tensor):
            raise ValueError(f"CUDA graphs need the optimizer built with mabn.optim.build_optimizer(..., "
                             f"capturable=True): param group {i} has fused={group.get('fused')!r} and a "
                             f"{type(group['lr']).__name__} lr (a float lr would be frozen into the graph)")


def place_lrs(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Every group's lr a float32 tensor on ``device`` (a resumed optimizer state may bring it to the CPU)."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        if not (isinstance(lr, torch.Tensor) and lr.device == device and lr.dtype == torch.float32):
            group["lr"] = torch.tensor(float(lr), device=device, dtype=torch.float32)


class GraphedStep:
    """``step(images, targets) -> finite_probe``, the CUDA-graph counterpart of ``engine.eager_step``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                 ctx: StepContext, *, warmup: int = 3):
        if ctx.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {ctx.device}")
        if ctx.scaler is not None:
            raise ValueError("CUDA graphs do not capture fp16's GradScaler; use bf16 autocast (no loss "
                             "scaling)")
        check_capturable(optimizer)
        self.model, self.optimizer, self.criterion, self.ctx = model, optimizer, criterion, ctx
        self.warmup, self.eager_steps = warmup, 0
        self.tensors = state_tensors(model)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.images = self.targets = self.probe = None

    def _eager(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = train_step(self.model, self.optimizer, self.criterion, self.ctx, images, targets,
                          autocast_cache=False)
        return finite_probe(loss, self.tensors)

    def _warmup_step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """A real eager step on a side stream (torch.cuda.graph's documented warm-up before capture)."""
        if self.eager_steps == 0:
            place_lrs(self.optimizer, self.ctx.device)
        self.eager_steps += 1
        main = torch.cuda.current_stream(self.ctx.device)
        side = torch.cuda.Stream(self.ctx.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            probe = self._eager(images, targets)
        main.wait_stream(side)
        return probe

    def _capture(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """Record one step on static copies of the batch (recording runs nothing; the next replay does)."""
        self.images, self.targets = images.clone(), targets.clone()
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates the gradients it writes
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread keeps calling CUDA while this thread captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.probe = self._eager(self.images, self.targets)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            if self.eager_steps < self.warmup:
                return self._warmup_step(images, targets)
            self._capture(images, targets)
        elif images.shape != self.images.shape or targets.shape != self.targets.shape:
            raise ValueError(f"the CUDA graph was captured for images {tuple(self.images.shape)} and targets "
                             f"{tuple(self.targets.shape)}, got {tuple(images.shape)} and "
                             f"{tuple(targets.shape)} (train.cuda_graphs needs static shapes: drop_last)")
        self.images.copy_(images)
        self.targets.copy_(targets)
        self.graph.replay()
        return self.probe
