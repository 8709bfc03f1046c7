"""Detection data through detectron2: COCO-format registration, the mapper, the training stream, evaluation."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import build_detection_train_loader as d2_train_loader
from detectron2.data import transforms as T
from detectron2.data.samplers import TrainingSampler
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from torch.utils.data import DataLoader

from mabn import dist
from mabn.data import dataset_spec
from mabn.data.loaders import ignore_stop_signals


class _ResumableSampler(TrainingSampler):
    """detectron2's infinite seeded TrainingSampler, continuing its stream after ``start`` samples.

    A resumed run reads the images it would have read had it not stopped (not the stream's beginning).
    """

    def __init__(self, size: int, *, seed: int, start: int):
        super().__init__(size, shuffle=True, seed=seed)
        self._start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self._start, None)


def register_coco(name: str, json_file, image_root) -> str:
    """Register a COCO-format instance dataset with detectron2 under ``name`` (idempotent; other files under
    the same name replace the registration, since detectron2's catalogs refuse a second one)."""
    from detectron2.data.datasets import register_coco_instances

    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if (meta.get("json_file"), meta.get("image_root")) == (str(json_file), str(image_root)):
            return name
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(json_file), str(image_root))
    return name


def register_splits(data_cfg, *, is_main: bool) -> tuple[str, str]:
    """Register ``data``'s train and val splits (the generated set is written once, by rank 0)."""
    build = dataset_spec(data_cfg.name, "detection").build
    if is_main:
        build(data_cfg)
    dist.barrier()
    splits = build(data_cfg)  # already there: returns the paths
    return (register_coco(f"mabn_{data_cfg.name}_train", *splits["train"]),
            register_coco(f"mabn_{data_cfg.name}_val", *splits["val"]))


def mappers(data_cfg, image_format: str) -> tuple[DatasetMapper, DatasetMapper]:
    """The train and test mappers of ``data`` (sizes and mask format from its config)."""
    common = dict(image_format=image_format, mask_format=data_cfg.mask_format)
    return (mapper(is_train=True, min_size=data_cfg.min_size_train, max_size=data_cfg.max_size_train, **common),
            mapper(is_train=False, min_size=data_cfg.min_size_test, max_size=data_cfg.max_size_test, **common))


def _ignore_stop_signals_in_workers(loader):
    """detectron2 builds the DataLoader with its own worker_init_fn; chain the project's after it so that a
    stop signal sent to the process group leaves the workers alive (mabn.data.loaders.ignore_stop_signals)."""
    inner = loader if isinstance(loader, DataLoader) else getattr(loader, "dataset", None)
    if isinstance(inner, DataLoader) and inner.num_workers:
        first = inner.worker_init_fn

        def init(worker_id: int) -> None:
            if first is not None:
                first(worker_id)
            ignore_stop_signals(worker_id)

        inner.worker_init_fn = init
    return loader


def mapper(*, is_train: bool, min_size: Sequence[int] | int, max_size: int, image_format: str,
           mask_format: str) -> DatasetMapper:
    """detectron2's DatasetMapper with the standard detection augmentation (shortest-edge resize, flip)."""
    sizes = tuple(min_size) if isinstance(min_size, Sequence) else (min_size,)
    augs = [T.ResizeShortestEdge(sizes, max_size, "choice")]  # one of the sizes per image
    if is_train:
        augs.append(T.RandomFlip())
    return DatasetMapper(is_train=is_train, augmentations=augs, image_format=image_format,
                         use_instance_mask=True, instance_mask_format=mask_format)


def train_loader(dataset_name: str, dataset_mapper: DatasetMapper, *, images_per_device: int, world_size: int,
                 seed: int, start_iter: int, workers: int):
    """The training stream (seeded, continued from ``start_iter`` on resume), aspect-ratio grouped."""
    dataset = get_detection_dataset_dicts([dataset_name], filter_empty=True)
    sampler = _ResumableSampler(len(dataset), seed=seed, start=start_iter * images_per_device)
    # A loader seed of its own: creating the loader's iterator (at a resume) must not draw from the global
    # torch RNG, which RoI sampling uses and checkpoints restore. Workers' seeds depend on where it starts.
    return _ignore_stop_signals_in_workers(d2_train_loader(
        dataset, mapper=dataset_mapper, sampler=sampler, total_batch_size=images_per_device * world_size,
        num_workers=workers, seed=seed * 1_000_003 + start_iter))


def evaluate_coco(model, dataset_name: str, dataset_mapper: DatasetMapper, output_dir: str | None,
                  workers: int = 0) -> dict:
    """COCO box and mask AP from pycocotools (detectron2's COCOEvaluator, official implementation)."""
    loader = build_detection_test_loader(DatasetCatalog.get(dataset_name), mapper=dataset_mapper,
                                         num_workers=workers)
    evaluator = COCOEvaluator(dataset_name, tasks=("bbox", "segm"), distributed=True, output_dir=output_dir,
                              use_fast_impl=False)
    return inference_on_dataset(model, loader, evaluator)
