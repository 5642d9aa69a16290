"""
A synthetic detection dataset that behaves like LVIS v1 where the report's contributions matter:
a long tail of categories and federated (sparse) labels (report section 3; Gupta et al., LVIS).

Categories are shape x colour x pattern combinations, so telling them apart needs looking at the
object; several differ in one attribute only (look-alikes). Objects are drawn on textured noisy
backgrounds at COCO's small/medium/large scales, with random aspect, rotation and partial occlusion.
Boxes and polygon masks are computed from the geometry (the visible part of each object after
occlusion), not from pixels.

Long tail: the number of training images per category follows a power-law density
p(n) ~ n^-gamma on [1, n_max] (gamma = 1: log-uniform counts), taken at evenly spaced quantiles, so
every LVIS bucket — rare (1-10 images), common (11-100), frequent (>100) — is populated.

Federated labels, per image, as the LVIS protocol defines them:
  - positive categories are annotated, every instance (exhaustive);
  - ``not_exhaustive_category_ids``: annotated, but at least one instance is left unannotated;
  - ``neg_category_ids``: verified absent;
  - any other category may be present and is not annotated (an "unlabeled" object).
The COCO-schema copy labels every object of the same images exhaustively.

Everything is drawn from one ``numpy.random.Generator`` seeded by ``seed``: same parameters and
seed give byte-identical JSON and PNG files.
"""
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.ops import unary_union

from pipeline.params import SYNTHETIC_LIMITS as LIMITS

# LVIS v1 frequency buckets by number of training images (Gupta et al., LVIS, section 4).
RARE_MAX, COMMON_MAX = 10, 100
# Object sizes (sqrt of the unoccluded area, up to the shape's fill of its square): log-uniform on
# [min_object_size, LARGEST_OBJECT x the image's shorter side]; an object that does not fit shrinks
# by 3/4 steps down to SHRINK_FLOOR x min_object_size.
LARGEST_OBJECT, SHRINK_FLOOR = 0.8, 0.8

SHAPES = ("circle", "triangle", "square", "pentagon", "star", "cross", "lshape", "arrow")
COLOURS = {
    "red": (220, 40, 40), "orange": (240, 140, 30), "yellow": (235, 220, 50),
    "green": (50, 180, 60), "cyan": (40, 200, 210), "blue": (40, 70, 220),
    "purple": (150, 60, 200), "white": (240, 240, 240),
}
PATTERNS = ("solid", "stripes", "checker")


@dataclass(frozen=True)
class SyntheticSpec:
    """Generator settings; ``params.yaml`` ``data.synthetic`` documents each."""

    num_train: int = 1000
    num_val: int = 200
    num_classes: int = 40
    image_size: Tuple[int, int] = (128, 192)
    seed: int = 0
    head_fraction: float = 0.4
    tail_exponent: float = 1.0
    p_unlabeled: float = 0.25
    p_not_exhaustive: float = 0.1
    max_neg: int = 4
    max_instances: int = 3
    val_min_images: int = 8
    min_object_size: float = 16

    def validate(self) -> None:
        """Raise ValueError naming the first field outside ``LIMITS`` and what it allows."""
        for name, (kind, lo, hi) in LIMITS.items():
            value = getattr(self, name)
            if name == "image_size":
                ok = (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value)
                      and lo <= value[0] <= value[1] <= hi)
                allowed = f"[min, max] side in pixels, integers with {lo} <= min <= max <= {hi}"
            elif kind is int:
                ok = _is_int(value) and lo <= value <= hi
                allowed = f"an integer in [{lo}, {hi}]"
            else:
                ok = (_is_int(value) or isinstance(value, float)) and value == value and value <= hi and (
                    value > lo if kind == "open" else value >= lo)
                allowed = f"a number in {'(' if kind == 'open' else '['}{lo}, {hi}]"
            if not ok:
                raise ValueError(f"data.synthetic.{name}={value!r}: must be {allowed}")
        largest = LARGEST_OBJECT * self.image_size[0]
        if self.min_object_size > largest:
            raise ValueError(f"data.synthetic.min_object_size={self.min_object_size!r}: must be at most "
                             f"{largest:g}, the largest object of the smallest image "
                             f"({LARGEST_OBJECT} x data.synthetic.image_size[0]={self.image_size[0]})")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def frequency_bucket(image_count: int) -> str:
    """LVIS's r/c/f rule on the number of training images a category is annotated in."""
    if image_count <= RARE_MAX:
        return "r"
    return "c" if image_count <= COMMON_MAX else "f"


def target_image_counts(num_classes: int, n_max: float, gamma: float) -> np.ndarray:
    """
    Training images per category, descending: the (k + 0.5)/C quantiles of p(n) ~ n^-gamma on
    [1, n_max]. Returns an int array of shape (C,), each >= 1.
    """
    u = (np.arange(num_classes) + 0.5) / num_classes
    if abs(gamma - 1.0) < 1e-9:
        n = n_max ** u
    else:
        a = 1.0 - gamma
        n = (1.0 + u * (n_max**a - 1.0)) ** (1.0 / a)
    return np.maximum(1, np.round(n[::-1])).astype(int)


# --- categories ----------------------------------------------------------------------------------

def make_categories(num_classes: int, rng: np.random.Generator) -> List[dict]:
    """C distinct (shape, colour, pattern) combinations in a random order; id = 1..C."""
    combos = [(s, c, p) for s in SHAPES for c in COLOURS for p in PATTERNS]
    order = rng.permutation(len(combos))[:num_classes]
    cats = []
    for i, idx in enumerate(order):
        shape, colour, pattern = combos[idx]
        name = f"{colour}_{pattern}_{shape}"
        cats.append({"id": i + 1, "name": name, "synset": f"{name}.n.01", "synonyms": [name],
                     "def": f"a {colour} {shape} with a {pattern} fill",
                     "shape": shape, "colour": colour, "pattern": pattern})
    return cats


def _unit_shape(shape: str) -> Polygon:
    """The shape centred at 0 with radius ~1."""
    def regular(n, r=1.0, phase=math.pi / 2):
        return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n))
                for k in range(n)]

    if shape == "circle":
        pts = regular(24)
    elif shape == "triangle":
        pts = regular(3)
    elif shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "pentagon":
        pts = regular(5)
    elif shape == "star":
        outer, inner = regular(5), regular(5, 0.45, math.pi / 2 + math.pi / 5)
        pts = [p for pair in zip(outer, inner) for p in pair]
    elif shape == "cross":
        a, b = 0.3, 1.0
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
               (-b, a), (-b, -a), (-a, -a)]
    elif shape == "lshape":
        pts = [(-0.8, -1), (-0.2, -1), (-0.2, 0.4), (0.8, 0.4), (0.8, 1), (-0.8, 1)]
    elif shape == "arrow":
        pts = [(-1, -0.3), (0.2, -0.3), (0.2, -0.8), (1, 0), (0.2, 0.8), (0.2, 0.3), (-1, 0.3)]
    else:
        raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")
    return Polygon(pts)


# --- label plan ----------------------------------------------------------------------------------

def _assign_positives(num_images: int, targets: np.ndarray, rng: np.random.Generator) -> List[List[int]]:
    """For each category index k, pick targets[k] distinct images; prefer lightly loaded images so
    no image gets crowded. Returns, per image, the category indices annotated in it."""
    load = np.zeros(num_images)
    per_image: List[List[int]] = [[] for _ in range(num_images)]
    for k in np.argsort(-targets, kind="stable"):
        weights = 1.0 / (1.0 + load) ** 2
        chosen = rng.choice(num_images, size=min(int(targets[k]), num_images), replace=False,
                            p=weights / weights.sum())
        for i in chosen:
            per_image[i].append(int(k))
            load[i] += 1
    weights = targets / targets.sum()
    for cats in per_image:  # every image has at least one annotated category
        if not cats:
            cats.append(int(rng.choice(len(targets), p=weights)))
    return per_image


def _plan_image(positives: List[int], targets: np.ndarray, spec: SyntheticSpec,
                rng: np.random.Generator) -> dict:
    """Objects to draw in one image and its federated labels (category indices, 0-based)."""
    num_classes = len(targets)
    objects = []  # (category index, annotated?)
    not_exhaustive = []
    for k in positives:
        n = min(spec.max_instances, int(rng.geometric(0.6)))
        if rng.random() < spec.p_not_exhaustive:
            n = max(n, 2)
            n_annotated = int(rng.integers(1, n))  # at least one annotated, one not
            not_exhaustive.append(k)
        else:
            n_annotated = n
        objects += [(k, i < n_annotated) for i in range(n)]
    present = set(positives)
    # An image already positive for every category (a small set with val_min_images) has none left
    # to draw unlabelled; the draw is still made, so other images' random streams do not change.
    absent_now = np.array([k for k in range(num_classes) if k not in present], dtype=int)
    if rng.random() < spec.p_unlabeled and absent_now.size:
        w = targets[absent_now] / targets[absent_now].sum()
        k = int(rng.choice(absent_now, p=w))
        present.add(k)
        objects += [(k, False)] * int(rng.integers(1, 3))
    absent = [k for k in range(num_classes) if k not in present]
    n_neg = int(rng.integers(0, spec.max_neg + 1)) if spec.max_neg else 0
    neg = sorted(int(k) for k in rng.choice(absent, size=min(n_neg, len(absent)), replace=False))
    order = rng.permutation(len(objects))
    return {"objects": [objects[i] for i in order], "neg": neg, "not_exhaustive": sorted(not_exhaustive)}


# --- geometry and rendering ----------------------------------------------------------------------

def _sample_polygon(shape: str, w: int, h: int, size: float, rng: np.random.Generator) -> Polygon:
    aspect = math.exp(rng.uniform(-0.4, 0.4))
    poly = affinity.scale(_unit_shape(shape), size / 2 * math.sqrt(aspect), size / 2 / math.sqrt(aspect),
                          origin=(0, 0))
    poly = affinity.rotate(poly, rng.uniform(0, 360), origin=(0, 0))
    x0, y0, x1, y1 = poly.bounds
    cx = rng.uniform(-x0, w - x1) if x1 - x0 < w else w / 2
    cy = rng.uniform(-y0, h - y1) if y1 - y0 < h else h / 2
    return affinity.translate(poly, cx, cy)


def _place(shape: str, w: int, h: int, placed: List[dict], rng: np.random.Generator,
           min_size: float, min_visible: float = 0.5, tries: int = 30):
    """A polygon on top of ``placed`` that leaves every object >= min_visible visible, without
    holes (COCO polygons cannot express them). Shrinks the object when it does not fit, to no less
    than ``SHRINK_FLOOR * min_size``."""
    frame = box(0, 0, w, h)
    # Size log-uniform from small to large (COCO: small < 32^2 <= medium < 96^2 <= large area).
    size = math.exp(rng.uniform(math.log(min_size), math.log(LARGEST_OBJECT * min(w, h))))
    for attempt in range(tries):
        if attempt and attempt % 6 == 0:
            size = max(SHRINK_FLOOR * min_size, size * 0.75)
        poly = _sample_polygon(shape, w, h, size, rng)
        if not frame.contains(poly):
            continue
        ok = True
        for obj in placed:
            rest = obj["visible"].difference(poly)
            if rest.area < min_visible * obj["full"].area or _has_holes(rest):
                ok = False
                break
        if ok:
            return poly
    return None


def _has_holes(geom) -> bool:
    parts = geom.geoms if isinstance(geom, MultiPolygon) else [geom]
    return any(len(p.interiors) for p in parts if isinstance(p, Polygon))


def _pattern_fill(w: int, h: int, colour, pattern: str, period: float, angle: float,
                  rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float image of the category's fill."""
    base = np.array(colour, dtype=np.float32) * rng.uniform(0.85, 1.1)
    dark = base * 0.35
    if pattern == "solid":
        return np.broadcast_to(base, (h, w, 3)).copy()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    if pattern == "stripes":
        on = (np.floor(u / period) % 2) == 0
    else:  # checker
        on = ((np.floor(u / period) + np.floor(v / period)) % 2) == 0
    return np.where(on[..., None], base, dark)


def _background(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency coloured noise plus a gradient: (H, W, 3) float in [0, 255]."""
    cells = rng.uniform(30, 170, size=(max(2, h // 24), max(2, w // 24), 3)).astype(np.uint8)
    low = np.asarray(Image.fromarray(cells).resize((w, h), Image.BICUBIC), dtype=np.float32)
    gx, gy = rng.uniform(-40, 40, size=2)
    ramp = (np.linspace(-0.5, 0.5, w)[None, :] * gx + np.linspace(-0.5, 0.5, h)[:, None] * gy)
    return low + ramp[..., None]


def _render(w: int, h: int, drawn: List[dict], cats: List[dict], rng: np.random.Generator) -> Image.Image:
    canvas = _background(w, h, rng)
    for obj in drawn:  # bottom to top: later objects occlude earlier ones
        cat = cats[obj["cat"]]
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).polygon([tuple(p) for p in obj["full"].exterior.coords], fill=255)
        m = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
        period = max(2.0, math.sqrt(obj["full"].area) / 5)
        fill = _pattern_fill(w, h, COLOURS[cat["colour"]], cat["pattern"], period,
                             rng.uniform(0, math.pi), rng)
        canvas = canvas * (1 - m) + fill * m
    canvas += rng.normal(0, 10, size=canvas.shape)
    return Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))


def _segmentation(geom) -> Tuple[List[List[float]], List[float], float]:
    """COCO polygons, [x, y, w, h] box and area of the visible geometry (pieces < 1 px^2 dropped)."""
    parts = geom.geoms if isinstance(geom, MultiPolygon) else [geom]
    parts = [p for p in parts if isinstance(p, Polygon) and p.area >= 1.0]
    polys = [[round(float(c), 2) for xy in list(p.exterior.coords)[:-1] for c in xy] for p in parts]
    x0, y0, x1, y1 = unary_union(parts).bounds
    bbox = [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]
    return polys, bbox, round(float(sum(p.area for p in parts)), 2)


# --- the dataset ---------------------------------------------------------------------------------

def _generate_split(split: str, num_images: int, first_image_id: int, first_ann_id: int,
                    targets: np.ndarray, cats: List[dict], spec: SyntheticSpec,
                    rng: np.random.Generator, out: Path):
    positives = _assign_positives(num_images, targets, rng)
    images, lvis_anns, coco_anns = [], [], []
    ann_id = first_ann_id
    lo, hi = spec.image_size
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        image_id = first_image_id + i
        w, h = (int(x) for x in rng.integers(lo, hi + 1, size=2))
        plan = _plan_image(positives[i], targets, spec, rng)
        placed = []
        for k, annotated in plan["objects"]:
            poly = _place(cats[k]["shape"], w, h, placed, rng, spec.min_object_size)
            if poly is None:
                continue
            for obj in placed:
                obj["visible"] = obj["visible"].difference(poly)
            placed.append({"cat": k, "annotated": annotated, "full": poly, "visible": poly})
        # Labels follow what was actually drawn (a placement can fail in a crowded image).
        annotated_cats = {o["cat"] for o in placed if o["annotated"]}
        not_exhaustive = [k for k in plan["not_exhaustive"]
                          if k in annotated_cats and any(o["cat"] == k and not o["annotated"] for o in placed)]
        file_name = f"{image_id:07d}.png"
        _render(w, h, placed, cats, rng).save(out / "images" / split / file_name, optimize=False)
        images.append({
            "id": image_id, "width": w, "height": h,
            "file_name": f"{split}/{file_name}",
            "coco_url": f"images/{split}/{file_name}",
            "neg_category_ids": [k + 1 for k in plan["neg"]],
            "not_exhaustive_category_ids": [k + 1 for k in not_exhaustive],
        })
        for obj in placed:
            polys, bbox, area = _segmentation(obj["visible"])
            ann = {"id": ann_id, "image_id": image_id, "category_id": obj["cat"] + 1,
                   "bbox": bbox, "area": area, "segmentation": polys}
            ann_id += 1
            coco_anns.append({**ann, "iscrowd": 0})
            if obj["annotated"]:
                lvis_anns.append(ann)
    return images, lvis_anns, coco_anns, ann_id


def _category_stats(cats: List[dict], anns: List[dict]) -> Dict[int, Tuple[int, int]]:
    images: Dict[int, set] = {c["id"]: set() for c in cats}
    instances: Dict[int, int] = {c["id"]: 0 for c in cats}
    for a in anns:
        images[a["category_id"]].add(a["image_id"])
        instances[a["category_id"]] += 1
    return {cid: (len(images[cid]), instances[cid]) for cid in images}


def _dump(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")))


def generate(spec: SyntheticSpec, out: Path) -> dict:
    """
    Write the dataset under ``out`` (which must exist and be empty):
    ``annotations/lvis_v1_{train,val}.json``, ``annotations/coco_{train,val}.json``,
    ``images/{train,val}/*.png`` and ``cat_info.json``. Returns a summary dict.
    """
    spec.validate()
    rng = np.random.default_rng(spec.seed)
    cats = make_categories(spec.num_classes, rng)
    head = max(2.0, spec.head_fraction * spec.num_train)
    targets = target_image_counts(spec.num_classes, head, spec.tail_exponent)
    rng.shuffle(targets)  # frequency is independent of the category's looks
    # Validation images follow the training frequencies, but every category is positive in at least
    # val_min_images of them: at the training proportions the 16 rare categories of the default set
    # had 28 validation instances (10 categories a single box), too few for AP_r to tell two losses
    # apart across seeds. Drawn after the training split, so the training images do not change.
    val_targets = np.maximum(spec.val_min_images, np.round(targets * spec.num_val / spec.num_train)).astype(int)
    val_targets = np.minimum(val_targets, spec.num_val)

    train = _generate_split("train", spec.num_train, 1, 1, targets, cats, spec, rng, out)
    val = _generate_split("val", spec.num_val, spec.num_train + 1, train[3], val_targets, cats, spec,
                          rng, out)

    stats = _category_stats(cats, train[1])
    lvis_cats = []
    for c in cats:
        image_count, instance_count = stats[c["id"]]
        lvis_cats.append({"id": c["id"], "name": c["name"], "synset": c["synset"],
                          "synonyms": c["synonyms"], "def": c["def"],
                          "frequency": frequency_bucket(image_count),
                          "image_count": image_count, "instance_count": instance_count})
    coco_cats = [{"id": c["id"], "name": c["name"], "supercategory": c["shape"]} for c in cats]
    info = {"description": "centernet2-pipeline synthetic federated long-tailed dataset",
            "generator": asdict(spec)}
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, (images, lvis_anns, coco_anns, _) in (("train", train), ("val", val)):
        _dump({"info": info, "licenses": [], "images": images, "annotations": lvis_anns,
               "categories": lvis_cats}, out / "annotations" / f"lvis_v1_{split}.json")
        coco_images = [{k: im[k] for k in ("id", "width", "height", "file_name")} for im in images]
        _dump({"info": info, "licenses": [], "images": coco_images, "annotations": coco_anns,
               "categories": coco_cats}, out / "annotations" / f"coco_{split}.json")
    cat_info = [{k: c[k] for k in ("id", "name", "image_count", "instance_count", "frequency")}
                for c in lvis_cats]
    _dump(cat_info, out / "cat_info.json")
    buckets = {b: sum(c["frequency"] == b for c in lvis_cats) for b in "rcf"}
    return {"num_categories": len(cats), "frequency_buckets": buckets,
            "train_images": spec.num_train, "val_images": spec.num_val,
            "train_annotations": len(train[1]), "train_objects": len(train[2]),
            "val_annotations": len(val[1]), "val_objects": len(val[2])}


def category_names(cats: Sequence[dict]) -> List[str]:
    return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]
