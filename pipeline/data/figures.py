"""Figures of a prepared dataset: sample images with labels, and the category-frequency histogram."""
import json
from pathlib import Path
from typing import Callable, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Polygon as PolygonPatch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.atomic import save_figure  # noqa: E402
from pipeline.data.synthetic import frequency_bucket  # noqa: E402

BUCKET_COLOURS = {"r": "#d62728", "c": "#ff7f0e", "f": "#1f77b4"}
BUCKET_NAMES = {"r": "rare (1-10 images)", "c": "common (11-100)", "f": "frequent (>100)"}


def sample_grid(labels_json: Path, exhaustive_json: Optional[Path],
                image_file: Callable[[dict], str], path: Path, rows: int = 3, cols: int = 4) -> None:
    """
    Sample training images. Filled masks and solid boxes: annotated instances, coloured by the
    category's frequency bucket. Dashed white boxes: objects present but not annotated, known from
    ``exhaustive_json`` (the synthetic set's COCO copy) when given. Each title lists the image's
    negative (verified absent) and not-exhaustive category ids.
    """
    lvis = json.loads(labels_json.read_text())
    everything = json.loads(exhaustive_json.read_text()) if exhaustive_json else lvis
    names = {c["id"]: c["name"] for c in lvis["categories"]}
    counts = {c["id"]: 0 for c in lvis["categories"]}
    for a in lvis["annotations"]:
        counts[a["category_id"]] += 1
    freq = {c["id"]: c.get("frequency") or frequency_bucket(counts[c["id"]]) for c in lvis["categories"]}
    annotated = {a["id"] for a in lvis["annotations"]}
    by_image = {}
    for a in everything["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    # Prefer images that show the federated labels (an unannotated object), then the rest.
    images = sorted(lvis["images"], key=lambda im: (
        not any(a["id"] not in annotated for a in by_image.get(im["id"], [])), im["id"]))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows))
    for ax, im in zip(axes.flat, images):
        ax.imshow(Image.open(image_file(im)))
        for a in by_image.get(im["id"], []):
            x, y, w, h = a["bbox"]
            if a["id"] in annotated:
                colour = BUCKET_COLOURS[freq[a["category_id"]]]
                for poly in a["segmentation"]:
                    ax.add_patch(PolygonPatch(list(zip(poly[::2], poly[1::2])), closed=True,
                                              facecolor=colour, alpha=0.35, edgecolor=colour))
                ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=1.2))
                ax.text(x, y, names[a["category_id"]].replace("_", " "), fontsize=5,
                        color="white", va="bottom", bbox={"facecolor": colour, "pad": 0.5, "lw": 0})
            else:
                ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="white",
                                       linestyle="--", linewidth=1.0))
        ax.set_title(f"image {im['id']}  neg={im.get('neg_category_ids', '-')}  "
                     f"not-exh.={im.get('not_exhaustive_category_ids', '-')}", fontsize=6)
        ax.axis("off")
    handles = [Rectangle((0, 0), 1, 1, color=c, alpha=0.6) for c in BUCKET_COLOURS.values()]
    handles.append(Rectangle((0, 0), 1, 1, fill=False, edgecolor="black", linestyle="--"))
    fig.legend(handles, [*BUCKET_NAMES.values(), "present, not annotated"], loc="lower center",
               ncol=4, fontsize=8)
    fig.suptitle("Training images: annotated instances by frequency bucket, "
                 "unannotated objects dashed", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    save_figure(fig, path)


def frequency_histogram(cat_info_json: Path, path: Path) -> None:
    """Training images per category (from ``cat_info.json``), sorted, on a log scale, coloured by
    LVIS r/c/f bucket."""
    cats = sorted(json.loads(cat_info_json.read_text()), key=lambda c: -c["image_count"])
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.bar(range(len(cats)), [max(c["image_count"], 0.8) for c in cats],
           color=[BUCKET_COLOURS[c["frequency"]] for c in cats])
    ax.set_yscale("log")
    for edge in (10.5, 100.5):
        ax.axhline(edge, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("category (sorted by training image count)")
    ax.set_ylabel("training images (log)")
    counts = {b: sum(c["frequency"] == b for c in cats) for b in BUCKET_COLOURS}
    ax.legend(handles=[Rectangle((0, 0), 1, 1, color=c) for c in BUCKET_COLOURS.values()],
              labels=[f"{BUCKET_NAMES[b]}: {counts[b]} categories" for b in BUCKET_COLOURS],
              fontsize=8)
    ax.set_title(f"Long tail: {len(cats)} categories, r/c/f by LVIS's rule on training image counts",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
