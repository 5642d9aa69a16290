"""
How long the tail is, as the classification losses see it: for each frequency group of an
LVIS-format training set, how often a category is positive among the images the repeat-factor
sampler draws, and how often the federated loss puts it in its category set S.

    python tools/tail_imbalance.py [--annotations data/synthetic/annotations/lvis_v1_train.json]
                                   [--threshold T] [--batch 4] [--set-size K]

Why: sigmoid CE gives every category a negative term on every RoI of every image, so a category
drawn in a fraction s of the images gets about (1 - s) / s negative images per positive one; the
federated loss (report section 3) gives it negatives only in iterations where it is in S. The
imbalance the report's FedLoss removes is this ratio on LVIS v1. Works on LVIS v1's own
``lvis_v1_train.json`` by path, for the comparison.
"""
import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model  # noqa: E402,F401  (detectron2's _C stand-in before detectron2 is imported)

# isort: split
from detectron2.data.samplers import RepeatFactorTrainingSampler  # noqa: E402

from model.losses import LVIS_FED_LOSS_CLASSES, _scaled  # noqa: E402
from pipeline.data.synthetic import COMMON_MAX  # noqa: E402

LVIS_V1_TRAIN_IMAGES = 100_170  # LVIS v1 train; its rare categories have 1-10 images each
LVIS_THRESHOLD = 0.001          # the report's repeat-factor threshold on LVIS v1


def group_stats(data: dict, threshold: float, batch: int) -> dict:
    """
    Per frequency group ("r", "c", "f"): categories, images per category (min, max), the share s
    of sampled images holding a category (min, mean, max: sum of the repeat factors of its images
    over the sum of all), negative images per positive one for sigmoid CE ((1 - s) / s, at the
    group's mean s) and P(category in S) per iteration of ``batch`` images when S is the categories
    present in the batch (1 - (1 - s)^batch; a lower bound when FedLoss's |S| exceeds them and
    negatives are sampled). ``data``: LVIS-format annotations, as loaded from JSON.
    """
    frequency = {c["id"]: c.get("frequency", "?") for c in data["categories"]}
    cats_of = defaultdict(set)
    for a in data["annotations"]:
        cats_of[a["image_id"]].add(a["category_id"])
    dicts = [{"annotations": [{"category_id": c} for c in sorted(cats_of[im["id"]])]} for im in data["images"]]
    factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, threshold).tolist()
    total = sum(factors)
    share = defaultdict(float)
    images = defaultdict(int)
    for d, f in zip(dicts, factors):
        for a in d["annotations"]:
            share[a["category_id"]] += f / total
            images[a["category_id"]] += 1
    appeared = sum(1 - (1 - share[c]) ** batch for c in frequency)
    out = {"images": len(dicts), "categories": len(frequency), "threshold": threshold, "batch": batch,
           "mean_categories_in_batch": appeared, "groups": {}}
    for g in ("r", "c", "f"):
        cs = [c for c in frequency if frequency[c] == g]
        if not cs:
            continue
        s = [share[c] for c in cs]
        mean = sum(s) / len(s)
        out["groups"][g] = {
            "categories": len(cs), "images": [min(images[c] for c in cs), max(images[c] for c in cs)],
            "share": [min(s), mean, max(s)],
            "sigmoid_negatives_per_positive": (1 - mean) / mean if mean else math.inf,
            "p_in_S": sum(1 - (1 - x) ** batch for x in s) / len(s)}
    return out


def lvis_rare_share_bound(images: int) -> float:
    """
    Upper bound on the sampled-image share of an LVIS v1 category with ``images`` training images:
    its repeat factor is sqrt(t / f) with f = images / N, and the sum of all factors is at least N,
    so s <= images * sqrt(t N / images) / N = sqrt(t * images / N).
    """
    return math.sqrt(LVIS_THRESHOLD * images / LVIS_V1_TRAIN_IMAGES)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--annotations", type=Path, default=ROOT / "data/synthetic/annotations/lvis_v1_train.json",
                    help="LVIS-format training annotations (default: the synthetic set's)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="repeat-factor threshold t (default: 100 / number of images, as a null "
                         "train.repeat_threshold on the synthetic set; 0.000998 on LVIS v1, the report's 0.001)")
    ap.add_argument("--batch", type=int, default=4, help="images per iteration (train.ims_per_batch)")
    ap.add_argument("--set-size", type=int, default=None,
                    help="FED_LOSS_NUM_CLASSES (default: 50 scaled to the categories, as model/losses.py)")
    args = ap.parse_args(argv)
    if not args.annotations.is_file():
        ap.error(f"{args.annotations}: not found (run `python -m pipeline.data.prepare` for the synthetic set)")
    if args.batch < 1:
        ap.error(f"--batch {args.batch}: must be at least 1")
    data = json.loads(args.annotations.read_text())
    # As runs.spec.repeat_threshold and model.losses.FederatedLoss choose them when unset.
    threshold = args.threshold if args.threshold is not None else COMMON_MAX / len(data["images"])
    set_size = _scaled(-1 if args.set_size is None else args.set_size, LVIS_FED_LOSS_CLASSES, len(data["categories"]))
    stats = group_stats(data, threshold, args.batch)
    print(f"{args.annotations}: {stats['images']} images, {stats['categories']} categories, repeat threshold "
          f"{threshold:g}, batch {args.batch}; categories present per batch {stats['mean_categories_in_batch']:.1f} "
          f"(FedLoss |S| = {set_size}: {'no' if set_size <= stats['mean_categories_in_batch'] else 'some'} "
          "sampled negatives)")
    print("group  cats  images/cat  sampled share s (min / mean / max)   sigmoid neg:pos  P(in S)/iter")
    for g, row in stats["groups"].items():
        lo, mean, hi = row["share"]
        print(f"{g:>5}  {row['categories']:>4}  {row['images'][0]:>4}-{row['images'][1]:<5}  "
              f"{lo:.2e} / {mean:.2e} / {hi:.2e}         {row['sigmoid_negatives_per_positive']:>9.0f}  "
              f"{row['p_in_S']:.3f}")
    print(f"LVIS v1 rare (1-10 of {LVIS_V1_TRAIN_IMAGES:,} images, t = {LVIS_THRESHOLD}): s <= "
          f"{lvis_rare_share_bound(1):.2e} - {lvis_rare_share_bound(10):.2e}, sigmoid neg:pos >= "
          f"{(1 - lvis_rare_share_bound(10)) / lvis_rare_share_bound(10):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
