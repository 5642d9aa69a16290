"""
How long the tail is, as the classification losses see it: for each frequency group of an
LVIS-format training set, how often a category is positive among the images the repeat-factor
sampler draws, and how often the federated loss puts it in its category set S.

    python tools/tail_imbalance.py [--annotations data/synthetic/annotations/lvis_v1_train.json]
                                   [--threshold T] [--batch 4] [--set-size K] [--trials 2000]
    python tools/tail_imbalance.py --cat-info lvis_v1_train_cat_info.json --batch 2

Why: sigmoid CE gives every category a negative term on every RoI of every image, so a category
drawn in a fraction s of the images gets about (1 - s) / s negative images per positive one; the
federated loss (report section 3) gives it negatives only in iterations where it is in S. The
imbalance the report's FedLoss removes is this ratio on LVIS v1. Works on LVIS v1's own
``lvis_v1_train.json`` by path, for the comparison. P(in S) is measured with the loss's own sampler
(``FederatedLoss.sample_classes``) on ``--trials`` drawn batches, so it counts the negatives FedLoss
samples as well as the categories present, and the negative images per positive each loss gives a
category. ``--cat-info`` takes only per-category image counts (the ``cat_info.json`` the official
code's FedLoss reads, with LVIS's ``frequency`` field): each image of a batch then holds each
category independently, with the upper bound of its repeat-factor share (``shares_from_counts``;
on LVIS v1 a rare category is in a 2-image batch with probability under 7e-4 either way, so its
P(in S) is that of the sampled negatives).
"""
import argparse
import json
import math
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model  # noqa: E402,F401  (detectron2's _C stand-in before detectron2 is imported)

# isort: split
import torch  # noqa: E402
from detectron2.data.samplers import RepeatFactorTrainingSampler  # noqa: E402

from model import get_model_cfg  # noqa: E402
from model.losses import FederatedLoss  # noqa: E402
from pipeline.data.prepare import cat_info_of  # noqa: E402
from pipeline.data.synthetic import COMMON_MAX  # noqa: E402
from pipeline.runs.spec import synthetic_fed_loss_num_classes  # noqa: E402

LVIS_V1_TRAIN_IMAGES = 100_170  # LVIS v1 train; its rare categories have 1-10 images each
LVIS_THRESHOLD = 0.001          # the report's repeat-factor threshold on LVIS v1


class SampledImages:
    """
    The training images as the repeat-factor sampler draws them, built once for ``group_stats`` and
    ``presence_from_images``: ``ids`` (C,) category ids sorted (the loss's index order),
    ``images`` per image the sorted indices of the categories it holds, ``factors`` (N,) float64
    repeat factors (an image is drawn with probability factor / sum).
    """

    def __init__(self, data: dict, threshold: float):
        self.ids = sorted(c["id"] for c in data["categories"])
        index = {cid: k for k, cid in enumerate(self.ids)}
        cats_of = defaultdict(set)
        for a in data["annotations"]:
            cats_of[a["image_id"]].add(index[a["category_id"]])
        self.images = [sorted(cats_of[im["id"]]) for im in data["images"]]
        dicts = [{"annotations": [{"category_id": self.ids[k]} for k in cats]} for cats in self.images]
        self.factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, threshold).double()


def group_stats(data: dict, threshold: float, batch: int, sampled: SampledImages = None) -> dict:
    """
    Per frequency group ("r", "c", "f"): categories, images per category (min, max), the share s
    of sampled images holding a category (min, mean, max: sum of the repeat factors of its images
    over the sum of all), negative images per positive one for sigmoid CE ((1 - s) / s, at the
    group's mean s) and P(category present) per iteration of ``batch`` images (1 - (1 - s)^batch; a
    lower bound of P(in S), which ``fed_loss_exposure`` measures). ``data``: LVIS-format annotations,
    as loaded from JSON; ``sampled``: its ``SampledImages`` at ``threshold`` when already built.
    """
    frequency = {c["id"]: c.get("frequency", "?") for c in data["categories"]}
    sampled = sampled or SampledImages(data, threshold)
    factors = sampled.factors.tolist()
    total = sum(factors)
    share = defaultdict(float)
    images = defaultdict(int)
    for cats, f in zip(sampled.images, factors):
        for k in cats:
            share[sampled.ids[k]] += f / total
            images[sampled.ids[k]] += 1
    appeared = sum(1 - (1 - share[c]) ** batch for c in frequency)
    out = {"images": len(sampled.images), "categories": len(frequency), "threshold": threshold, "batch": batch,
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
            "p_present": sum(1 - (1 - x) ** batch for x in s) / len(s)}
    return out


def presence_from_images(data: dict, threshold: float, batch: int,
                         sampled: SampledImages = None) -> Callable[[torch.Generator], torch.Tensor]:
    """
    A draw of one training batch: ``batch`` images drawn with replacement with probability repeat
    factor / sum of factors (the repeat-factor sampler's shares). Returns draw(generator) ->
    (batch, C) bool, image i holds category c, categories sorted by id (the loss's index order).
    ``sampled``: ``data``'s ``SampledImages`` at ``threshold`` when already built.
    """
    sampled = sampled or SampledImages(data, threshold)

    def draw(generator: torch.Generator) -> torch.Tensor:
        present = torch.zeros(batch, len(sampled.ids), dtype=torch.bool)
        picks = torch.multinomial(sampled.factors, batch, replacement=True, generator=generator).tolist()
        for row, i in enumerate(picks):
            present[row, sampled.images[i]] = True
        return present
    return draw


def shares_from_counts(image_counts: List[int], num_images: int, threshold: float) -> torch.Tensor:
    """
    Upper bounds on the sampled-image shares, (C,), from image counts alone: category c's images
    repeat max(1, sqrt(t / f_c)) times (f_c = n_c / N; an image repeats by its rarest category, so
    at least that), and the sum of all repeat factors is at least N, so s_c <= n_c r_c / N.
    """
    f = torch.tensor(image_counts, dtype=torch.float64) / num_images
    repeats = torch.clamp(torch.sqrt(threshold / f.clamp(min=1e-300)), min=1.0)
    return torch.where(f > 0, f * repeats, torch.zeros_like(f)).clamp(max=1.0)


def presence_independent(shares: torch.Tensor, batch: int) -> Callable[[torch.Generator], torch.Tensor]:
    """
    A draw of one batch from per-category image shares (C,) alone: image i holds category c with
    probability s_c, independently of everything else. draw(generator) -> (batch, C) bool.
    """
    def draw(generator: torch.Generator) -> torch.Tensor:
        return torch.rand(batch, len(shares), dtype=torch.float64, generator=generator) < shares
    return draw


def fed_loss_exposure(draw: Callable[[torch.Generator], torch.Tensor], loss: FederatedLoss, trials: int,
                      generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """
    What FedLoss trains each category on, over ``trials`` drawn batches: "in_S", P(category in S)
    per iteration, (C,); "negatives", the batch's images without the category in iterations where
    it is in S, per iteration, (C,) (sigmoid CE: every image without it). Each batch's RoI labels
    are its categories present plus background (every batch has background RoIs; its index counts
    towards |S| as in the official ``get_fed_loss_inds``); S is drawn by ``loss.sample_classes``.
    """
    loss.generator = generator
    in_set = torch.zeros(loss.num_classes, dtype=torch.float64)
    negatives = torch.zeros(loss.num_classes, dtype=torch.float64)
    background = torch.tensor([loss.num_classes])
    for _ in range(trials):
        images = draw(generator)  # (B, C)
        chosen = loss.sample_classes(torch.cat([images.any(0).nonzero().flatten(), background]))
        in_set[chosen] += 1
        negatives[chosen] += (~images[:, chosen]).sum(0).double()
    return {"in_S": in_set / trials, "negatives": negatives / trials}


def federated_loss(cat_info: Path, num_classes: int, set_size: int) -> FederatedLoss:
    """The training runs' FederatedLoss on ``cat_info`` (image counts by id), |S| = ``set_size`` (-1: scaled)."""
    cfg = get_model_cfg("centernet2_agnostic", "smoke", num_classes=num_classes)
    cfg.MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH = str(cat_info)
    cfg.MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES = set_size
    return FederatedLoss(cfg)


def group_means(values: torch.Tensor, frequency: List[str]) -> Dict[str, float]:
    """Mean of (C,) ``values`` per frequency group ("r", "c", "f"), groups present only."""
    out = {}
    for g in ("r", "c", "f"):
        idx = [k for k, f in enumerate(frequency) if f == g]
        if idx:
            out[g] = float(values[idx].mean())
    return out


def lvis_rare_share_bound(images: int) -> float:
    """
    Upper bound on the sampled-image share of an LVIS v1 category with ``images`` training images:
    its repeat factor is sqrt(t / f) with f = images / N, and the sum of all factors is at least N,
    so s <= images * sqrt(t N / images) / N = sqrt(t * images / N).
    """
    return math.sqrt(LVIS_THRESHOLD * images / LVIS_V1_TRAIN_IMAGES)


def _read_cat_info(path: Path, ap: argparse.ArgumentParser) -> List[dict]:
    """cat_info records sorted by id; one error naming the file, the record and the field otherwise."""
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        ap.error(f"{path}: not a JSON list of categories ({e})")
    if not isinstance(records, list) or not records:
        ap.error(f"{path}: expected a non-empty JSON list of categories")
    for k, c in enumerate(records):
        for field in ("id", "image_count"):
            v = c.get(field) if isinstance(c, dict) else None
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                ap.error(f"{path}: record {k}: field {field!r} must be an integer >= 0, got {v!r}")
    return sorted(records, key=lambda c: c["id"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--annotations", type=Path, default=ROOT / "data/synthetic/annotations/lvis_v1_train.json",
                    help="LVIS-format training annotations (default: the synthetic set's)")
    ap.add_argument("--cat-info", type=Path, default=None,
                    help="instead of --annotations: a cat_info.json (id, image_count, frequency per category; "
                         "the official code's lvis_v1_train_cat_info.json), categories present drawn independently")
    ap.add_argument("--num-images", type=int, default=LVIS_V1_TRAIN_IMAGES,
                    help="training images behind --cat-info's counts (default: LVIS v1 train's)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="repeat-factor threshold t (default: 100 / number of images, as a null "
                         "train.repeat_threshold on the synthetic set; with --cat-info the report's 0.001)")
    ap.add_argument("--batch", type=int, default=4,
                    help="images per loss call (train.ims_per_batch; per GPU on LVIS: the official 16 on 8 GPUs is 2)")
    ap.add_argument("--set-size", type=int, default=None,
                    help="FedLoss's |S| (default: as a null train.fed_loss_num_classes: 3/4 of the "
                         "synthetic set's categories; with --cat-info 50 scaled to the categories, as model/losses.py)")
    ap.add_argument("--trials", type=int, default=2000, help="batches drawn to measure P(in S)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the drawn batches and sets")
    args = ap.parse_args(argv)
    source = args.cat_info or args.annotations
    if not source.is_file():
        ap.error(f"{source}: not found" + ("" if args.cat_info else
                                           " (run `python -m pipeline.data.prepare` for the synthetic set)"))
    for name in ("batch", "trials", "num_images"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    generator = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        if args.cat_info:
            info = _read_cat_info(args.cat_info, ap)
            threshold = args.threshold if args.threshold is not None else LVIS_THRESHOLD
            shares = shares_from_counts([c["image_count"] for c in info], args.num_images, threshold)
            draw = presence_independent(shares, args.batch)
            cat_info = args.cat_info
        else:
            data = json.loads(args.annotations.read_text())
            info = cat_info_of(data)
            # As runs.spec.repeat_threshold chooses it when unset.
            threshold = args.threshold if args.threshold is not None else COMMON_MAX / len(data["images"])
            sampled = SampledImages(data, threshold)
            draw = presence_from_images(data, threshold, args.batch, sampled)
            cat_info = Path(tmp) / "cat_info.json"
            cat_info.write_text(json.dumps(info))
        set_size = args.set_size
        if set_size is None:
            set_size = -1 if args.cat_info else synthetic_fed_loss_num_classes(len(info))
        loss = federated_loss(cat_info, len(info), set_size)
        exposure = fed_loss_exposure(draw, loss, args.trials, generator)
    frequency = [c.get("frequency", "?") for c in info]
    p_in_S, negatives = group_means(exposure["in_S"], frequency), group_means(exposure["negatives"], frequency)
    header = f"FedLoss |S| = {loss.set_size} (background included), {args.trials} drawn batches of {args.batch}"
    columns = "P(in S)/iter  negatives per positive: sigmoid CE / FedLoss"
    if args.cat_info:
        shares = group_means(shares, frequency)
        print(f"{args.cat_info}: {len(info)} categories over {args.num_images:,} images, repeat threshold "
              f"{threshold:g}, shares at their upper bound, categories present independently; {header}")
        print(f"group  cats  images/cat  sampled share s  {columns}")
        for g in p_in_S:
            counts = [c["image_count"] for c in info if c.get("frequency") == g]
            print(f"{g:>5}  {len(counts):>4}  {min(counts):>4}-{max(counts):<5}  {shares[g]:>15.2e}  "
                  f"{p_in_S[g]:>12.4f}  {(1 - shares[g]) / shares[g]:>19.0f} / "
                  f"{negatives[g] / (args.batch * shares[g]):.1f}")
        return 0
    stats = group_stats(data, threshold, args.batch, sampled)
    print(f"{args.annotations}: {stats['images']} images, {stats['categories']} categories, repeat threshold "
          f"{threshold:g}; categories present per batch {stats['mean_categories_in_batch']:.1f}; {header}")
    print(f"group  cats  images/cat  sampled share s (min / mean / max)  P(present)/iter  {columns}")
    for g, row in stats["groups"].items():
        lo, mean, hi = row["share"]
        print(f"{g:>5}  {row['categories']:>4}  {row['images'][0]:>4}-{row['images'][1]:<5}  "
              f"{lo:.2e} / {mean:.2e} / {hi:.2e}  {row['p_present']:>15.4f}  {p_in_S[g]:>12.4f}  "
              f"{row['sigmoid_negatives_per_positive']:>19.0f} / {negatives[g] / (args.batch * mean):.1f}")
    print(f"LVIS v1 rare (1-10 of {LVIS_V1_TRAIN_IMAGES:,} images, t = {LVIS_THRESHOLD}): s <= "
          f"{lvis_rare_share_bound(1):.2e} - {lvis_rare_share_bound(10):.2e}, sigmoid neg:pos >= "
          f"{(1 - lvis_rare_share_bound(10)) / lvis_rare_share_bound(10):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
