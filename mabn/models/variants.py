"""Model-level norm variants: XBNBlock (Huang et al., CVPR 2022) and "fewer normalization layers".

Both act on a built ResNet by module position, so they work for every ResNet of the registry and every
norm: XBNBlock puts a batch-free norm (GroupNorm) at chosen positions and keeps the run's norm elsewhere;
"fewer" keeps the run's norm only up to a point in the network and removes it after.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn
from torchvision.models.resnet import BasicBlock as TVBasicBlock
from torchvision.models.resnet import Bottleneck

from .cifar_resnet import BasicBlock as CifarBasicBlock

NormCtor = Callable[[int], nn.Module]
BASIC_BLOCKS = (TVBasicBlock, CifarBasicBlock)
XBN_POSITIONS = ("stem", "bn1", "bn2", "bn3", "downsample")
# The official default (its "P2" models): the norm after the bottleneck's 3x3 conv, which in a basic block
# is the first conv's norm; and the stem's norm.
XBN_DEFAULT = {"bottleneck": ("stem", "bn2"), "basic": ("stem", "bn1")}


def _blocks(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (Bottleneck, *BASIC_BLOCKS))]


def _norm_channels(norm: nn.Module) -> int:
    return getattr(norm, "num_features", None) or norm.num_channels


def apply_xbnblock(model: nn.Module, batch_free: NormCtor, positions: Iterable[str] | None = None) -> list[str]:
    """Replace the norms at ``positions`` (default: the official one per block type) by ``batch_free(C)``.

    Positions: ``stem`` (the norm after the first conv), and inside each residual block ``bn1``, ``bn2``,
    ``bn3`` (bottlenecks only) and ``downsample`` (the shortcut's norm). Returns the replaced module names.
    """
    chosen = None if positions is None else tuple(positions)
    if chosen is not None:
        unknown = sorted(set(chosen) - set(XBN_POSITIONS))
        if unknown:
            raise ValueError(f"unknown XBNBlock position(s) {unknown}; valid: {', '.join(XBN_POSITIONS)}")
    names = {m: n for n, m in model.named_modules()}
    replaced = []
    blocks = _blocks(model)
    kind = "bottleneck" if blocks and isinstance(blocks[0], Bottleneck) else "basic"
    wanted = chosen if chosen is not None else XBN_DEFAULT[kind]
    if "bn3" in wanted and kind == "basic":
        raise ValueError("XBNBlock position bn3 exists only in bottleneck blocks (ResNet-50 and deeper)")
    if "stem" in wanted:
        model.bn1 = batch_free(_norm_channels(model.bn1))
        replaced.append("bn1")
    for block in blocks:
        for attr in ("bn1", "bn2", "bn3"):
            if attr in wanted and hasattr(block, attr):
                setattr(block, attr, batch_free(_norm_channels(getattr(block, attr))))
                replaced.append(f"{names[block]}.{attr}")
        if "downsample" in wanted and block.downsample is not None:
            block.downsample[1] = batch_free(_norm_channels(block.downsample[1]))
            replaced.append(f"{names[block]}.downsample.1")
    return replaced


FEWER_NORMS = ("all", "stem", "stage1")


def keep_norms_until(model: nn.Module, until: str) -> list[str]:
    """Keep the norm layers only in the stem (``stem``) or the stem and first stage (``stage1``); every later
    norm becomes Identity. Returns the removed module names.

    Without a norm the residual branches would add up at initialisation; each un-normalized block's last
    conv starts at zero (SkipInit/Fixup's remedy), so every block starts as the identity map.
    """
    if until not in FEWER_NORMS:
        raise ValueError(f"model.norm_until must be one of {FEWER_NORMS}, got {until!r}")
    if until == "all":
        return []
    names = {m: n for n, m in model.named_modules()}
    kept_stages = {"stem": 0, "stage1": 1}[until]
    removed, stage = [], 1
    for i, block in enumerate(_blocks(model)):
        # a new stage starts where the resolution halves (torchvision and the CIFAR ResNet alike)
        if i > 0 and any(c.stride != (1, 1) for c in block.modules() if isinstance(c, nn.Conv2d)):
            stage += 1
        if stage <= kept_stages:
            continue
        for attr in ("bn1", "bn2", "bn3"):
            if hasattr(block, attr):
                setattr(block, attr, nn.Identity())
                removed.append(f"{names[block]}.{attr}")
        if block.downsample is not None:
            block.downsample[1] = nn.Identity()
            removed.append(f"{names[block]}.downsample.1")
        last_conv = block.conv3 if isinstance(block, Bottleneck) else block.conv2
        nn.init.zeros_(last_conv.weight)
    return removed
