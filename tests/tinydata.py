"""Tiny generated Fashion-MNIST-format data (IDX files) for training tests: unit tests never need the real set."""

import gzip
import struct
from pathlib import Path

import numpy as np
import torch


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    (gzip.open if gz else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


def make_fmnist_like(root: Path, train: int = 96, test: int = 32, seed: int = 0) -> Path:
    """Class-dependent blobs so that a few steps of training can learn something."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, size=count)
        images = rng.integers(0, 60, size=(count, 28, 28))
        for i, label in enumerate(labels):
            r, c = divmod(int(label), 5)
            images[i, 4 + 10 * r:12 + 10 * r, 2 + 5 * c:7 + 5 * c] += 180
        write_idx(root / f"{split}-images-idx3-ubyte.gz", np.clip(images, 0, 255))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def make_imagefolder(root: Path, classes: int = 3, train: int = 8, val: int = 4, size: int = 40, seed: int = 0) -> Path:
    """root/{train,val}/<class>/*.JPEG: class-coloured noisy JPEGs in ImageNet's folder layout."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, size=(size, size, 3))
                pixels[..., c % 3] += 150
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{split}_{c}_{i}.JPEG", "JPEG")
    return root


# A COCO-format set of the user's own layout: non-contiguous category ids, polygons and RLE
COCO_JSON_IDS = {1: 3, 2: 7, 3: 12, 4: 40}  # the shapes set's ids 1..4 -> the ids the files use


def _as_polygon(annotation: dict) -> dict:
    """The annotation with its mask replaced by its box as a polygon (exact: box, area and mask agree)."""
    x, y, w, h = annotation["bbox"]
    return {**annotation, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]], "area": float(w * h)}


def make_coco_json_like(root: Path, spec=None) -> dict[str, Path]:
    """The generated shapes set rewritten into another layout (``ann/*.json``, ``images/<split>/img_*.png``)
    with category ids 3, 7, 12, 40; train mixes RLE and polygon masks, val holds polygons only.
    Returns the ``data.*`` paths for train_coco.py's ``data=coco_json``."""
    import json
    import shutil

    from mabn.data.detection import ShapesSpec, make_shapes

    spec = spec or ShapesSpec(num_train=6, num_val=4, image_size=64, min_extent=10, max_extent=28)
    splits = make_shapes(root / "source", spec)
    paths = {}
    for split, (json_path, image_dir) in splits.items():
        content = json.loads(json_path.read_text())
        out_dir = root / "images" / split
        out_dir.mkdir(parents=True)
        for image in content["images"]:
            shutil.copy(image_dir / image["file_name"], out_dir / f"img_{image['file_name']}")
            image["file_name"] = f"img_{image['file_name']}"
        annotations = []
        for i, ann in enumerate(content["annotations"]):
            ann = {**ann, "category_id": COCO_JSON_IDS[ann["category_id"]]}
            annotations.append(_as_polygon(ann) if split == "val" or i % 2 else ann)
        content["annotations"] = annotations
        content["categories"] = [{**c, "id": COCO_JSON_IDS[c["id"]]} for c in content["categories"]]
        (root / "ann").mkdir(exist_ok=True)
        (root / "ann" / f"my_{split}.json").write_text(json.dumps(content))
        paths[f"{split}_json"], paths[f"{split}_images"] = root / "ann" / f"my_{split}.json", out_dir
    return paths


class AnnotationsAsPredictions(torch.nn.Module):
    """A 'model' that predicts a registered dataset's own annotations (all, or every other one), for the
    evaluator: polygon and RLE masks, contiguous class ids as detectron2's loader maps them."""

    def __init__(self, dataset_name, keep_every=1):
        from detectron2.data import DatasetCatalog

        super().__init__()
        self.records = {r["image_id"]: r for r in DatasetCatalog.get(dataset_name)}
        self.keep_every = keep_every

    def forward(self, inputs):
        from detectron2.structures import Boxes, BoxMode, Instances, polygons_to_bitmask
        from pycocotools import mask as mask_util

        outputs = []
        for item in inputs:
            record = self.records[item["image_id"]]
            annos = record["annotations"][:: self.keep_every]
            h, w = record["height"], record["width"]
            inst = Instances((h, w))
            boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos]
            inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
            inst.scores = torch.ones(len(annos))
            inst.pred_classes = torch.tensor([a["category_id"] for a in annos], dtype=torch.int64)
            masks = [polygons_to_bitmask(a["segmentation"], h, w) if isinstance(a["segmentation"], list)
                     else mask_util.decode(a["segmentation"]) for a in annos]
            inst.pred_masks = (torch.from_numpy(np.stack(masks)).bool() if masks
                               else torch.zeros(0, h, w, dtype=torch.bool))
            outputs.append({"instances": inst})
        return outputs
