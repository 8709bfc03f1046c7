"""Sampler sharding and resume offsets, seeded augmentation, unreadable images named or skipped, workers."""

import os
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms

from mabn.data.loaders import (
    STOP_SIGNALS,
    DataConfigError,
    ResumableSampler,
    SeededAugment,
    _CheckedImageFolder,
    _preload,
    build_loaders,
    check_imagenet_root,
    worker_context,
)


def test_sampler_shards_are_disjoint_whole_batches():
    shards = [list(ResumableSampler(103, 4, rank=r, world_size=3, seed=5)) for r in range(3)]
    flat = [i for s in shards for i in s]
    assert all(len(s) == 8 * 4 for s in shards) and len(set(flat)) == len(flat) == 96


def test_sampler_resume_offset_and_epochs():
    s = ResumableSampler(50, 5, seed=1)
    full = list(s)
    s.set_epoch(0, start_batch=3)
    assert list(s) == full[15:] and len(s) == 35
    s.set_epoch(1)
    assert sorted(list(s)) == sorted(full) and list(s) != full
    with pytest.raises(DataConfigError, match="cannot fill one SGD batch"):
        ResumableSampler(7, 4, world_size=2)


def test_seeded_augment_is_a_function_of_seed_epoch_index():
    base = [(torch.arange(64, dtype=torch.uint8).view(1, 8, 8), 0)] * 4
    aug = SeededAugment(base, transforms.RandomCrop(8, padding=3), seed=0)
    a = [aug[i][0] for i in range(4)]
    torch.manual_seed(123)  # the global RNG does not matter, and is left as it was
    state = torch.get_rng_state()
    assert all(torch.equal(x, aug[i][0]) for i, x in enumerate(a))
    assert torch.equal(state, torch.get_rng_state())
    aug.set_epoch(1)
    assert any(not torch.equal(x, aug[i][0]) for i, x in enumerate(a))


def _folder(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / cls / "ok.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path


def test_unreadable_image_is_named(tmp_path):
    ds = _CheckedImageFolder(_folder(tmp_path), transforms.ToTensor(), skip_corrupt=False)
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.png")][0]
    with pytest.raises(RuntimeError, match=r"cannot read image .*a/broken.png.*data.skip_corrupt=true"):
        ds[bad]


def test_unreadable_image_skipped_and_counted(tmp_path):
    ds = _CheckedImageFolder(_folder(tmp_path), transforms.ToTensor(), skip_corrupt=True)
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.png")][0]
    image, _ = ds[bad]
    assert image.shape == (3, 8, 8) and ds.skipped == 1


def test_imagenet_root_errors(tmp_path):
    with pytest.raises(DataConfigError, match="data.root is not set.*data=fmnist"):
        check_imagenet_root(None)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataConfigError, match=r"has no val/ folder"):
        check_imagenet_root(tmp_path)
    (tmp_path / "val").mkdir()
    with pytest.raises(DataConfigError, match=r"train/ holds no class folders"):
        check_imagenet_root(tmp_path)
    for split, classes in (("train", "abc"), ("val", "ab")):
        for c in classes:
            (tmp_path / split / c).mkdir()
    with pytest.raises(DataConfigError, match=r"same class folders .*only in train/: \['c'\], only in val/: \[\]"):
        check_imagenet_root(tmp_path)
    (tmp_path / "val" / "c").mkdir()
    assert check_imagenet_root(tmp_path, num_classes=3) == tmp_path
    with pytest.raises(DataConfigError,
                       match=r"data.num_classes=1000 but .* has 3 class folders; set data.num_classes=3"):
        check_imagenet_root(tmp_path, num_classes=1000)


class _WorkerFacts(torch.utils.data.Dataset):
    """Each item: the loading process's pid, parent pid and blocked-signal mask (from /proc)."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        status = dict(line.split(":\t", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return torch.tensor([os.getpid(), int(status["PPid"]), int(status["SigBlk"], 16)])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_loader_workers_come_from_a_fork_server_that_stop_signals_do_not_reach():
    """Workers are forked by a fork server, not by the (threaded) training process; the server and its
    workers keep the stop signals blocked, so a signal to the process group leaves them able to serve."""
    _, val, _ = build_loaders(_WorkerFacts(), _WorkerFacts(), batch_size=1, workers=2, rank=0, world_size=1,
                              seed=0, pin_memory=False)
    facts = torch.cat(list(val))
    assert len(facts) == 4 and os.getpid() not in set(facts[:, 0].tolist()) | set(facts[:, 1].tolist())
    for mask in facts[:, 2].tolist():
        assert all(mask >> (int(sig) - 1) & 1 for sig in STOP_SIGNALS)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()  # this process's mask is as it was
    assert worker_context().get_start_method() == "forkserver"
    # the server imports torch and this package once; each worker would import them again otherwise
    assert {"torch", "mabn.data.loaders"} <= set(_preload())
