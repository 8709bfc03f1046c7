"""Detection data files: COCO 2017's layout under a root, and a generated "shapes" set written as COCO files.

Both are read through detectron2 (``mabn.d2``: ``register_coco_instances``, its mappers, loaders and
COCOEvaluator); the shapes set exists so that this whole real path runs on a fresh machine without COCO.
Nothing here imports detectron2.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .registry import DataConfigError, register_dataset

logger = logging.getLogger(__name__)

SHAPE_CLASSES = ("circle", "square", "triangle", "cross")
_GENERATOR_VERSION = 1


def check_coco_root(root) -> dict[str, tuple[Path, Path]]:
    """COCO 2017's layout under ``root``, or an error naming every missing path.

    Returns ``{"train": (json, image dir), "val": (json, image dir)}``.
    """
    hint = ("expected <root>/train2017/, <root>/val2017/ and <root>/annotations/instances_{train,val}2017.json "
            "(the COCO 2017 download); set data.root=/path or COCO_ROOT. Without COCO, data=shapes trains on "
            "a generated dataset.")
    if root in (None, "", "None"):
        raise DataConfigError(f"data.root is not set for data=coco; {hint}")
    root = Path(root)
    splits = {s: (root / "annotations" / f"instances_{s}2017.json", root / f"{s}2017") for s in ("train", "val")}
    missing = [str(p) for pair in splits.values() for p in pair if not p.exists()]
    if missing:
        raise DataConfigError(f"data.root={root} lacks {', '.join(missing)}; {hint}")
    return splits


# ---------------------------------------------------------------------------------------------------------
# The generated shapes set

@dataclass(frozen=True)
class ShapesSpec:
    """What the generated set looks like; the files are rewritten only when this (or the version) changes."""

    num_train: int = 800
    num_val: int = 100
    image_size: int = 128
    min_objects: int = 2
    max_objects: int = 5
    min_extent: int = 14      # bounding-square side of a shape, pixels
    max_extent: int = 48
    min_visible: float = 0.3  # an occluded object keeps its annotation while this fraction stays visible
    seed: int = 0


def _draw_shape(kind: str, cx: float, cy: float, extent: float, angle: float, size: int) -> np.ndarray:
    """A filled shape as an exact boolean mask (what is painted is what is annotated)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    r = extent / 2
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        if kind == "square":
            pts = [(-r, -r), (r, -r), (r, r), (-r, r)]
        elif kind == "triangle":
            pts = [(0, -r), (r * math.sin(2 * math.pi / 3), r / 2), (-r * math.sin(2 * math.pi / 3), r / 2)]
        else:  # cross: two bars of a third of the extent
            w = r / 3
            pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
                   (-r, -w), (-w, -w)]
        c, s = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=1)
    return np.asarray(canvas, dtype=bool)


def _render(rng: np.random.Generator, spec: ShapesSpec):
    """One image (H, W, 3 uint8) and its visible objects [(class index, mask)], later shapes on top."""
    size = spec.image_size
    base = rng.integers(0, 256, size=3)
    image = np.clip(base + rng.normal(0, 12, size=(size, size, 3)), 0, 255)
    objects = []
    for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
        cls = int(rng.integers(len(SHAPE_CLASSES)))
        extent = float(rng.uniform(spec.min_extent, spec.max_extent))
        cx, cy = rng.uniform(extent / 2, size - extent / 2, size=2)
        mask = _draw_shape(SHAPE_CLASSES[cls], cx, cy, extent, float(rng.uniform(0, 2 * math.pi)), size)
        color = rng.integers(0, 256, size=3)
        while np.abs(color - base).sum() < 120:  # keep every shape distinguishable from the background
            color = rng.integers(0, 256, size=3)
        image[mask] = np.clip(color + rng.normal(0, 8, size=(int(mask.sum()), 3)), 0, 255)
        objects = [(c, m & ~mask, full) for c, m, full in objects]  # occlusion: later shapes cover earlier
        objects.append((cls, mask, int(mask.sum())))
    visible = [(c, m) for c, m, full in objects if m.sum() >= spec.min_visible * full and m.any()]
    return image.astype(np.uint8), visible


def _coco_split(rng, spec: ShapesSpec, count: int, image_dir: Path, first_id: int) -> dict:
    from PIL import Image
    from pycocotools import mask as mask_util

    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        image_id = first_id + i
        pixels, objects = _render(rng, spec)
        file_name = f"{image_id:06d}.png"
        Image.fromarray(pixels).save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": spec.image_size,
                       "width": spec.image_size})
        for cls, mask in objects:
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            x, y, w, h = mask_util.toBbox(rle).tolist()
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": cls + 1, "segmentation": rle, "area": float(mask.sum()),
                                "bbox": [x, y, w, h], "iscrowd": 0})
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CLASSES)]
    return {"info": {"description": "generated shapes (mabn.d2.data)", "version": _GENERATOR_VERSION},
            "images": images, "annotations": annotations, "categories": categories}


def _shapes_paths(root: Path) -> dict[str, tuple[Path, Path]]:
    return {s: (root / "annotations" / f"instances_{s}.json", root / s) for s in ("train", "val")}


def _read_stamp(root: Path) -> dict | None:
    try:
        return json.loads((root / "shapes_spec.json").read_text())
    except (OSError, ValueError):
        return None


def make_shapes(root: str | Path, spec: ShapesSpec = ShapesSpec()) -> dict[str, tuple[Path, Path]]:
    """Write the shapes set as COCO files under ``root`` (train/, val/, annotations/) unless it is there.

    Deterministic in ``spec`` (seeded numpy); exact RLE masks of the visible part of each shape (later
    shapes occlude earlier ones). Returns the same mapping as ``check_coco_root``.

    The set is built in a private staging directory beside ``root`` and renamed into place, so jobs that
    start together (a sweep, two shells) never read each other's half-written files: the first rename
    wins and the others discard their copy. A set from another spec or generator version is replaced.
    """
    root = Path(root)
    stamp = {"version": _GENERATOR_VERSION, **asdict(spec)}
    if _read_stamp(root) == stamp:
        return _shapes_paths(root)
    logger.info("generating the shapes dataset in %s (%d train / %d val images)", root, spec.num_train,
                spec.num_val)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.staging-", dir=root.parent))
    stale = None
    try:
        rng = np.random.default_rng(spec.seed)
        (staging / "annotations").mkdir()
        first = {"train": 1, "val": 1_000_001}
        for split, count in (("train", spec.num_train), ("val", spec.num_val)):
            json_path, image_dir = _shapes_paths(staging)[split]
            json_path.write_text(json.dumps(_coco_split(rng, spec, count, image_dir, first[split])))
        (staging / "shapes_spec.json").write_text(json.dumps(stamp, indent=2) + "\n")
        if _read_stamp(root) != stamp:  # another job may have finished first
            if root.exists():  # a set of another spec, or a half-written one
                stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.stale-", dir=root.parent))
                root.replace(stale / root.name)
            try:
                staging.replace(root)
            except OSError:  # a job that started with this one renamed its copy in first
                if _read_stamp(root) != stamp:
                    raise
    finally:
        for leftover in (staging, stale):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return _shapes_paths(root)


def _check_coco(data_cfg) -> None:
    check_coco_root(data_cfg["root"])


@register_dataset("coco", task="detection", check=_check_coco)
def _coco(data_cfg) -> dict[str, tuple[Path, Path]]:
    return check_coco_root(data_cfg["root"])


@register_dataset("shapes", task="detection", check=lambda d: None)  # generated on first use: nothing to check
def _shapes(data_cfg) -> dict[str, tuple[Path, Path]]:
    spec = ShapesSpec(num_train=data_cfg["num_train"], num_val=data_cfg["num_val"],
                      image_size=data_cfg["image_size"])
    return make_shapes(data_cfg["root"], spec)
