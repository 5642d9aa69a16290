"""
Evaluate one trained run: ``python -m pipeline.evaluate --run-dir DIR``.

Runs the final checkpoint over the validation split with detectron2's ``LVISEvaluator`` (the official
``lvis`` API: AP, AP50, AP75, APs/m/l, APr/c/f; box, and mask when the model has a mask head) or
``COCOEvaluator`` (pycocotools) for COCO-labelled data, and times inference per image (batch 1,
warm-up images excluded, median over the split; device and threads recorded: Table 1's runtime).
Writes ``DIR/metrics.json`` (APs in percent, as detectron2 reports them; ``null`` where the split
has no category of a bucket) and logs the same to the run's MLflow run.
"""
import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader
from detectron2.evaluation import COCOEvaluator, LVISEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from torch import nn

from pipeline import datasets
from pipeline.atomic import write_text
from pipeline.runspec import RunSpec
from pipeline.tracking import RUN_ID_FILE, Tracker
from pipeline.train import DONE_FILE, dataset_checksum

logger = logging.getLogger("pipeline.evaluate")
METRICS_FILE = "metrics.json"


class TimedModel(nn.Module):
    """Wraps a model to record the wall time of every forward call (CUDA-synchronised)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.times_ms = []

    def forward(self, inputs):
        cuda = next(self.inner.parameters()).is_cuda
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.inner(inputs)
        if cuda:
            torch.cuda.synchronize()
        self.times_ms.append((time.perf_counter() - start) * 1000)
        return out


def _clean(value):
    """NaN and the lvis API's -1 (no category of that kind in the split) become None."""
    if value is None or (isinstance(value, float) and (math.isnan(value) or value < 0)):
        return None
    return float(value)


def evaluate(run_dir: Path, warmup: int = 5, max_images: int = None) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / DONE_FILE).is_file():
        raise FileNotFoundError(f"{run_dir}: no finished training ({DONE_FILE}); run pipeline.train first")
    spec = RunSpec.from_json((run_dir / "run.json").read_text())
    setup_logger(str(run_dir / "log.txt"))
    splits = datasets.register(spec.data_name, spec.data_dir if spec.data_name == "synthetic"
                               else Path(spec.data.get("root") or datasets.default_root()))
    cfg = CfgNode.load_cfg((run_dir / "config.yaml").read_text())
    val = cfg.DATASETS.TEST[0]
    kind = next(s.kind for flavour in splits.values() for s in flavour if s.name == val)
    model = build_model(cfg)
    checkpoint = DetectionCheckpointer(model).load(str(run_dir / "model_final.pth"))
    model.eval()
    if cfg.TEST.AUG.ENABLED:  # Table 3 "+ test-aug": detectron2's TTA for R-CNNs, boxes and masks merged
        from detectron2.modeling import GeneralizedRCNNWithTTA

        model = GeneralizedRCNNWithTTA(cfg, model)
    timed = TimedModel(model)
    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    out_dir = run_dir / "eval"
    if kind == "lvis":
        evaluator = LVISEvaluator(val, tasks=tasks, distributed=False, output_dir=str(out_dir))
    else:  # the fast COCOeval needs detectron2's compiled extension: use pycocotools
        evaluator = COCOEvaluator(val, tasks=tasks, distributed=False, output_dir=str(out_dir),
                                  use_fast_impl=False)
    loader = build_detection_test_loader(cfg, val)
    if max_images:
        loader = [batch for _, batch in zip(range(max_images), loader)]
    with torch.no_grad():
        results = inference_on_dataset(timed, loader, evaluator)
    metrics = {task: {k: _clean(v) for k, v in results.get(task, {}).items() if "-" not in k} for task in tasks}
    for task in tasks:  # a model with no detections at all has AP 0, not NaN
        if task in results and all(v is None for v in metrics[task].values()):
            metrics[task] = {k: 0.0 for k in metrics[task]}
    timed_ms = timed.times_ms[warmup:] or timed.times_ms
    record = {
        **metrics,
        "iteration": int(checkpoint.get("iteration", cfg.SOLVER.MAX_ITER - 1)),
        "dataset": {"name": spec.data_name, "annotations": spec.annotations, "split": val,
                    "checksum": dataset_checksum(spec)},
        "runtime": {"ms_per_image": round(statistics.median(timed_ms), 2), "images": len(timed_ms),
                    "warmup": min(warmup, len(timed.times_ms)), "batch": 1, "device": cfg.MODEL.DEVICE,
                    "device_name": torch.cuda.get_device_name(0) if cfg.MODEL.DEVICE == "cuda" else "cpu",
                    "threads": torch.get_num_threads()},
        "detector": spec.detector, "loss": spec.loss, "seed": spec.seed, "scale": spec.scale,
    }
    write_text(run_dir / METRICS_FILE, json.dumps(record, indent=2) + "\n")
    if (run_dir / RUN_ID_FILE).is_file():
        tracker = Tracker(spec.tracking_uri)
        tracker.run_id = (run_dir / RUN_ID_FILE).read_text().strip()
        flat = {f"{task}/{k}": v for task in tasks for k, v in metrics[task].items()}
        flat["runtime_ms_per_image"] = record["runtime"]["ms_per_image"]
        tracker.log_final(flat, record["iteration"], [run_dir / METRICS_FILE])
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--warmup", type=int, default=5, help="untimed first images (default: %(default)s)")
    parser.add_argument("--max-images", type=int, help="evaluate only the first N validation images")
    args = parser.parse_args(argv)
    try:
        record = evaluate(args.run_dir, args.warmup, args.max_images)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    box = record["bbox"]
    print(f"{args.run_dir}: box AP {box.get('AP')} (APr {box.get('APr')}, APc {box.get('APc')}, "
          f"APf {box.get('APf')}), {record['runtime']['ms_per_image']} ms/image")


if __name__ == "__main__":
    main()
