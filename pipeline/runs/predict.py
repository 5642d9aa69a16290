"""
Run a trained run on your own images:
``python -m pipeline.runs.predict --run-dir DIR INPUT... [--out OUT] [--threshold T] [--device D]``.

``--run-dir main`` is the main experiment's run of its first seed (``results/main_runs.json``).
``INPUT`` is an image file, a folder (its images, not recursive) or a glob (``'photos/**/*.jpg'``).
For each image, ``OUT/<name>.png`` shows the detections scoring at least ``T`` drawn with detectron2's
``Visualizer`` (category names from the run's dataset), and ``OUT/detections.json`` lists them all in
the LVIS/COCO results format (``image_id``, ``category_id`` as the dataset numbers categories,
``bbox`` [x, y, w, h] in the image's pixels, ``score``, ``segmentation`` RLE for mask models), plus
``file_name``; ``image_id`` is the image's position in the input list, from 1. ``--threshold 0``
keeps every detection, as LVIS/COCO evaluation expects.

The model is the run's ``model_final.pth`` (read with ``torch.load(..., weights_only=True)``) built from
the run's ``config.yaml``, with the test-time resize the evaluation uses (and the run's test-time
augmentation, when it has one). An image that cannot be read gets one line naming it; the others still
run, and the command exits with status 1 at the end.
"""
import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.data.detection_utils import read_image
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.visualizer import Visualizer

from model import presets as _components  # noqa: F401  (registers the parts build_model looks up by name)
from pipeline.atomic import write_text
from pipeline.data import datasets
from pipeline.runs.spec import RunSpec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
WEIGHTS = "model_final.pth"
DEVICES = ("auto", "cpu", "cuda")
MIN_DRAWN_SIDE = 512
MAIN_RUNS = Path("results") / "main_runs.json"


class RunError(Exception):
    """The run directory cannot be used (missing files, unknown device); one line for the user."""


@dataclass
class Categories:
    """The run's categories in the model's (contiguous) order: names, and the dataset's ids."""

    names: List[str]
    ids: List[int]

    def metadata(self) -> Metadata:
        return Metadata(name="predict", thing_classes=list(self.names))


def main_run_dir(main_runs: Path = MAIN_RUNS) -> Optional[Path]:
    """The main experiment's trained run of its lowest seed (``results/main_runs.json``), or None."""
    seeds = json.loads(Path(main_runs).read_text()).get("seeds", {}) if Path(main_runs).is_file() else {}
    dirs = [Path(s["run_dir"]) for _, s in sorted(seeds.items(), key=lambda kv: int(kv[0][len("seed"):]))]
    return next((d for d in dirs if (d / WEIGHTS).is_file()), None)


def run_dir_arg(value: str) -> Path:
    """``--run-dir``: a run directory, or ``main`` for :func:`main_run_dir` (after ``dvc repro main``)."""
    if value != "main" or Path(value).is_dir():
        return Path(value)
    found = main_run_dir()
    if found is None:
        raise argparse.ArgumentTypeError(f"main: no trained main run in {MAIN_RUNS} (run `dvc repro main` first)")
    return found


def weights_file(run_dir: Path) -> Path:
    """``run_dir/model_final.pth``, which must be a file inside ``run_dir`` (links resolved)."""
    run_dir = Path(run_dir).resolve()
    path = (run_dir / WEIGHTS).resolve()
    if not path.is_file():
        raise RunError(f"{run_dir}: no {WEIGHTS} (the run has not finished training)")
    if run_dir not in path.parents:
        raise RunError(f"{run_dir / WEIGHTS}: points outside the run directory; refusing to load it")
    return path


def load_config(run_dir: Path, device: str = "auto") -> CfgNode:
    """The run's detectron2 config, on ``device`` (auto: the run's own device when visible, else cpu)."""
    run_dir = Path(run_dir)
    if device not in DEVICES:
        raise RunError(f"--device {device!r}; allowed: {', '.join(DEVICES)}")
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"{run_dir}: no config.yaml; is this a run directory (python -m pipeline.runs.train)?")
    cfg = CfgNode.load_cfg((run_dir / "config.yaml").read_text())
    if device == "auto":
        device = "cuda" if cfg.MODEL.DEVICE.startswith("cuda") and torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device visible")
    cfg.defrost()
    cfg.MODEL.DEVICE = device
    cfg.freeze()
    return cfg


def load_model(run_dir: Path, cfg: CfgNode) -> torch.nn.Module:
    """The run's detector with its final weights, in eval mode (no test-time augmentation)."""
    state = torch.load(weights_file(run_dir), map_location="cpu", weights_only=True)
    model = build_model(cfg)
    try:
        model.load_state_dict(state["model"] if "model" in state else state)
    except RuntimeError as e:  # names every missing / unexpected key: keep the first line and one key
        detail = " ".join(str(e).split("\n")[1:2]).strip()[:200]
        raise RunError(f"{run_dir / WEIGHTS}: does not fit the model config.yaml builds with this code "
                       f"(trained by another version?): {detail}") from None
    return model.eval()


def val_split(run_dir: Path) -> datasets.Split:
    """The run's validation split, registered with detectron2's catalogs."""
    spec = RunSpec.from_json((Path(run_dir) / "run.json").read_text())
    root = spec.data_dir if spec.data_name == "synthetic" else Path(spec.data.get("root") or datasets.default_root())
    cfg = CfgNode.load_cfg((Path(run_dir) / "config.yaml").read_text())
    try:
        splits = datasets.register(spec.data_name, root)
    except FileNotFoundError as e:
        raise RunError(f"the run's dataset ({spec.data_name}) is not on disk: {e}; "
                       f"run `python -m pipeline.data.prepare` with the run's data settings") from None
    return next(s for flavour in splits.values() for s in flavour if s.name == cfg.DATASETS.TEST[0])


def categories(run_dir: Path) -> Categories:
    """
    The category names and dataset ids of the run's dataset, in the model's class order: from
    detectron2's metadata where it has them (LVIS v1, COCO: built in), else from the validation
    annotation file (contiguous index i <-> the i-th smallest category id, as detectron2's loaders).
    """
    split = val_split(run_dir)
    meta = MetadataCatalog.get(split.name)
    names = meta.get("thing_classes")
    mapping = meta.get("thing_dataset_id_to_contiguous_id")
    if names is not None and mapping is not None:
        ids = [i for i, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
        return Categories(list(names), ids)
    if names is not None and split.kind == "lvis":  # LVIS ids are 1..C in order
        return Categories(list(names), list(range(1, len(names) + 1)))
    if not split.json_file.is_file():
        raise RunError(f"{split.json_file}: not found; category names come from the run's dataset")
    cats = sorted(json.loads(split.json_file.read_text())["categories"], key=lambda c: c["id"])
    return Categories([c["name"] for c in cats], [c["id"] for c in cats])


class Predictor:
    """
    One trained run as a function of a BGR image (H, W, 3) uint8 -> ``Instances`` in that image's
    pixels: the evaluation's test-time resize (``ResizeShortestEdge``), the model (with detectron2's
    test-time augmentation when the run's config enables it), detections rescaled to the input.
    """

    def __init__(self, run_dir: Path, device: str = "auto"):
        self.run_dir = Path(run_dir)
        self.cfg = load_config(self.run_dir, device)
        self.model = load_model(self.run_dir, self.cfg)
        self.categories = categories(self.run_dir)
        self.input_format = self.cfg.INPUT.FORMAT
        self.resize = T.ResizeShortestEdge([self.cfg.INPUT.MIN_SIZE_TEST] * 2, self.cfg.INPUT.MAX_SIZE_TEST)
        self.runner = self.model
        if self.cfg.TEST.AUG.ENABLED:
            from detectron2.modeling import GeneralizedRCNNWithTTA

            self.runner = GeneralizedRCNNWithTTA(self.cfg, self.model)

    def inputs(self, image: np.ndarray) -> Dict[str, object]:
        """detectron2's inference input for one image (H, W, 3) in ``cfg.INPUT.FORMAT``."""
        height, width = image.shape[:2]
        resized = self.resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)).astype("float32"))
        return {"image": tensor, "height": height, "width": width}

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> Instances:
        return self.runner([self.inputs(image)])[0]["instances"].to("cpu")

    def read(self, path: Path) -> np.ndarray:
        """The image at ``path`` in the model's channel order (raises on an unreadable file)."""
        return read_image(str(path), format=self.input_format)

    def rgb(self, image: np.ndarray) -> np.ndarray:
        return image[:, :, ::-1] if self.input_format == "BGR" else image


def keep_above(instances: Instances, threshold: float) -> Instances:
    return instances[instances.scores >= threshold]


def draw(rgb: np.ndarray, instances: Instances, cats: Categories) -> np.ndarray:
    """
    ``rgb`` (H, W, 3) with ``instances`` drawn by detectron2's ``Visualizer``: (H', W', 3) uint8,
    enlarged so the longer side has at least ``MIN_DRAWN_SIDE`` pixels (labels stay legible on the
    synthetic dataset's 128-192 px images).
    """
    scale = max(1.0, MIN_DRAWN_SIDE / max(rgb.shape[:2]))
    return Visualizer(rgb, cats.metadata(), scale=scale).draw_instance_predictions(instances).get_image()


def to_results(instances: Instances, image_id: int, cats: Categories, file_name: str = "") -> List[dict]:
    """LVIS/COCO results-format records of one image's detections, with the dataset's category ids."""
    records = instances_to_coco_json(instances, image_id)
    for r in records:
        r["category_id"] = cats.ids[r["category_id"]]
        if file_name:
            r["file_name"] = file_name
    return records


def expand_inputs(inputs: Sequence[str]) -> Tuple[List[Path], List[str]]:
    """Image paths from files, folders (images inside, sorted) and globs; and one error line per
    input that names nothing."""
    paths, errors = [], []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                errors.append(f"{item}: folder holds no image ({', '.join(IMAGE_SUFFIXES)})")
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(item, recursive=True) if os.path.isfile(f))
            if not found:
                errors.append(f"{item}: no such file, folder, or matching glob")
        paths.extend(f for f in found if f not in paths)
    return paths, errors


def _output_names(paths: Iterable[Path]) -> List[str]:
    """``<stem>.png`` per image; a stem seen before gets ``_2``, ``_3``... so none overwrites another."""
    seen: Dict[str, int] = {}
    names = []
    for p in paths:
        seen[p.stem] = seen.get(p.stem, 0) + 1
        names.append(f"{p.stem}.png" if seen[p.stem] == 1 else f"{p.stem}_{seen[p.stem]}.png")
    return names


def _progress(items, total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is in requirements.lock; without it, no bar
        return items, lambda line: print(line, file=sys.stderr)
    bar = tqdm(items, total=total, unit="image", disable=total < 2, file=sys.stderr)
    return bar, lambda line: bar.write(line, file=sys.stderr)


def predict(run_dir: Path, inputs: Sequence[str], out: Path, threshold: float = 0.5,
            device: str = "auto") -> Tuple[int, List[str]]:
    """Pictures and ``detections.json`` in ``out``. Returns (images done, error lines)."""
    from PIL import Image

    paths, errors = expand_inputs(inputs)
    predictor = Predictor(run_dir, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results, done = [], 0
    items, say = _progress(list(zip(paths, _output_names(paths))), len(paths))
    for k, (path, name) in enumerate(items, start=1):
        try:
            image = predictor.read(path)
        except Exception as e:  # PIL raises several types; the file is named either way
            line = f"{path}: cannot read image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            errors.append(line)
            say(f"error: {line}")
            continue
        instances = keep_above(predictor(image), threshold)
        Image.fromarray(draw(predictor.rgb(image), instances, predictor.categories)).save(out / name)
        results.extend(to_results(instances, k, predictor.categories, str(path)))
        done += 1
    write_text(out / "detections.json", json.dumps(results) + "\n")
    return done, errors


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.runs.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=run_dir_arg, required=True,
                        help="a finished run (holds model_final.pth), or `main`: the main experiment's first seed")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder, or glob")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default: %(default)s)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="keep detections scoring at least this, in pictures and JSON (default: %(default)s)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: the run's device when visible, else cpu (default)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold {args.threshold}: must lie in [0, 1]")
    try:
        done, errors = predict(args.run_dir, args.inputs, args.out, args.threshold, args.device)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    for line in errors:
        if "cannot read image" not in line:  # unreadable images were reported as they happened
            print(f"error: {line}", file=sys.stderr)
    print(f"{done} image(s) -> {args.out}/ (pictures, detections.json)"
          + (f"; {len(errors)} failed" if errors else ""))
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
