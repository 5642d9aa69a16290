"""
How many distinct regions a two-stage detector's proposals cover: per validation image, the test-time
proposals and, of them, those that overlap no higher-scored proposal at IoU above ``--iou``.

    python benchmarks/proposal_diversity.py RUN_DIR [RUN_DIR ...] [--images 40] [--iou 0.7]

A run directory is a finished training run (``model_final.pth``, ``config.yaml``), e.g. one kept by
``benchmarks/learning.py --keep DIR`` (``DIR/<detector>``) or one in the run store. Prints, per run,
proposals per image and distinct proposals per image (means over the first ``--images`` validation
images). A class-specific CenterNet2 with per-category NMS proposes a box once per category that
fires at its place (reports/reference/experiments.md sec. 3-4).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# isort: off
import model  # noqa: E402,F401  (first: model.compat must run before detectron2 loads)
import torch  # noqa: E402
from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_test_loader  # noqa: E402
from detectron2.structures import pairwise_iou  # noqa: E402
from pipeline.runs.predict import load_config, load_model, val_split  # noqa: E402
# isort: on


def distinct(boxes, iou: float) -> int:
    """Of ``boxes`` (detectron2 ``Boxes``, sorted by descending score), how many overlap no earlier box
    at IoU > ``iou``."""
    if len(boxes) == 0:
        return 0
    overlaps = pairwise_iou(boxes, boxes).triu(diagonal=1)  # [i, j]: box i scored above box j
    return int((overlaps.amax(dim=0) <= iou).sum())


def measure(run_dir: Path, images: int, iou: float) -> dict:
    cfg = load_config(run_dir, device="cpu")
    net = load_model(run_dir, cfg)
    dataset = DatasetCatalog.get(val_split(run_dir).name)[:images]
    counts, kept = [], []
    with torch.no_grad():
        for (inputs,) in build_detection_test_loader(dataset, mapper=DatasetMapper(cfg, is_train=False),
                                                     num_workers=0):
            images_ = net.preprocess_image([inputs])
            features = net.backbone(images_.tensor)
            (props,), _ = net.proposal_generator(images_, features, None)
            order = props.objectness_logits.argsort(descending=True)
            counts.append(len(props))
            kept.append(distinct(props.proposal_boxes[order], iou))
    n = max(len(counts), 1)
    return {"run": str(run_dir), "images": len(counts), "proposals": sum(counts) / n, "distinct": sum(kept) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished training run directories")
    parser.add_argument("--images", type=int, default=40, help="first N validation images (default 40)")
    parser.add_argument("--iou", type=float, default=0.7, help="overlap above which a proposal repeats a "
                                                               "higher-scored one (default 0.7)")
    args = parser.parse_args()
    for run_dir in args.runs:
        r = measure(run_dir, args.images, args.iou)
        print(f"{r['run']}: {r['proposals']:.1f} proposals per image, {r['distinct']:.1f} distinct at IoU "
              f"{args.iou} ({r['images']} images)", flush=True)


if __name__ == "__main__":
    main()
