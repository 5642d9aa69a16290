"""
The pretrain stage: ``python -m pipeline.runs.pretrain [--params FILE]``.

The report's detectors start from an ImageNet-pretrained ResNet (report section 4; the official
configs' ``MODEL.WEIGHTS``). Without ImageNet, the synthetic scale starts from a backbone this stage
trains once and every run shares: the scale's ResNet (``model/presets.py``), classifying single
synthetic objects into (shape, colour, pattern) combinations that are **not** categories of the
benchmark dataset. Like ImageNet for LVIS, it teaches what edges, colours, fills and outlines look
like, and nothing about the test categories themselves: every benchmark category is left out of its
label set (they are read from the prepared dataset's ``cat_info.json``).

Images are square, ``pretrain.image_size`` pixels, one object each on the benchmark's backgrounds,
rendered in memory (no files) from ``pretrain.seed``; ``pretrain.num_images`` of them, plus a tenth
as many held out to measure accuracy. The output, ``data/pretrain/``:

- ``backbone.pth``: ``{"model": {"backbone.bottom_up.<name>": tensor}}``, the ResNet only, loadable
  as ``train.weights`` by detectron2's checkpointer (the synthetic scale's default);
- ``pretrain.json``: the settings, held-out accuracy, seconds and the backbone's sha256.
"""
import argparse
import hashlib
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from pipeline import params as P
from pipeline.atomic import write_text
from pipeline.runs.spec import PRETRAINED_SCALES

OUTPUT_DIR = Path("data/pretrain")
WEIGHTS_FILE = "backbone.pth"
INFO_FILE = "pretrain.json"
# Which scale's ResNet is pretrained: the one whose runs start from this stage's output.
SCALE = PRETRAINED_SCALES[0]
# params.yaml's pretrain section, documented there.
DEFAULTS = {"num_images": 20000, "image_size": 64, "max_iter": 300, "batch_size": 128, "base_lr": 0.1,
            "weight_decay": 0.0001, "seed": 0}


def held_out_combos(benchmark_names: Sequence[str]) -> List[Tuple[str, str, str]]:
    """Every (shape, colour, pattern) combination whose ``colour_pattern_shape`` name is not a
    benchmark category, in a fixed order."""
    from pipeline.data.synthetic import COLOURS, PATTERNS, SHAPES

    taken = set(benchmark_names)
    return [(s, c, p) for s in SHAPES for c in COLOURS for p in PATTERNS if f"{c}_{p}_{s}" not in taken]


def render(combo: Tuple[str, str, str], size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``size`` x ``size`` RGB image (uint8, (H, W, 3)) of a single object of ``combo`` on a
    benchmark-style background, the object's side log-uniform in [size/5, 0.9 size]."""
    from PIL import Image, ImageDraw

    from pipeline.data.synthetic import COLOURS, _background, _pattern_fill, _sample_polygon

    shape, colour, pattern = combo
    canvas = _background(size, size, rng)
    side = math.exp(rng.uniform(math.log(size / 5), math.log(0.9 * size)))
    poly = _sample_polygon(shape, size, size, side, rng)
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in poly.exterior.coords], fill=255)
    m = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    fill = _pattern_fill(size, size, COLOURS[colour], pattern, max(2.0, math.sqrt(poly.area) / 5),
                         rng.uniform(0, math.pi), rng)
    canvas = canvas * (1 - m) + fill * m + rng.normal(0, 10, size=canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _render_chunk(args) -> Tuple[np.ndarray, np.ndarray]:
    combos, size, seed, start, count = args
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    for i in range(count):
        rng = np.random.default_rng([seed, start + i])  # image i is the same whatever the chunking
        labels[i] = rng.integers(len(combos))
        images[i] = render(combos[labels[i]], size, rng)
    return images, labels


def make_images(combos, size: int, count: int, seed: int, workers: int) -> Tuple[np.ndarray, np.ndarray]:
    """``count`` images (N, H, W, 3) uint8 and their labels (N,) int64; image i depends on (seed, i) only."""
    chunk = max(1, math.ceil(count / (4 * workers)))
    jobs = [(combos, size, seed, s, min(chunk, count - s)) for s in range(0, count, chunk)]
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_render_chunk, jobs))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def backbone_cfg(scale: str = SCALE):
    """The detectron2 config whose ``MODEL.RESNETS`` the synthetic scale's detectors share."""
    from model import get_model_cfg

    return get_model_cfg("centernet2_agnostic", scale)


def to_input(images_rgb_uint8, cfg):
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float, normalised as the detectors' inputs
    (``INPUT.FORMAT`` channel order, ``MODEL.PIXEL_MEAN``/``PIXEL_STD``)."""
    import torch

    x = torch.as_tensor(images_rgb_uint8).permute(0, 3, 1, 2).float()
    if cfg.INPUT.FORMAT == "BGR":
        x = x.flip(1)
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def train(settings: Dict[str, Any], combos, out: Path, scale: str = SCALE, log=print) -> Dict[str, Any]:
    """Train the classifier; write ``backbone.pth`` and return the summary for ``pretrain.json``."""
    import torch
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import build_resnet_backbone

    from pipeline.runs.train import write_checkpoint_file

    torch.manual_seed(settings["seed"])
    workers = max(1, torch.get_num_threads())
    start = time.time()
    n_val = max(1, settings["num_images"] // 10)
    images, labels = make_images(combos, settings["image_size"], settings["num_images"] + n_val,
                                 settings["seed"], workers)
    log(f"pretrain: rendered {len(images)} images of {len(combos)} held-out combinations "
        f"in {time.time() - start:.1f} s")
    cfg = backbone_cfg(scale).clone()
    cfg.defrost()
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    # The stand-in for ImageNet training: every layer learns, with batch statistics. The detectors
    # then freeze the stem and res2 (the scale's FREEZE_AT 2, their BN made FrozenBN) as the report's
    # do with ImageNet weights; pretraining with that setting would leave the stem and res2 at their
    # random initialisation. NORM is the synthetic scale's already; set here so it holds at any scale.
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.NORM = "BN"
    net = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    head = torch.nn.Linear(net.output_shape()["res5"].channels, len(combos))
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=settings["base_lr"], momentum=0.9, weight_decay=settings["weight_decay"],
                          nesterov=True)
    iters, batch = settings["max_iter"], settings["batch_size"]
    warmup = max(1, iters // 20)
    # Linear warm-up, then cosine decay to 0.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(i, iters) / iters)))
    gen = torch.Generator().manual_seed(settings["seed"])
    train_x, train_y = images[:-n_val], torch.as_tensor(labels[:-n_val])
    net.train()
    for it in range(iters):
        idx = torch.randint(len(train_x), (batch,), generator=gen)
        x = to_input(train_x[idx.numpy()], cfg)
        flip = torch.rand(batch, generator=gen) < 0.5
        x[flip] = x[flip].flip(-1)
        logits = head(net(x)["res5"].mean((2, 3)))
        loss = torch.nn.functional.cross_entropy(logits, train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"pretrain: loss is {loss.item()} at iteration {it}")
        if (it + 1) % max(1, iters // 10) == 0 or it + 1 == iters:
            log(f"pretrain: iteration {it + 1}/{iters} loss {loss.item():.3f} lr {sched.get_last_lr()[0]:.4f} "
                f"({time.time() - start:.0f} s)")
    net.eval()
    correct = 0
    with torch.no_grad():
        val_x, val_y = images[-n_val:], torch.as_tensor(labels[-n_val:])
        for s in range(0, n_val, 256):
            logits = head(net(to_input(val_x[s:s + 256], cfg))["res5"].mean((2, 3)))
            correct += (logits.argmax(1) == val_y[s:s + 256]).sum().item()
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    write_checkpoint_file(str(weights), {"model": {f"backbone.bottom_up.{k}": v for k, v in net.state_dict().items()}})
    return {"settings": settings, "classes": len(combos), "held_out_accuracy": round(correct / n_val, 4),
            "val_images": n_val, "seconds": round(time.time() - start, 1),
            "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}


def stage_settings(params: Dict[str, Any]) -> Dict[str, Any]:
    """What the stage reads from checked params (dvc.yaml lists the same keys): its own section
    (defaults filled in), the scale, and where the benchmark's categories are."""
    data = params.get("data") or {}
    return {"pretrain": dict(DEFAULTS, **(params.get("pretrain") or {})), "scale": params.get("scale", "synthetic"),
            "data": {"name": data.get("name", "synthetic"), "root": data.get("root")}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.runs.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=P.PARAMS_FILE, help="params file (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=OUTPUT_DIR, help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)
    from pipeline.runs.train import DiskFull

    try:
        params = P.load(args.params)
        P.check(params, args.params)
        stage = stage_settings(params)
        settings, scale, data = stage["pretrain"], stage["scale"], stage["data"]
        if scale not in PRETRAINED_SCALES:
            # Nothing to train: the scale's runs start from scratch or from ImageNet. The stage still
            # writes its output, so the DAG is the same at every scale.
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / WEIGHTS_FILE).unlink(missing_ok=True)
            write_text(args.out / INFO_FILE, json.dumps({"scale": scale, "trained": False}, indent=2) + "\n")
            print(f"pretrain: scale {scale} does not start from the pretrained backbone; nothing to train")
            return
        names = []
        if data["name"] == "synthetic":
            cat_info = Path(data.get("root") or "data/synthetic") / "cat_info.json"
            if not cat_info.is_file():
                raise P.ParamError(f"{cat_info} not found: run `python -m pipeline.data.prepare` first")
            names = [c["name"] for c in json.loads(cat_info.read_text())]
        info = train(settings, held_out_combos(names), args.out, scale)
    except (P.ParamError, DiskFull) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    write_text(args.out / INFO_FILE, json.dumps({"scale": scale, "trained": True, **info}, indent=2) + "\n")
    print(f"pretrain: held-out accuracy {info['held_out_accuracy']:.3f} over {info['classes']} classes "
          f"in {info['seconds']:.0f} s -> {args.out / WEIGHTS_FILE}")


if __name__ == "__main__":
    main()
