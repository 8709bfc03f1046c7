"""Datasets, deterministic per-sample augmentation and a resumable sharded sampler."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import types
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, transforms

from ._die_with_parent import die_with_parent
from .fmnist import FashionMNIST, check_fmnist_root, fmnist_root
from .registry import DataConfigError, dataset_spec, register_dataset

logger = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)


def check_imagenet_root(root, num_classes: int | None = None) -> Path:
    """The ImageFolder layout root/train/<class>/ and root/val/<class>/, or a DataConfigError saying so.

    ImageFolder numbers classes by their sorted folder names, separately for train/ and val/: a class folder
    missing from one side would shift every later label and make accuracy silently wrong, so both sides must
    hold the same class folders, ``num_classes`` of them when given (the model's output width).
    """
    hint = ("expected an ImageFolder layout: <root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG; set "
            "data.root=/path or IMAGENET_ROOT. Without ImageNet, `data=fmnist` (or experiment=fmnist) runs on "
            "Fashion-MNIST.")
    if root in (None, "", "None"):
        raise DataConfigError(f"data.root is not set for data=imagenet; {hint}")
    root = Path(root)
    missing = [d for d in ("train", "val") if not (root / d).is_dir()]
    if missing:
        raise DataConfigError(f"data.root={root} has no {' or '.join(d + '/' for d in missing)} folder; {hint}")
    train, val = (sorted(e.name for e in os.scandir(root / d) if e.is_dir()) for d in ("train", "val"))
    if not train:
        raise DataConfigError(f"data.root={root}: train/ holds no class folders; {hint}")
    if train != val:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise DataConfigError(f"data.root={root}: train/ and val/ must hold the same class folders (labels are "
                              f"their sorted order); only in train/: {only_train[:5]}{' ...' * (len(only_train) > 5)}"
                              f", only in val/: {only_val[:5]}{' ...' * (len(only_val) > 5)}")
    if num_classes is not None and len(train) != num_classes:
        raise DataConfigError(f"data.num_classes={num_classes} but data.root={root} has {len(train)} class "
                              f"folders; set data.num_classes={len(train)}")
    return root


class _CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder whose unreadable images raise an error naming the file, or are replaced and counted.

    The count lives in a shared-memory flag per image: loader worker processes mark what they skip, and the
    main process reads how many distinct images were unreadable (``skipped``), whatever the worker count."""

    def __init__(self, root, transform, skip_corrupt: bool):
        super().__init__(root, transform=transform)
        self.skip_corrupt = skip_corrupt
        self.unreadable = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    @property
    def skipped(self) -> int:
        return int(self.unreadable.sum())

    def __getitem__(self, index):
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            path, target = self.samples[i]
            try:
                image = self.loader(path)
            except Exception as err:  # PIL raises several types for truncated / non-image files
                if not self.skip_corrupt:
                    raise RuntimeError(f"cannot read image {path}: {err} (set data.skip_corrupt=true to skip "
                                       f"unreadable images and count them)") from err
                self.unreadable[i] = True
                logger.warning("skipping unreadable image %s (%s)", path, err)
                continue
            return (self.transform(image) if self.transform else image), target
        raise RuntimeError(f"no readable image in {self.root}")


class SeededAugment(Dataset):
    """Applies ``transform`` with an RNG seeded by (seed, epoch, index): augmentation does not depend on
    worker count or on where a run was resumed, so a resumed epoch sees exactly the same images."""

    def __init__(self, base: Dataset, transform, seed: int):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index):
        image, target = self.base[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            return self.transform(image), target


class ResumableSampler(Sampler[int]):
    """Per-epoch seeded permutation, sharded over ranks (drop the tail so every rank has whole batches),
    starting ``start_batch`` batches into the epoch on resume."""

    def __init__(self, size: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        self.size, self.batch_size, self.rank, self.world = size, batch_size, rank, world_size
        self.seed, self.shuffle, self.epoch, self.start_batch = seed, shuffle, 0, 0
        self.batches_per_epoch = size // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DataConfigError(f"{size} training samples cannot fill one SGD batch of "
                                  f"{batch_size} x {world_size} devices")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        used = self.batches_per_epoch * self.batch_size * self.world
        mine = order[:used].view(self.batches_per_epoch, self.world, self.batch_size)[:, self.rank]
        return iter(mine[self.start_batch:].reshape(-1).tolist())


def build_datasets(data_cfg, seed: int):
    """(train dataset with seeded augmentation, val dataset) for a registered classification ``data``."""
    return dataset_spec(data_cfg["name"], "classification").build(data_cfg, seed)


def skipped_images(*datasets_) -> int:
    """Distinct unreadable images skipped so far (data.skip_corrupt) across ``datasets_`` and their workers."""
    return sum(getattr(getattr(d, "base", d), "skipped", 0) for d in datasets_)


@register_dataset("imagenet", task="classification", in_channels=3,
                  check=lambda d: check_imagenet_root(d["root"], d["num_classes"]))
def _imagenet(data_cfg, seed: int):
    root = check_imagenet_root(data_cfg["root"], data_cfg["num_classes"])
    size = data_cfg["image_size"]
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    val_tf = transforms.Compose([transforms.Resize(int(round(size * 256 / 224))), transforms.CenterCrop(size),
                                 transforms.ToTensor(), normalize])
    train = _CheckedImageFolder(root / "train", None, data_cfg["skip_corrupt"])
    val = _CheckedImageFolder(root / "val", val_tf, data_cfg["skip_corrupt"])
    return SeededAugment(train, train_tf, seed), val


@register_dataset("fmnist", task="classification", in_channels=1,
                  check=lambda d: check_fmnist_root(d["root"], d.get("num_classes")))
def _fmnist(data_cfg, seed: int):
    to_float = transforms.Compose([transforms.ConvertImageDtype(torch.float32),
                                   transforms.Normalize(FMNIST_MEAN, FMNIST_STD)])
    train_tf = transforms.Compose([transforms.RandomCrop(28, padding=2), transforms.RandomHorizontalFlip(),
                                   to_float])
    root = fmnist_root(data_cfg["root"])  # checked, every file read once, in validation (check_fmnist_root)
    train, val = FashionMNIST(root, "train"), FashionMNIST(root, "test", transform=to_float)
    return SeededAugment(train, train_tf, seed), val


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers ignore the stop signals: Ctrl-C, ``timeout`` and SLURM signal the whole process group,
    and torch's worker handler re-raises SIGTERM from anyone but the parent, killing the worker mid-epoch.
    The main process checkpoints at the next step and shuts its workers down itself. A worker dies with its
    parent (the fork server, or the trainer where it forks): ``_die_with_parent``."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent()


def worker_context():
    """How loader workers start: from a fork server (a single-threaded process started once), never by a
    fork of the training process itself. By the time an epoch's workers start, the training process runs
    threads (gloo's, wandb's, torch's own) and a fork can copy a lock one of them holds into the child, which
    then waits on it for ever -- seen here once, a SLURM-requeued DDP rank waiting in poll for a worker stuck
    in a futex right after its fork. Where there is no fork server (not POSIX), the platform's default.

    A ``launcher=joblib`` sweep cell runs in a loky worker, whose default start method is loky's own: torch's
    loader cannot start workers with it, and a fork server cannot either (the start method travels with each
    worker's preparation data and the server cannot set it), so such a cell forks (one process, no
    collectives, no logger threads in the sweeps that use it)."""
    methods = multiprocessing.get_all_start_methods()  # the platform's default first
    loky = multiprocessing.get_start_method(allow_none=True) not in (None, *methods)
    if loky or "forkserver" not in methods:
        return multiprocessing.get_context(methods[0])
    _start_fork_server()
    return multiprocessing.get_context("forkserver")


def _start_fork_server() -> None:
    """Start this process's fork server and resource tracker (once; again if one died) with the stop
    signals blocked, a mask they and every worker the server forks keep: Ctrl-C, ``timeout`` and SLURM signal
    the whole process group, and a fork server killed by them would leave the run unable to start the workers
    of an evaluation it is still to run before it stops. Blocked, not ignored, here: a signal that arrives
    meanwhile reaches this process when its mask is restored."""
    from multiprocessing import forkserver, resource_tracker

    forkserver.set_forkserver_preload(_preload())
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        resource_tracker.ensure_running()  # its own start unblocks SIGINT and SIGTERM when it is done
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_NOT_PRELOADED = ("__main__", "__mp_main__", "builtins", "_frozen_importlib", "_frozen_importlib_external")


def _preload() -> list[str]:
    """The modules the fork server imports once, so that its workers start in a fraction of a second: torch,
    this module (the datasets' classes) and every module the main script imported by name. Each worker runs
    the main script again (as ``__mp_main__``, how spawn-like workers find what was pickled from it); with
    its imports already loaded that is cheap. (The default preload, ``__main__``, does nothing on Python 3.11:
    the server looks for a key, ``main_path``, that the preparation data names ``init_main_from_path``.)
    Measured here, two workers over a 64-sample loader: ~3.5 s an epoch without, ~0.1 s with torch preloaded;
    a 10-epoch tiny train_imagenet run with two workers: 7 s forked, 10-12 s from the server, 71-77 s from a
    server without the preload."""
    names = {"torch", __name__, "mabn.data._server_dies_with_parent"}  # the last: the server dies with the trainer
    for value in vars(sys.modules["__main__"]).values():
        name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
        if isinstance(name, str) and name.split(".")[0] not in _NOT_PRELOADED:
            names.add(name)
    return sorted(names)


def build_loaders(train_ds, val_ds, *, batch_size: int, workers: int, rank: int, world_size: int, seed: int,
                  pin_memory: bool):
    """Train loader (resumable sampler, whole batches) and val loader (this rank's shard, no padding)."""
    sampler = ResumableSampler(len(train_ds), batch_size, rank=rank, world_size=world_size, seed=seed)
    common = dict(num_workers=workers, pin_memory=pin_memory, persistent_workers=False,
                  worker_init_fn=ignore_stop_signals if workers else None,
                  multiprocessing_context=worker_context() if workers else None)
    train = DataLoader(train_ds, batch_size=batch_size, sampler=sampler, drop_last=True, **common)
    shard = list(range(rank, len(val_ds), world_size))
    val = DataLoader(torch.utils.data.Subset(val_ds, shard), batch_size=batch_size, shuffle=False, **common)
    return train, val, sampler


def iters_per_epoch(sampler: ResumableSampler, cap: int | None) -> int:
    """Training iterations in one epoch, optionally capped."""
    return sampler.batches_per_epoch if cap is None else max(1, min(cap, sampler.batches_per_epoch))


__all__ = ["DataConfigError", "ResumableSampler", "SeededAugment", "build_datasets", "build_loaders",
           "check_imagenet_root", "ignore_stop_signals", "iters_per_epoch", "skipped_images", "worker_context"]
