"""
Where each dataset lives on disk and how it is registered with detectron2's catalogs.

- ``synthetic`` (built in; written by ``python -m pipeline.data.prepare``) gives two datasets of the same
  images: ``synthetic_lvis_{train,val}`` (federated LVIS v1 labels) and ``synthetic_coco_{train,val}``
  (every object labelled, COCO schema: the COCO column of Table 1).
- ``lvis_v1`` and ``coco_2017`` use detectron2's usual layout under ``root``
  (``coco/{train2017,val2017}``, ``coco/annotations/instances_{train,val}2017.json``,
  ``lvis/lvis_v1_{train,val}.json``) and its own ``register_lvis_instances`` /
  ``register_coco_instances`` with the built-in metadata.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_lvis_json, register_coco_instances, register_lvis_instances
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.data.datasets.lvis import get_lvis_instances_meta

from pipeline.params import DATASETS  # noqa: E402  (one list of names, also for params checks)

SPLITS = ("train", "val")


@dataclass(frozen=True)
class Split:
    """One registered split: its detectron2 name, annotation json, and image location."""

    name: str
    json_file: Path
    image_root: Path
    kind: str  # "lvis" (federated labels, LVISEvaluator) or "coco" (COCOEvaluator)

    def image_file(self, image: dict) -> str:
        """The path detectron2's loader reads for an image record."""
        if self.kind == "lvis":
            # detectron2's load_lvis_json: image_root + the last folder of coco_url, then the file.
            split_folder, file_name = image["coco_url"].split("/")[-2:]
            return os.path.join(str(self.image_root) + os.sep + split_folder, file_name)
        return os.path.join(self.image_root, image["file_name"])


def default_root() -> Path:
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets"))


def layout(name: str, root: Path) -> Dict[str, List[Split]]:
    """
    The splits of dataset ``name`` under ``root``, keyed by annotation flavour ("lvis" / "coco").
    For ``synthetic``, ``root`` is the prepare stage's output directory.
    """
    root = Path(root)
    if name == "synthetic":
        ann = root / "annotations"
        return {
            "lvis": [Split(f"synthetic_lvis_{s}", ann / f"lvis_v1_{s}.json", root / "images", "lvis")
                     for s in SPLITS],
            "coco": [Split(f"synthetic_coco_{s}", ann / f"coco_{s}.json", root / "images", "coco")
                     for s in SPLITS],
        }
    if name == "lvis_v1":
        return {"lvis": [Split(f"lvis_v1_{s}", root / "lvis" / f"lvis_v1_{s}.json", root / "coco", "lvis")
                         for s in SPLITS]}
    if name == "coco_2017":
        return {"coco": [Split(f"coco_2017_{s}", root / "coco" / "annotations" / f"instances_{s}2017.json",
                               root / "coco" / f"{s}2017", "coco") for s in SPLITS]}
    raise ValueError(f"data.name={name!r}; allowed: {', '.join(DATASETS)}")


def _synthetic_loader(split: Split) -> Callable[[], list]:
    # No dataset_name: load_lvis_json would look up LVIS v1's built-in 1203-class metadata.
    return lambda: load_lvis_json(str(split.json_file), str(split.image_root) + os.sep)


def register(name: str, root: Path) -> Dict[str, List[Split]]:
    """Register every split of ``name`` with DatasetCatalog/MetadataCatalog (idempotent)."""
    splits = layout(name, root)
    for flavour in splits.values():
        for split in flavour:
            if split.name in DatasetCatalog.list():
                # detectron2 pre-registers lvis_v1_* and coco_2017_* under ./datasets: replace them.
                DatasetCatalog.remove(split.name)
                MetadataCatalog.remove(split.name)
            if name == "synthetic" and split.kind == "lvis":
                categories = json.loads(split.json_file.read_text())["categories"]
                DatasetCatalog.register(split.name, _synthetic_loader(split))
                MetadataCatalog.get(split.name).set(
                    json_file=str(split.json_file), image_root=str(split.image_root),
                    evaluator_type="lvis",
                    thing_classes=[c["name"] for c in sorted(categories, key=lambda c: c["id"])])
            elif split.kind == "lvis":
                register_lvis_instances(split.name, get_lvis_instances_meta("lvis_v1"),
                                        str(split.json_file), str(split.image_root) + os.sep)
            elif name == "synthetic":
                register_coco_instances(split.name, {}, str(split.json_file), str(split.image_root))
            else:
                register_coco_instances(split.name, _get_builtin_metadata("coco"),
                                        str(split.json_file), str(split.image_root))
    return splits
