"""
How much of a box AP is the federated protocol's: one run's detections scored three ways, on the
same images, without the pipeline's evaluators.

    python tools/federated_gap.py --eval-dir RUN_DIR/eval/KEY [--json FILE]
    python tools/federated_gap.py --detections FILE [--lvis-gt FILE] [--coco-gt FILE] [--json FILE]

1. ``federated``: ``lvis.LVISEval`` on the federated labels (LVIS v1's protocol, the pipeline's AP).
   A category is scored only on the images where it is positive or a verified negative; a
   detection of it elsewhere is neither true nor false.
2. ``exhaustive``: ``lvis.LVISEval`` on the exhaustive labels of the same images, written in LVIS
   form: every box of the COCO-schema file, and every category without a box in an image a
   verified negative there. Every detection counts.
3. ``coco``: ``pycocotools.COCOeval`` on the exhaustive labels (the COCO column's protocol,
   at most 100 detections per image).

(2) and (3) should agree to within the detection limit (300 vs 100 per image); (1) minus (2) is
what the federated labels add. Why it matters here: a synthetic validation image is labelled for
about 5 of the 40 categories (its positives and 0-4 negatives), so a category is scored on about
one image in eight, and most of a detector's confusions between similar categories are never
counted; the COCO column's AP is far below the LVIS-style AP of the same images for this reason,
not because of its models (README, "Reference run").

The exhaustive labels default to the synthetic set's ``coco_val.json`` (same images and category
ids as ``lvis_v1_val.json``); LVIS v1 itself has no exhaustive labels, so this applies to it only
with such a file. ``--eval-dir`` reads an evaluation directory of ``pipeline.runs.evaluate``: its
``*_instances_results.json`` and the image ids of its ``metrics.json`` (a subset is scored on its
images only).
"""
import argparse
import contextlib
import copy
import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lvis import LVIS, LVISEval, LVISResults  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from pipeline.atomic import write_text  # noqa: E402
from pipeline.data.annotations import only_images  # noqa: E402
from pipeline.runs.spec import METRICS_FILE  # noqa: E402

ANNOTATIONS = ROOT / "data" / "synthetic" / "annotations"
RESULT_FILES = ("lvis_instances_results.json", "coco_instances_results.json")


def exhaustive_as_lvis(lvis_gt: dict, coco_gt: dict) -> dict:
    """
    The exhaustive labels of ``coco_gt`` in LVIS form, for ``LVISEval``: ``lvis_gt``'s images and
    categories (frequency groups), ``coco_gt``'s boxes, and as verified negatives of an image every
    category with no box in it; nothing is "not exhaustive".
    """
    cats = {c["id"] for c in lvis_gt["categories"]}
    present: Dict[int, set] = {}
    for a in coco_gt["annotations"]:
        present.setdefault(a["image_id"], set()).add(a["category_id"])
    images = [{**im, "neg_category_ids": sorted(cats - present.get(im["id"], set())),
               "not_exhaustive_category_ids": []} for im in lvis_gt["images"]]
    ids = {im["id"] for im in images}
    anns = [{k: v for k, v in a.items() if k != "iscrowd"} for a in coco_gt["annotations"] if a["image_id"] in ids]
    return {**lvis_gt, "images": images, "annotations": anns}


def _lvis_ap(gt: dict, detections: List[dict], max_dets: int = 300) -> Dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        path = Path(tmp) / "gt.json"
        path.write_text(json.dumps(gt))
        lvis_gt = LVIS(str(path))
        results = LVISResults(lvis_gt, copy.deepcopy(detections), max_dets=max_dets)
        e = LVISEval(lvis_gt, results, "bbox")
        e.params.max_dets = max_dets
        e.run()
    r = e.get_results()  # -1: no category of that group has a box in the images scored
    return {k: 100 * float(r[k]) if r[k] >= 0 else None for k in ("AP", "AP50", "APr", "APc", "APf")}


def _coco_ap(gt: dict, detections: List[dict]) -> Dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()  # indexed from the dict itself (LVIS only reads a file)
        coco_gt.dataset = gt
        coco_gt.createIndex()
        e = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(detections)), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return {"AP": 100 * float(e.stats[0]), "AP50": 100 * float(e.stats[1])}


def score(detections: List[dict], lvis_gt: dict, coco_gt: dict,
          image_ids: Optional[Iterable[int]] = None) -> Dict[str, Dict[str, float]]:
    """
    ``detections`` (COCO results format: image_id, category_id, bbox [x, y, w, h], score) scored
    the three ways of the module docstring on ``image_ids`` (None: every image of ``lvis_gt``).
    Returns ``{"federated": {...}, "exhaustive": {...}, "coco": {...}}``, APs in percent.
    """
    if image_ids is not None:
        lvis_gt, coco_gt = only_images(lvis_gt, image_ids), only_images(coco_gt, image_ids)
    ids = {im["id"] for im in lvis_gt["images"]}
    if ids != {im["id"] for im in coco_gt["images"]}:
        raise ValueError("the federated and exhaustive label files hold different images")
    detections = [d for d in detections if d["image_id"] in ids]
    if not detections:
        raise ValueError("no detections on the images scored")
    return {"federated": _lvis_ap(lvis_gt, detections), "exhaustive": _lvis_ap(exhaustive_as_lvis(lvis_gt, coco_gt),
                                                                               detections),
            "coco": _coco_ap(coco_gt, detections)}


def _from_eval_dir(eval_dir: Path):
    found = [eval_dir / name for name in RESULT_FILES if (eval_dir / name).is_file()]
    if not found:
        raise FileNotFoundError(f"{eval_dir}: none of {', '.join(RESULT_FILES)}; "
                                "is it an evaluation directory (RUN_DIR/eval/KEY) of a finished evaluation?")
    metrics = eval_dir / METRICS_FILE
    ids = json.loads(metrics.read_text())["images"]["ids"] if metrics.is_file() else None
    return json.loads(found[0].read_text()), ids


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--eval-dir", type=Path, help="an evaluation directory of a run (RUN_DIR/eval/KEY)")
    source.add_argument("--detections", type=Path, help="a COCO-format detections file")
    parser.add_argument("--lvis-gt", type=Path, default=ANNOTATIONS / "lvis_v1_val.json",
                        help="federated labels (default: %(default)s)")
    parser.add_argument("--coco-gt", type=Path, default=ANNOTATIONS / "coco_val.json",
                        help="exhaustive labels of the same images (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the three scorings to this file")
    args = parser.parse_args(argv)
    try:
        if args.eval_dir:
            detections, ids = _from_eval_dir(args.eval_dir)
        else:
            detections, ids = json.loads(args.detections.read_text()), None
        out = score(detections, json.loads(args.lvis_gt.read_text()), json.loads(args.coco_gt.read_text()), ids)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    for name, what in (("federated", "LVISEval, federated labels"), ("exhaustive", "LVISEval, exhaustive labels"),
                       ("coco", "COCOeval, exhaustive labels")):
        print(f"{what:30s} " + "  ".join(f"{k} {v:6.2f}" if v is not None else f"{k}      -"
                                         for k, v in out[name].items()))
    if args.json:
        write_text(args.json, json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
