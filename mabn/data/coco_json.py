"""``data=coco_json``: the user's own COCO-format instance segmentation files, checked before anything starts.

The class count comes from the files' categories (ids need not be contiguous: detectron2's
``register_coco_instances`` maps them to 0..K-1 and COCOEvaluator maps predictions back), and the mask
format from the annotations: polygons only -> detectron2's ``polygon``; any RLE -> ``bitmask``, which
decodes polygons and RLE alike (``detection_utils.annotations_to_instances``). Nothing here imports
detectron2.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .registry import DataConfigError, register_dataset

MASK_FORMATS = ("auto", "polygon", "bitmask")
logger = logging.getLogger(__name__)
_SPLITS = {"train": ("train_json", "train_images"), "val": ("val_json", "val_images")}


def _path(data_cfg, key: str, *, folder: bool) -> Path:
    value = data_cfg[key]
    if value in (None, "", "None"):
        what = "image folder" if folder else "annotation JSON file"
        raise DataConfigError(f"data.{key} is not set for data=coco_json (a split's {what}); "
                              f"set data.{key}=/path")
    path = Path(value)
    if folder and not path.is_dir():
        raise DataConfigError(f"data.{key}={path} is not a folder")
    if not folder and not path.is_file():
        raise DataConfigError(f"data.{key}={path} is not a file")
    return path


def _read_coco(key: str, path: Path) -> dict:
    """The parsed file, or an error naming the key and the path when it is not COCO instance JSON."""
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataConfigError(f"data.{key}={path} is not readable JSON: {err}") from err
    if not isinstance(content, dict):
        raise DataConfigError(f"data.{key}={path} is not a COCO file (a JSON object with images, annotations "
                              f"and categories)")
    for field in ("images", "annotations", "categories"):
        if not isinstance(content.get(field), list):
            raise DataConfigError(f"data.{key}={path} has no {field!r} list (COCO instance format)")
    if not content["categories"]:
        raise DataConfigError(f"data.{key}={path} has no categories")
    return content


def _categories(content: dict) -> dict[int, str]:
    return {int(c["id"]): str(c.get("name", c["id"])) for c in content["categories"]}


def mask_kinds(content: dict) -> set[str]:
    """``polygon`` and/or ``rle``: what the non-crowd annotations hold (detectron2's mapper drops crowd ones,
    so COCO 2017's RLE crowd regions do not force bitmasks)."""
    kinds = set()
    for ann in content["annotations"]:
        segm = ann.get("segmentation")
        if ann.get("iscrowd", 0) or not segm:
            continue
        kinds.add("rle" if isinstance(segm, dict) else "polygon")
    return kinds


def _check_images(key: str, folder: Path, content: dict, json_key: str) -> None:
    """Every listed image file is there: one stat each, 0.9 s for a listing of COCO train2017's size (118,287
    images; measured on this 2-core machine's local disk, warm cache). A missing image would otherwise be a
    FileNotFoundError at whatever iteration first draws it, hours in, and again on every rerun."""
    missing = [img["file_name"] for img in content["images"] if not (folder / img["file_name"]).is_file()]
    if missing:
        raise DataConfigError(f"data.{key}={folder} lacks {Path(missing[0]).name}, "
                              f"{'the first' if missing[0] == content['images'][0]['file_name'] else 'an'} image of "
                              f"data.{json_key} ({len(missing)} of its {len(content['images'])} images missing)")


def _check_annotations(key: str, path: Path, content: dict) -> None:
    """Errors: no annotations, or category ids outside the categories (detectron2: a KeyError after the start).
    Warnings, as detectron2 gives for the first: annotations of images not listed, boxes of no size."""
    anns = content["annotations"]
    if not anns:
        raise DataConfigError(f"data.{key}={path} has an empty annotations list: nothing to train or evaluate on")
    known = _categories(content)
    unknown = [a.get("category_id") for a in anns if a.get("category_id") not in known]
    if unknown:
        raise DataConfigError(f"data.{key}={path}: {len(unknown)} annotation(s) with a category_id not in its "
                              f"categories, e.g. {unknown[0]!r} (categories: {sorted(known)})")
    images = {img["id"] for img in content["images"]}
    orphans = sum(a.get("image_id") not in images for a in anns)
    if orphans:
        logger.warning("data.%s=%s: %d annotation(s) of image ids not in its images are ignored", key, path,
                       orphans)
    flat = sum(len(a.get("bbox") or ()) == 4 and (a["bbox"][2] <= 0 or a["bbox"][3] <= 0) for a in anns)
    if flat:
        logger.warning("data.%s=%s: %d box(es) of non-positive width or height are dropped in training", key,
                       path, flat)


def _mask_format(data_cfg, kinds: set[str], train_json: Path) -> str:
    wanted = data_cfg["mask_format"]
    if wanted not in MASK_FORMATS:
        raise DataConfigError(f"data.mask_format must be one of {MASK_FORMATS}, got {wanted!r}")
    if wanted == "polygon" and "rle" in kinds:
        raise DataConfigError(f"data.mask_format=polygon, but data.train_json={train_json} or data.val_json "
                              f"holds RLE masks; use auto or bitmask")
    if wanted != "auto":
        return wanted
    return "bitmask" if "rle" in kinds else "polygon"


def check_coco_json(data_cfg) -> dict[str, Any]:
    """Check both splits' files and return what the config takes from them: ``num_classes`` (the categories)
    and ``mask_format`` (from the annotations), or raise DataConfigError naming the key and the path."""
    contents, kinds = {}, set()
    for split, (json_key, image_key) in _SPLITS.items():
        json_path = _path(data_cfg, json_key, folder=False)
        folder = _path(data_cfg, image_key, folder=True)
        contents[split] = content = _read_coco(json_key, json_path)
        _check_images(image_key, folder, content, json_key)
        kinds |= mask_kinds(content)
    train, val = (_categories(contents[s]) for s in ("train", "val"))
    if train != val:
        raise DataConfigError(f"data.val_json={data_cfg['val_json']} has categories {sorted(val.items())}, "
                              f"data.train_json={data_cfg['train_json']} has {sorted(train.items())}; "
                              f"both splits need the same categories")
    for split, (json_key, _) in _SPLITS.items():  # after the categories: an annotation's id is judged by them
        _check_annotations(json_key, Path(data_cfg[json_key]), contents[split])
    num_classes = data_cfg.get("num_classes")
    if num_classes is not None and num_classes != len(train):
        raise DataConfigError(f"data.num_classes={num_classes} disagrees with the {len(train)} categories of "
                              f"data.train_json={data_cfg['train_json']}; leave data.num_classes=null to use "
                              f"them")
    mask_format = _mask_format(data_cfg, kinds, Path(data_cfg["train_json"]))
    return {"num_classes": len(train), "mask_format": mask_format}


@register_dataset("coco_json", task="detection", check=check_coco_json)
def _coco_json(data_cfg) -> dict[str, tuple[Path, Path]]:
    return {split: (Path(data_cfg[j]), Path(data_cfg[i])) for split, (j, i) in _SPLITS.items()}
