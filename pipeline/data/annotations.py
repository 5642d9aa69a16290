"""
Annotation files (COCO or LVIS schema) as the dicts ``json.load`` gives, without detectron2: the
evaluator, the report's figures and ``tools/federated_gap.py`` share these.
"""
from typing import Iterable


def only_images(data: dict, image_ids: Iterable[int]) -> dict:
    """An annotation json (COCO or LVIS schema, as a dict) restricted to the images ``image_ids``
    and their annotations; every other key (categories, info) kept."""
    keep = set(image_ids)
    return {**data, "images": [im for im in data["images"] if im["id"] in keep],
            "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}
