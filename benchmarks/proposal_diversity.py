"""
How many distinct regions a two-stage detector's proposals cover: per validation image, the test-time
proposals and, of them, those that overlap no higher-scored proposal at IoU above ``--iou``; and how
many of the annotated objects they find: the recall of the top-K proposals (K = 10, 50, 100, all) at
IoU 0.5 and 0.7, over all annotated validation boxes, and that of all proposals at IoU 0.5 by the
boxes' size (sqrt(area) in the network input's pixels: <16, 16-32, 32-64, >=64).

    python benchmarks/proposal_diversity.py RUN_DIR [RUN_DIR ...] [--images 40] [--iou 0.7] [--json F]

A run directory is a finished training run (``model_final.pth``, ``config.yaml``), e.g. one kept by
``benchmarks/learning.py --keep DIR`` (``DIR/<detector>``) or one in the run store. Prints, per run,
proposals per image and distinct proposals per image (means over the first ``--images`` validation
images). A class-specific CenterNet2 with per-category NMS proposes a box once per category that
fires at its place (reports/reference/experiments.md sec. 3-4). Recall tells whether the proposals
limit the second stage (sec. 9: CascadeRCNN against CenterNet2 at 800 and 3,000 iterations).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# isort: off
import model  # noqa: E402,F401  (first: model.compat must run before detectron2 loads)
import torch  # noqa: E402
from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_test_loader  # noqa: E402
from detectron2.structures import Boxes, BoxMode, pairwise_iou  # noqa: E402
from pipeline.runs.predict import load_config, load_model, val_split  # noqa: E402
# isort: on


def distinct(boxes, iou: float) -> int:
    """Of ``boxes`` (detectron2 ``Boxes``, sorted by descending score), how many overlap no earlier box
    at IoU > ``iou``."""
    if len(boxes) == 0:
        return 0
    overlaps = pairwise_iou(boxes, boxes).triu(diagonal=1)  # [i, j]: box i scored above box j
    return int((overlaps.amax(dim=0) <= iou).sum())


TOP_K = (10, 50, 100, None)  # None: all proposals
RECALL_IOU = (0.5, 0.7)
SIDES = (16, 32, 64)  # size buckets: sqrt(area) in the network input's pixels


def best_iou(proposals, gt, k=None) -> torch.Tensor:
    """(G,): each of the ``gt`` boxes' highest IoU with one of the first ``k`` (None: all) of
    ``proposals`` (``Boxes`` sorted by descending score, same coordinates); 0 without proposals."""
    return _best(pairwise_iou(gt, proposals), k)


def _best(ious: torch.Tensor, k=None) -> torch.Tensor:
    """(G,): each row's highest value among the first ``k`` columns of ``ious`` (G, P); 0 without columns."""
    top = ious[:, :k]  # (G, min(k, P))
    return top.amax(dim=1) if top.shape[1] else torch.zeros(len(ious))


def found(proposals, gt, top_k=TOP_K, ious=RECALL_IOU) -> dict:
    """
    Per (K, IoU), how many of the ``gt`` boxes (``Boxes``, G) some proposal among the first K of
    ``proposals`` overlaps at IoU >= the threshold. Keys "K@IoU", K "all" for every proposal.
    """
    out = {}
    overlaps = pairwise_iou(gt, proposals)  # (G, P), once for every K
    for k in top_k:
        best = _best(overlaps, k)
        for t in ious:
            out[f"{'all' if k is None else k}@{t}"] = int((best >= t).sum())
    return out


def side_bucket(side: float, edges=SIDES) -> str:
    """A box's size bucket by its sqrt(area): "<16", "16-32", "32-64", ">=64" for the default edges."""
    for i, edge in enumerate(edges):
        if side < edge:
            return f"<{edge}" if i == 0 else f"{edges[i - 1]}-{edge}"
    return f">={edges[-1]}"


def _gt_boxes(record: dict, scale_x: float, scale_y: float) -> Boxes:
    """The image's annotated boxes (XYXY) in the network input's pixels (the record's are the
    original image's; the test-time resize scales them)."""
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in record.get("annotations", [])]
    gt = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    gt.scale(scale_x, scale_y)
    return gt


def measure(run_dir: Path, images: int, iou: float) -> dict:
    cfg = load_config(run_dir, device="cpu")
    net = load_model(run_dir, cfg)
    dataset = DatasetCatalog.get(val_split(run_dir).name)[:images]
    counts, kept, hits, boxes = [], [], {}, 0
    by_side = {side_bucket(s): [0, 0] for s in (0,) + SIDES}  # [found at IoU 0.5 by all proposals, boxes]
    with torch.no_grad():
        loader = build_detection_test_loader(dataset, mapper=DatasetMapper(cfg, is_train=False), num_workers=0)
        for record, (inputs,) in zip(dataset, loader):
            images_ = net.preprocess_image([inputs])
            features = net.backbone(images_.tensor)
            (props,), _ = net.proposal_generator(images_, features, None)
            ranked = props.proposal_boxes[props.objectness_logits.argsort(descending=True)]
            counts.append(len(props))
            kept.append(distinct(ranked, iou))
            h, w = images_.image_sizes[0]
            gt = _gt_boxes(record, w / record["width"], h / record["height"])
            boxes += len(gt)
            for key, n in found(ranked, gt).items():
                hits[key] = hits.get(key, 0) + n
            for side, best in zip(gt.area().sqrt().tolist(), best_iou(ranked, gt).tolist()):
                cell = by_side[side_bucket(side)]
                cell[0] += int(best >= 0.5)
                cell[1] += 1
    n = max(len(counts), 1)
    return {"run": str(run_dir), "images": len(counts), "proposals": sum(counts) / n, "distinct": sum(kept) / n,
            "boxes": boxes, "recall": {key: round(v / max(boxes, 1), 4) for key, v in hits.items()},
            "recall_all@0.5_by_side": {key: f"{f}/{b}" for key, (f, b) in by_side.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished training run directories")
    parser.add_argument("--images", type=int, default=40, help="first N validation images (default 40)")
    parser.add_argument("--iou", type=float, default=0.7, help="overlap above which a proposal repeats a "
                                                               "higher-scored one (default 0.7)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    rows = []
    for run_dir in args.runs:
        r = measure(run_dir, args.images, args.iou)
        rows.append(r)
        recall = ", ".join(f"{k} {v:.3f}" for k, v in r["recall"].items())
        print(f"{r['run']}: {r['proposals']:.1f} proposals per image, {r['distinct']:.1f} distinct at IoU "
              f"{args.iou} ({r['images']} images); recall of {r['boxes']} boxes (top-K@IoU): {recall}; "
              f"all@0.5 by side in input pixels: {r['recall_all@0.5_by_side']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"images": args.images, "iou": args.iou, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
