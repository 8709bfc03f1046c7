"""ImageNet ResNet weights into detectron2's backbone: train_imagenet.py checkpoints, torchvision and MSRA files.

torchvision names (what train_imagenet.py saves) map onto detectron2's ResNet module by module; every
parameter and buffer below a module keeps its suffix, so weight-centering parametrizations
(``conv.parametrizations.weight.original``) and every norm's state (MABN's rings and counter, BRN's
counter) carry over. Counters of batch-dependent norms then restart on purpose: see ``restart_norm_state``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from mabn.checkpoint import CheckpointError
from mabn.checkpoint import read as read_checkpoint
from mabn.norms import batch_dependent_types, protocol

logger = logging.getLogger(__name__)

BACKBONE_PREFIX = "backbone.bottom_up."

_TV_KEY = re.compile(r"^layer(\d)\.(\d+)\.(conv|bn|downsample\.)(\d)\.(.+)$")
_D2_KEY = re.compile(r"^res(\d)\.(\d+)\.(conv(\d)|shortcut)(\.norm)?\.(.+)$")


def tv_key_to_d2(key: str) -> str | None:
    """One torchvision ResNet key -> its detectron2 ResNet key (None for the classifier ``fc``)."""
    if key.startswith("fc."):
        return None
    for tv, d2 in (("conv1.", "stem.conv1."), ("bn1.", "stem.conv1.norm.")):
        if key.startswith(tv):
            return d2 + key[len(tv):]
    m = _TV_KEY.match(key)
    if not m:
        raise ValueError(f"not a torchvision ResNet key: {key!r}")
    stage, block, kind, idx, rest = m.groups()
    prefix = f"res{int(stage) + 1}.{block}"
    if kind == "downsample.":  # downsample.0 is the 1x1 conv, downsample.1 its norm
        return f"{prefix}.shortcut.{'norm.' if idx == '1' else ''}{rest}"
    return f"{prefix}.conv{idx}.{'norm.' if kind == 'bn' else ''}{rest}"


def d2_key_to_tv(key: str) -> str:
    """One detectron2 ResNet key -> its torchvision key (the inverse of ``tv_key_to_d2``)."""
    for d2, tv in (("stem.conv1.norm.", "bn1."), ("stem.conv1.", "conv1.")):
        if key.startswith(d2):
            return tv + key[len(d2):]
    m = _D2_KEY.match(key)
    if not m:
        raise ValueError(f"not a detectron2 ResNet key: {key!r}")
    stage, block, which, conv_idx, is_norm, rest = m.groups()
    prefix = f"layer{int(stage) - 1}.{block}"
    if which == "shortcut":
        return f"{prefix}.downsample.{1 if is_norm else 0}.{rest}"
    return f"{prefix}.{'bn' if is_norm else 'conv'}{conv_idx}.{rest}"


def torchvision_to_d2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision-layout ResNet state dict -> detectron2 model keys (``backbone.bottom_up.``); no ``fc``."""
    out = {}
    for key, value in state.items():
        new = tv_key_to_d2(key)
        if new is not None:
            out[BACKBONE_PREFIX + new] = value
    return out


def d2_to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone part of a detectron2 model state dict -> torchvision ResNet keys."""
    return {d2_key_to_tv(k[len(BACKBONE_PREFIX):]): v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}


def read_imagenet_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The torchvision-layout state dict in a train_imagenet.py checkpoint (``last.pt``/``best.pt``) or in a
    plain torchvision weights file (``resnet50-*.pth``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet weights {path} do not exist (model.weights: a train_imagenet.py "
                                f"checkpoint, a torchvision .pth or a detectron2 .pkl)")
    try:  # the project's checkpoint format, read by its one reader
        return read_checkpoint(path).payload["model"]
    except CheckpointError:
        try:  # a plain state dict (torchvision's files), or one under "model"
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a torn or foreign file
            raise ValueError(f"cannot read {path}: {err}") from err
        state = state["model"] if isinstance(state, dict) and "model" in state else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds neither a train_imagenet.py checkpoint nor a ResNet state dict")
    return state


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load ImageNet weights into ``model.backbone.bottom_up`` and restart the norms' warm-up.

    ``.pkl`` files (detectron2's MSRA/FAIR ImageNet models) go through detectron2's own checkpointer and
    name conversion. Every other file is read as a torchvision-layout ResNet (train_imagenet.py or
    torchvision); the backbone's norm must be the checkpoint's (its keys must match one to one).
    """
    if str(path).endswith(".pkl"):
        from detectron2.checkpoint import DetectionCheckpointer

        DetectionCheckpointer(model).load(str(path))
    else:
        mapped = torchvision_to_d2(read_imagenet_state(path))
        # a norm's history (rings, counters) is restarted below anyway, and its shape may differ (the window):
        # only parameters and population statistics are loaded
        history = restartable_keys(model)
        mapped = {k: v for k, v in mapped.items() if k not in history}
        own = {k for k in model.state_dict() if k.startswith(BACKBONE_PREFIX) and k not in history}
        unexpected = sorted(k for k in set(mapped) - own if not _is_history(k))
        missing = sorted(k for k in own - set(mapped) if not _is_history(k))
        if unexpected or missing:
            raise ValueError(
                f"{path} does not fit this backbone (was it trained with another norm or without weight "
                f"centering?): {len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, "
                f"e.g. {unexpected[:3]}")
        model.load_state_dict({k: v for k, v in mapped.items() if k in own}, strict=False)
    restarted = restart_norm_state(model.backbone.bottom_up)
    logger.info("loaded ImageNet weights from %s into the backbone%s", path,
                f"; restarted warm-up of {restarted} batch-dependent norm layers" if restarted else "")


def _is_history(key: str) -> bool:
    """A checkpoint's counters: the file's may be from a layer of another kind (e.g. torchvision's BN)."""
    return key.endswith(".num_batches_tracked")


def restartable_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the batch-dependent norms' history: every buffer that is neither a population
    statistic nor an affine parameter (MABN's rings, CBN's rings and window, counters)."""
    keys = set()
    for name, m in model.named_modules():
        if isinstance(m, batch_dependent_types()):
            kept = {id(t) for t in protocol.population(m).values()}
            keys.update(f"{name}.{b}" for b, t in m.named_buffers(recurse=False) if id(t) not in kept)
    return keys


@torch.no_grad()
def restart_norm_state(module: nn.Module) -> int:
    """Every batch-dependent norm restarted (``protocol.restart``): counters to 0, moving averages and windows
    cleared; population statistics and affine kept.

    On purpose: fine-tuning sees other inputs (detection images, not ImageNet crops) and another SGD batch,
    so the moving averages, CBN's window and burn-in and the renorm/BRN schedules start over as in a fresh
    run, from the ImageNet running statistics. Returns how many layers were restarted.
    """
    layers = [m for m in module.modules() if isinstance(m, batch_dependent_types())]
    for m in layers:
        protocol.restart(m)
    return len(layers)
