"""
Validate LVIS v1 / COCO instance annotation files before any training starts.

The first problem found raises :class:`DataError` whose one-line message names the file, the record
(``annotations[17] (id 42)``) and the field, e.g.::

    data/lvis/lvis_v1_val.json: annotations[3] (id 4): field 'bbox': box [150.0, 10.0, 40.0, 20.0]
    lies outside image 2 (160x128)
"""
import json
import os
from pathlib import Path
from typing import Callable, Dict, Optional

# A box may overhang its image by this many pixels: LVIS and COCO boxes do, from float rounding.
BOX_TOLERANCE = 1.0


class DataError(ValueError):
    """A malformed dataset file; the message is one line naming file, record and field."""


def _where(path: Path, section: str, index: int, record) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"{path}: {section}[{index}]" + (f" (id {rid})" if rid is not None else "")


def _require(path: Path, section: str, index: int, record, fields) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{_where(path, section, index, record)}: not an object")
    for field in fields:
        if field not in record:
            raise DataError(f"{_where(path, section, index, record)}: missing field '{field}'")


def validate_instances(path: Path, kind: str,
                       image_file: Optional[Callable[[dict], str]] = None) -> Dict[str, int]:
    """
    Check one LVIS (``kind='lvis'``) or COCO (``kind='coco'``) instances json. ``image_file``
    maps an image record to its path on disk (as detectron2's loader would); when given, every
    image must exist. Returns counts of images, annotations and categories.
    """
    if kind not in ("lvis", "coco"):
        raise ValueError(f"kind={kind!r}; allowed: lvis, coco")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level is not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing field '{key}' (a list)")

    cat_fields = ("id", "name", "frequency") if kind == "lvis" else ("id", "name")
    cat_ids = set()
    for i, cat in enumerate(data["categories"]):
        _require(path, "categories", i, cat, cat_fields)
        if cat["id"] in cat_ids:
            raise DataError(f"{_where(path, 'categories', i, cat)}: field 'id': duplicate id")
        if kind == "lvis" and cat["frequency"] not in ("r", "c", "f"):
            raise DataError(f"{_where(path, 'categories', i, cat)}: field 'frequency': "
                            f"{cat['frequency']!r} is not one of r, c, f")
        cat_ids.add(cat["id"])

    file_field = "coco_url" if kind == "lvis" else "file_name"
    image_fields = ("id", "width", "height", file_field)
    images = {}
    for i, im in enumerate(data["images"]):
        _require(path, "images", i, im, image_fields)
        if im["id"] in images:
            raise DataError(f"{_where(path, 'images', i, im)}: field 'id': duplicate id")
        for field in ("width", "height"):
            if not isinstance(im[field], (int, float)) or im[field] <= 0:
                raise DataError(f"{_where(path, 'images', i, im)}: field '{field}': "
                                f"{im[field]!r} is not a positive number")
        if kind == "lvis":
            for field in ("neg_category_ids", "not_exhaustive_category_ids"):
                unknown = [c for c in im.get(field, []) if c not in cat_ids]
                if unknown:
                    raise DataError(f"{_where(path, 'images', i, im)}: field '{field}': "
                                    f"unknown category id {unknown[0]}")
        if image_file is not None:
            file = image_file(im)
            if not os.path.isfile(file):
                raise DataError(f"{_where(path, 'images', i, im)}: field '{file_field}': "
                                f"image file {file} not found")
        images[im["id"]] = im

    ann_ids = set()
    for i, ann in enumerate(data["annotations"]):
        _require(path, "annotations", i, ann, ("id", "image_id", "category_id", "bbox"))
        where = _where(path, "annotations", i, ann)
        if ann["id"] in ann_ids:
            raise DataError(f"{where}: field 'id': duplicate id")
        ann_ids.add(ann["id"])
        if ann["image_id"] not in images:
            raise DataError(f"{where}: field 'image_id': unknown image id {ann['image_id']}")
        if ann["category_id"] not in cat_ids:
            raise DataError(f"{where}: field 'category_id': unknown category id {ann['category_id']}")
        bbox = ann["bbox"]
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) for v in bbox)):
            raise DataError(f"{where}: field 'bbox': {bbox!r} is not [x, y, width, height]")
        x, y, w, h = bbox
        im = images[ann["image_id"]]
        if w <= 0 or h <= 0:
            raise DataError(f"{where}: field 'bbox': box {bbox} has no area")
        if (x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > im["width"] + BOX_TOLERANCE
                or y + h > im["height"] + BOX_TOLERANCE):
            raise DataError(f"{where}: field 'bbox': box {bbox} lies outside image {im['id']} "
                            f"({im['width']}x{im['height']})")
        if kind == "lvis" and ann["category_id"] in im.get("neg_category_ids", []):
            raise DataError(f"{where}: field 'category_id': category {ann['category_id']} is "
                            f"listed in image {im['id']}'s neg_category_ids")
    return {"images": len(images), "annotations": len(ann_ids), "categories": len(cat_ids)}
