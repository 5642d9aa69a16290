"""
Evaluate one trained run: ``python -m pipeline.runs.evaluate --run-dir DIR``.

Runs the final checkpoint over the validation split with detectron2's ``LVISEvaluator`` (the official
``lvis`` API: AP, AP50, AP75, APs/m/l, APr/c/f; box, and mask when the model has a mask head) or
``COCOEvaluator`` (pycocotools) for COCO-labelled data, and times inference per image (batch 1,
warm-up images excluded, median over the split; device and threads recorded: Table 1's runtime).
Writes ``DIR/eval/<evaluation key>/metrics.json`` (one directory per evaluation setting: image subset,
warm-up, TTA — :meth:`RunSpec.eval_key`; APs in percent, as detectron2 reports them; ``null`` where the split
has no category of a bucket; the ids of the images evaluated) and logs the same to the run's MLflow run.

``max_images: N`` evaluates the first N images of the split (detectron2's loading order) as a
dataset of their own: their annotations are written to ``subset_<split>_first<N>.json`` in the
evaluation's directory and registered with detectron2's catalogs, so the evaluator and the official
API score exactly the images that were run — not the whole split with the rest counted as misses.

Only the run directory's own ``model_final.pth`` is loaded, with ``torch.load(..., weights_only=True)``;
missing or damaged final weights are one line naming the file. Evaluating again logs to MLflow only
the values it does not already hold (same metric, step and value): no duplicate entries.
"""
import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.data.datasets import load_lvis_json, register_coco_instances
from detectron2.evaluation import COCOEvaluator, LVISEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from torch import nn

from model.presets import set_test_limits
from model.switches import apply_switches
from pipeline.atomic import write_text
from pipeline.data import datasets
from pipeline.data.annotations import only_images
from pipeline.data.prepare import check_prepared
from pipeline.runs.progress import PROGRESS_FILE
from pipeline.runs.spec import DONE_FILE, METRICS_FILE, RunSpec, eval_dir
from pipeline.runs.tracking import RUN_ID_FILE, Tracker
from pipeline.runs.train import AtomicCheckpointer, CheckpointError, dataset_checksum, final_weights

logger = logging.getLogger("pipeline.runs.evaluate")


class TimedModel(nn.Module):
    """Wraps a model to record the wall time of every forward call (CUDA-synchronised), and the
    images done so far in ``progress`` (``{"evaluating": i, "of": N}``: what a waiting stage shows)."""

    def __init__(self, inner: nn.Module, progress: Optional[Path] = None, total: int = 0):
        super().__init__()
        self.inner = inner
        self.times_ms = []
        self.progress, self.total = progress, total

    def forward(self, inputs):
        cuda = any(p.is_cuda for p in self.inner.parameters())
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.inner(inputs)
        if cuda:
            torch.cuda.synchronize()
        self.times_ms.append((time.perf_counter() - start) * 1000)
        if self.progress is not None:
            write_text(self.progress, json.dumps({"evaluating": len(self.times_ms), "of": self.total}))
        return out


def _clean(value):
    """NaN and the lvis API's -1 (no category of that kind in the split) become None."""
    if value is None or (isinstance(value, float) and (math.isnan(value) or value < 0)):
        return None
    return float(value)


def subset(split: datasets.Split, max_images: Optional[int], out_dir: Path) -> Tuple[str, List[int]]:
    """
    The dataset to evaluate on and its image ids, in loading order: ``split`` itself, or — with
    ``max_images`` below its size — its first ``max_images`` images, registered as a dataset of
    their own (annotation json in ``out_dir``, ``split``'s metadata) so the evaluator's ground truth
    is those images only.
    """
    records = DatasetCatalog.get(split.name)
    if not max_images or max_images >= len(records):
        return split.name, [r["image_id"] for r in records]
    ids = [r["image_id"] for r in records[:max_images]]
    part = only_images(json.loads(split.json_file.read_text()), ids)
    name = f"{split.name}_first{max_images}"
    json_file = out_dir / f"subset_{name}.json"
    write_text(json_file, json.dumps(part))
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    # split's metadata (class names, id mapping) for the subset, with the subset's annotation file.
    meta = {k: v for k, v in MetadataCatalog.get(split.name).as_dict().items()
            if k not in ("name", "json_file", "image_root", "evaluator_type")}
    if split.kind == "lvis":
        DatasetCatalog.register(name, lambda: load_lvis_json(str(json_file), str(split.image_root) + os.sep))
        MetadataCatalog.get(name).set(json_file=str(json_file), image_root=str(split.image_root),
                                      evaluator_type="lvis", **meta)
    else:
        register_coco_instances(name, meta, str(json_file), str(split.image_root))
    return name, ids


def evaluate(run_dir: Path, spec: Optional[RunSpec] = None, model: Optional[nn.Module] = None) -> dict:
    """
    Evaluate the weights trained in ``run_dir`` with the evaluation settings of ``spec`` (default:
    the run's own, ``run.json``): ``eval.max_images`` first validation images (null: all), timing
    after ``eval.warmup`` images, evaluation-only switches (TTA) applied to the trained config.
    Writes ``metrics.json`` and the evaluator's files to :func:`eval_dir`. ``model`` stands in for
    the final checkpoint when given (a module mapping detectron2's inference inputs to
    ``{"instances": Instances}``: known predictions, in tests).
    """
    run_dir = Path(run_dir)
    if not (run_dir / DONE_FILE).is_file():
        raise FileNotFoundError(f"{run_dir}: no finished training ({DONE_FILE}); run pipeline.runs.train first")
    weights = final_weights(run_dir) if model is None else None  # before any output: a missing file is one line
    trained = RunSpec.from_json((run_dir / "run.json").read_text())
    spec = spec or trained
    if spec.identity() != trained.identity():
        raise ValueError(f"{run_dir}: trained with other settings than the evaluation asks for (see run.json)")
    check_prepared(spec.data_dir, spec.data)  # scored against the validation set the run names
    out_dir = eval_dir(run_dir, spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    setup_logger(str(out_dir / "log.txt"))
    splits = datasets.register(spec.data_name, spec.data_dir if spec.data_name == "synthetic"
                               else Path(spec.data.get("root") or datasets.default_root()))
    cfg = CfgNode.load_cfg((run_dir / "config.yaml").read_text())  # as trained, plus the evaluation's switches
    cfg.defrost()
    apply_switches(cfg, spec.eval_switches)
    set_test_limits(cfg, spec.eval.get("score_thresh"), spec.eval.get("detections_per_image"))
    cfg.freeze()
    write_text(out_dir / "config.yaml", cfg.dump())
    write_text(out_dir / "eval.json", json.dumps({**spec.eval_identity(), "row": spec.row, "study": spec.study},
                                                 indent=2, sort_keys=True) + "\n")
    split = next(s for flavour in splits.values() for s in flavour if s.name == cfg.DATASETS.TEST[0])
    dataset, image_ids = subset(split, spec.eval.get("max_images"), out_dir)
    iteration = None
    if model is None:
        model = build_model(cfg)
        iteration = int(AtomicCheckpointer(model).load(str(weights)).get("iteration", cfg.SOLVER.MAX_ITER - 1))
        model.eval()
        if cfg.TEST.AUG.ENABLED:  # Table 3 "+ test-aug": detectron2's TTA for R-CNNs, boxes and masks merged
            from detectron2.modeling import GeneralizedRCNNWithTTA

            model = GeneralizedRCNNWithTTA(cfg, model)
    timed = TimedModel(model, out_dir / PROGRESS_FILE, len(image_ids))
    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    if split.kind == "lvis":
        evaluator = LVISEvaluator(dataset, tasks=tasks, distributed=False, output_dir=str(out_dir))
    else:  # the fast COCOeval needs detectron2's compiled extension: use pycocotools
        evaluator = COCOEvaluator(dataset, tasks=tasks, distributed=False, output_dir=str(out_dir),
                                  use_fast_impl=False)
    with torch.no_grad():
        results = inference_on_dataset(timed, build_detection_test_loader(cfg, dataset), evaluator)
    metrics = {task: {k: _clean(v) for k, v in results.get(task, {}).items() if "-" not in k} for task in tasks}
    for task in tasks:  # a model with no detections at all has AP 0, not NaN
        if task in results and all(v is None for v in metrics[task].values()):
            metrics[task] = {k: 0.0 for k in metrics[task]}
    warmup = spec.eval.get("warmup", 5)
    timed_ms = timed.times_ms[warmup:] or timed.times_ms
    record = {
        **metrics,
        "iteration": iteration,
        "dataset": {"name": spec.data_name, "annotations": spec.annotations, "split": split.name,
                    "evaluated_as": dataset, "checksum": dataset_checksum(spec)},
        "images": {"count": len(image_ids), "ids": image_ids},
        "eval": {**spec.eval_identity(), "key": spec.eval_key()},
        "runtime": {"ms_per_image": round(statistics.median(timed_ms), 2), "images": len(timed_ms),
                    "warmup": min(warmup, len(timed.times_ms)), "batch": 1, "device": cfg.MODEL.DEVICE,
                    "device_name": torch.cuda.get_device_name(0) if cfg.MODEL.DEVICE == "cuda" else "cpu",
                    "threads": torch.get_num_threads()},
        "detector": spec.detector, "loss": spec.loss, "seed": spec.seed, "scale": spec.scale,
    }
    write_text(out_dir / METRICS_FILE, json.dumps(record, indent=2) + "\n")
    if (run_dir / RUN_ID_FILE).is_file():
        # The run's MLflow run holds each of its evaluations: TTA's under "tta/", the artifacts
        # under eval/<key>/.
        tracker = Tracker(spec.tracking_uri)
        tracker.run_id = (run_dir / RUN_ID_FILE).read_text().strip()
        prefix = "".join(f"{s}/" for s in spec.eval_switches)
        flat = {f"{prefix}{task}/{k}": v for task in tasks for k, v in metrics[task].items()}
        flat[f"{prefix}runtime_ms_per_image"] = record["runtime"]["ms_per_image"]
        flat[f"{prefix}eval_images"] = len(image_ids)
        step = cfg.SOLVER.MAX_ITER - 1 if iteration is None else iteration
        tracker.log_final(_not_logged(tracker, flat, step), step,
                          [out_dir / METRICS_FILE, out_dir / "config.yaml"], artifact_path=f"eval/{spec.eval_key()}")
    return record


def _not_logged(tracker: Tracker, metrics: dict, step: int) -> dict:
    """``metrics`` less those the MLflow run already holds with the same value at ``step`` (an
    evaluation run again): MLflow keeps every logged entry, so re-logging would duplicate them."""
    out = {}
    for key, value in metrics.items():
        if value is None:
            continue
        history = tracker.client.get_metric_history(tracker.run_id, key)
        if not any(m.step == step and m.value == float(value) for m in history):
            out[key] = value
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.runs.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--warmup", type=int, help="untimed first images (default: the run's eval.warmup)")
    parser.add_argument("--max-images", type=int, help="evaluate only the first N validation images "
                        "(default: the run's eval.max_images)")
    parser.add_argument("--score-thresh", type=float, help="score threshold of the final detections "
                        "(default: the run's eval.score_thresh)")
    parser.add_argument("--detections-per-image", type=int, help="final detections kept per image "
                        "(default: the run's eval.detections_per_image)")
    args = parser.parse_args(argv)
    try:
        if not (args.run_dir / "run.json").is_file():
            raise FileNotFoundError(f"{args.run_dir}: no run.json; not a run directory")
        spec = RunSpec.from_json((args.run_dir / "run.json").read_text())
        given = {"warmup": args.warmup, "max_images": args.max_images, "score_thresh": args.score_thresh,
                 "detections_per_image": args.detections_per_image}
        spec = replace(spec, eval={**spec.eval, **{k: v for k, v in given.items() if v is not None}})
        record = evaluate(args.run_dir, spec)
    except (FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    box = record["bbox"]
    print(f"{args.run_dir}: box AP {box.get('AP')} (APr {box.get('APr')}, APc {box.get('APc')}, "
          f"APf {box.get('APf')}), {record['runtime']['ms_per_image']} ms/image")


if __name__ == "__main__":
    main()
