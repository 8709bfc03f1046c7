"""The checkpoint format of train_imagenet.py runs: one writer (``Checkpointer.save``), one reader (``read``).

A checkpoint holds the model, optimizer, scheduler and scaler states, each rank's batch-dependent norm buffers
and RNG states (statistics are per device), the resolved config and the loop state. ``train.keep_last``
files rotate (``last.pt`` newest, then ``last.1.pt`` ...), so a checkpoint torn by a kill mid-write falls back
to the one before; ``best.pt`` is a link to the best epoch's. No checkpoint ever holds a non-finite tensor.
"""

from __future__ import annotations

import errno
import io
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

FORMAT = 2  # 1: config with the `batch` group {norm_batch, mode}; 2: `batch` and `batch_mode` keys


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or must not be written; the message names the file."""


def rng_state() -> dict:
    """Every RNG a training step can touch."""
    # the legacy global numpy RNG is what third-party augmentation code draws from
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}  # noqa: NPY002
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def norm_state(model: nn.Module, types: tuple[type, ...]) -> dict:
    """This rank's buffers of the norms of ``types``: each rank keeps its own statistics."""
    return {f"{name}.{b}": t.detach().cpu().clone() for name, m in model.named_modules()
            if isinstance(m, types) for b, t in m.named_buffers(recurse=False)}


@torch.no_grad()
def load_norm_state(model: nn.Module, state: dict) -> None:
    own = dict(model.named_buffers())
    for key, value in state.items():
        own[key].copy_(value)


def nonfinite(obj, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors inside ``obj`` (nested dicts/lists) holding NaN or Inf."""
    if isinstance(obj, torch.Tensor):
        return [prefix] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    if isinstance(obj, dict):
        return [n for k, v in obj.items() for n in nonfinite(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [n for i, v in enumerate(obj) for n in nonfinite(v, f"{prefix}[{i}]")]
    return []


def upgrade_config(cfg: dict) -> dict:
    """A saved config in today's layout: format 1 kept the normalization batch in a `batch` group."""
    if isinstance(cfg.get("batch"), dict):
        old = cfg["batch"]
        cfg = {**cfg, "batch": old["norm_batch"], "batch_mode": old.get("mode", "grouped")}
    return cfg


@dataclass
class Checkpoint:
    """What ``read`` returns: the payload, with the config upgraded to today's layout, and its file."""

    path: Path
    payload: dict

    @property
    def config(self) -> dict:
        return upgrade_config(self.payload["config"])

    @property
    def iteration(self) -> int:
        return int(self.payload["state"]["iter"])

    def rank_state(self, rank: int) -> dict:
        """This rank's norm buffers and RNG states (a run resumed on fewer ranks reuses rank 0's)."""
        per_rank = self.payload["per_rank"]
        return per_rank[rank] if rank < len(per_rank) else per_rank[0]


def read(path: str | Path) -> Checkpoint:
    """Load one checkpoint file; a torn or foreign file raises CheckpointError naming it."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a torn file raises several types (EOFError, RuntimeError, UnpicklingError)
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    missing = [k for k in ("model", "config", "state") if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise CheckpointError(f"{path} is not a train_imagenet.py checkpoint (no {', '.join(missing)})")
    return Checkpoint(path, payload)


def _save_atomic(obj: dict, path: Path) -> None:
    """Serialize in memory, write to a temporary file in the same folder, fsync, then rename over ``path``.
    Any failure removes the temporary file and raises a CheckpointError naming the errno: torch.save writing
    to a full disk itself says only "[enforce fail at inline_container.cc] unexpected pos", so the bytes are
    written here, where the OSError (ENOSPC, EDQUOT, EIO) keeps its errno."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        name = errno.errorcode.get(err.errno, "?") if err.errno else "no errno"
        raise CheckpointError(f"writing {path.name} failed: {name}: {err.strerror or err}; the partial file was "
                              f"removed") from err


class Checkpointer:
    """Writes and finds the checkpoints of one run directory (``<run>/checkpoints``)."""

    def __init__(self, directory: str | Path, keep_last: int = 2):
        self.dir, self.keep_last = Path(directory), keep_last
        self.last, self.best = self.dir / "last.pt", self.dir / "best.pt"

    def _rotated(self, i: int) -> Path:
        return self.last if i == 0 else self.dir / f"last.{i}.pt"

    def files(self) -> list[Path]:
        """Every checkpoint file present, newest first (best.pt last: an older epoch's), whatever keep_last
        was when they were written."""
        rotated = sorted(self.dir.glob("last.*.pt"), key=lambda p: int(p.name.split(".")[1]))
        return [p for p in (self.last, *rotated, self.best) if p.is_file()]

    def newest(self) -> tuple[Checkpoint | None, list[str]]:
        """The newest readable checkpoint, and one notice per newer file that could not be read."""
        notices, self.unreadable = [], []
        for path in self.files():
            try:
                return read(path), notices
            except CheckpointError as err:
                notices.append(str(err))
                self.unreadable.append(path)
        return None, notices

    def remove_partial(self) -> list[Path]:
        """Delete temporary files a kill mid-save left behind (each the size of a checkpoint)."""
        partial = sorted(self.dir.glob(".*.tmp-*")) if self.dir.is_dir() else []
        for path in partial:
            path.unlink()
        return partial

    def set_aside_unreadable(self) -> list[Path]:
        """Rename the files ``newest`` could not read to ``*.unreadable``: the next save's rotation would
        otherwise push a torn file over the good one the run resumed from."""
        moved = [p.rename(p.with_name(p.name + ".unreadable")) for p in getattr(self, "unreadable", [])]
        self.unreadable = []
        return moved

    def save(self, payload: dict, *, best: bool = False) -> Path:
        """Rotate the previous checkpoints and write ``payload`` as last.pt (and best.pt)."""
        bad = nonfinite({k: payload[k] for k in ("model", "optimizer", "per_rank") if k in payload})
        if bad:
            raise CheckpointError(f"refusing to write a checkpoint with {len(bad)} non-finite tensors (e.g. "
                                  f"{bad[:3]}); the last good one in {self.dir} is kept")
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".next.pt.tmp-{os.getpid()}"
        _save_atomic({**payload, "format": FORMAT}, tmp)
        for i in range(self.keep_last - 1, 0, -1):  # the oldest kept one is overwritten
            if self._rotated(i - 1).exists():
                os.replace(self._rotated(i - 1), self._rotated(i))
        os.replace(tmp, self.last)
        if best:
            link = self.dir / f".best.pt.tmp-{os.getpid()}"
            os.link(self.last, link)  # the same bytes under a second name: no second write
            os.replace(link, self.best)
        return self.last
