"""
Train one run: ``python -m pipeline.train --run-dir DIR [--set KEY=VALUE ...] [--seed S]``.

``KEY`` is a dotted ``params.yaml`` key, the same keys ``dvc exp run -S`` takes (``--set scale=smoke
--set loss=fedloss``). The run directory records the resolved settings (``run.json``) and the
detectron2 config (``config.yaml``), and holds the log (``log.txt``), the training metrics
(``train_metrics.jsonl``), the last ``train.keep_checkpoints`` periodic checkpoints (weights, optimizer,
scheduler, RNG and data position: what resuming needs), and — only once training has finished —
``model_final.pth`` (the weights alone), ``loss_curve.png`` and ``train_done.json``.

Built on detectron2's ``SimpleTrainer`` with its hooks (LR schedule with warm-up, periodic
checkpoints, the terminal metric printer), ``DetectionCheckpointer`` and samplers
(``RepeatFactorTrainingSampler`` for LVIS-style data). Started again on the same directory it resumes
from the last checkpoint — iteration, optimizer, scheduler, RNG state and data position — and ends
with exactly the steps of a run that was never stopped. A finished run directory is left as is.
"""
import argparse
import json
import logging
import os
import random
import sys
import time
import weakref
from functools import partial
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import SimpleTrainer, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter, get_event_storage
from detectron2.utils.logger import setup_logger

from pipeline import params as P
from pipeline.atomic import write_text
from pipeline.loader import LazyLoader, build_train_loader
from pipeline.progress import PROGRESS_FILE, ProgressFile
from pipeline.runspec import RunSpec, build_cfg, resolve
from pipeline.tracking import Tracker, git_commit

DONE_FILE = "train_done.json"
METRICS_LOG = "train_metrics.jsonl"
logger = logging.getLogger("pipeline.train")


class TrainingDiverged(FloatingPointError):
    """A loss became NaN or infinite."""


class RNGState:
    """Python, numpy and torch RNG states as a checkpointable (numpy's as tensors: torch.load
    reads checkpoints with ``weights_only``)."""

    def state_dict(self):
        name, keys, pos, has_gauss, cached = np.random.get_state()
        return {"python": random.getstate(), "torch": torch.get_rng_state(),
                "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}

    def load_state_dict(self, state):
        random.setstate(state["python"])
        torch.set_rng_state(state["torch"])
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose files appear complete or not at all (temp file + rename)."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict(), **{k: v.state_dict() for k, v in self.checkpointables.items()},
                **kwargs}
        path = os.path.join(self.save_dir, f"{name}.pth")
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.logger.info(f"Saved checkpoint {path}")
        self.tag_last_checkpoint(os.path.basename(path))

    def save_weights(self, name: str, **kwargs) -> None:
        """The model's weights alone (no optimizer, scheduler or RNG state: nothing resumes from it),
        atomically; ``last_checkpoint`` keeps pointing at the last full checkpoint."""
        if not self.save_dir or not self.save_to_disk:
            return
        path = os.path.join(self.save_dir, f"{name}.pth")
        with open(f"{path}.tmp", "wb") as f:
            torch.save({"model": self.model.state_dict(), **kwargs}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(f"{path}.tmp", path)
        self.logger.info(f"Saved weights {path}")

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        tag = os.path.join(self.save_dir, "last_checkpoint")
        with open(f"{tag}.tmp", "w") as f:
            f.write(last_filename_basename)
        os.replace(f"{tag}.tmp", tag)


class RetainingCheckpointer(hooks.PeriodicCheckpointer):
    """
    detectron2's periodic checkpoints, of which the last ``max_to_keep`` stay on disk — counting
    those a resumed run finds there, which fvcore's in-memory list would never delete — and, at the
    end, ``model_final.pth`` with the weights only. ``max_to_keep=0``: the last one stays while the run
    trains (resuming needs it) and is deleted once the final weights are written.
    """

    def __init__(self, checkpointer: AtomicCheckpointer, period: int, max_to_keep: int):
        super().__init__(checkpointer, period)
        self.keep = max_to_keep

    def before_train(self):
        super().before_train()
        # Zero-padded iteration numbers: name order is iteration order.
        self.recent_checkpoints = sorted(str(p) for p in Path(self.checkpointer.save_dir).glob("model_[0-9]*.pth"))

    def step(self, iteration: int, **kwargs) -> None:
        iteration = int(iteration)
        last = iteration >= self.max_iter - 1
        if (iteration + 1) % self.period == 0:
            self.checkpointer.save(f"model_{iteration:07d}", iteration=iteration, **kwargs)
            self.recent_checkpoints.append(self.checkpointer.get_checkpoint_file())
        if last:
            self.checkpointer.save_weights("model_final", iteration=iteration)
        while len(self.recent_checkpoints) > max(self.keep, 0 if last else 1):
            old = self.recent_checkpoints.pop(0)
            if os.path.isfile(old):
                os.remove(old)


class MetricsLog(hooks.HookBase):
    """
    Every ``period`` iterations, the losses and lr (median over the period) are buffered; the
    buffer is written to ``train_metrics.jsonl`` and MLflow right before each checkpoint, so what
    is logged never runs ahead of what a resumed run will redo (and steps already in MLflow are
    skipped). Put it before the ``PeriodicCheckpointer`` hook.
    """

    def __init__(self, path: Path, tracker: Optional[Tracker], period: int, checkpoint_period: int):
        self.path, self.tracker = path, tracker
        self.period, self.checkpoint_period = period, checkpoint_period
        self.rows: List[tuple] = []

    def truncate(self, start_iter: int) -> None:
        """Drop rows a resumed run will log again (written after its last checkpoint)."""
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] < start_iter]
        write_text(self.path, "".join(line + "\n" for line in keep))

    def after_step(self):
        it, max_iter = self.trainer.iter, self.trainer.max_iter
        last = it >= max_iter - 1
        if (it + 1) % self.period == 0 or last:
            storage = get_event_storage()
            keys = [k for k in storage.histories() if k == "total_loss" or k.startswith("loss_") or k == "lr"]
            self.rows.append((it, {k: storage.history(k).median(self.period) for k in keys}))
        if (it + 1) % self.checkpoint_period == 0 or last:
            self.flush()

    def flush(self) -> None:
        if not self.rows or not comm.is_main_process():
            self.rows = []
            return
        with open(self.path, "a") as f:
            for step, metrics in self.rows:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tracker is not None:
            self.tracker.log_metrics(self.rows)
        self.rows = []


class Trainer(SimpleTrainer):
    """detectron2's ``SimpleTrainer`` with the schedule, checkpointing and logging of one run."""

    def __init__(self, cfg, seed: int, tracker: Optional[Tracker] = None, log_period: int = 20,
                 keep_checkpoints: int = 1):
        seed_all_rng(seed)
        model = create_ddp_model(build_model(cfg), broadcast_buffers=False)
        optimizer = build_optimizer(cfg, model)
        self.loader = LazyLoader(partial(build_train_loader, cfg, seed))
        super().__init__(model, self.loader, optimizer)
        self.cfg = cfg
        self.scheduler = build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self), rng=RNGState())
        self.start_iter, self.max_iter = 0, cfg.SOLVER.MAX_ITER
        self.metrics_log = MetricsLog(Path(cfg.OUTPUT_DIR) / METRICS_LOG, tracker, log_period,
                                      cfg.SOLVER.CHECKPOINT_PERIOD)
        self.register_hooks([
            hooks.IterationTimer(),
            hooks.LRScheduler(),
            self.metrics_log,
            RetainingCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, keep_checkpoints),
            ProgressFile(Path(cfg.OUTPUT_DIR) / PROGRESS_FILE),  # what a waiting stage shows
            hooks.PeriodicWriter([CommonMetricPrinter(self.max_iter)], period=log_period),
        ])

    def resume(self) -> None:
        """Continue from the last checkpoint in OUTPUT_DIR, if any (else start at iteration 0)."""
        if self.checkpointer.has_checkpoint():
            self.checkpointer.resume_or_load("", resume=True)
            self.start_iter = self.iter + 1
        self.loader.start_iter = self.start_iter
        self.metrics_log.truncate(self.start_iter)

    def run_step(self):
        """detectron2's step, with a clear stop (iteration, which loss) when a loss is NaN/inf."""
        assert self.model.training
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        try:
            loss_dict = self.model(data)
        except AssertionError as e:  # detectron2 asserts on NaN/inf boxes before any loss exists
            if "infinite or NaN" not in str(e):
                raise
            raise TrainingDiverged(f"NaN/inf values in the forward pass at iteration {self.iter} "
                                   f"(before the losses: {e})") from None
        bad = {k: v.item() for k, v in loss_dict.items() if not torch.isfinite(v).all()}
        if bad:
            raise TrainingDiverged(f"loss became NaN/inf at iteration {self.iter}: "
                                   + ", ".join(f"{k}={v}" for k, v in sorted(bad.items())))
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()

    def train(self):
        super().train(self.start_iter, self.max_iter)


def _flat_cfg(cfg, prefix="d2.") -> dict:
    out = {}

    def walk(node, key):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}{k}." if isinstance(v, dict) else f"{key}{k}")
        else:
            out[key] = node

    walk(cfg, prefix)
    return out


def prepare_run_dir(run_dir: Path, spec: RunSpec, cfg) -> None:
    """Write run.json and config.yaml; refuse a directory that holds a different run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = run_dir / "run.json"
    if record.is_file():
        previous = RunSpec.from_json(record.read_text())
        if previous.identity() != spec.identity():
            raise P.ParamError(f"{run_dir}: holds a run with other settings (see its run.json); "
                               f"use a new --run-dir")
        return
    write_text(run_dir / "config.yaml", cfg.dump())
    write_text(run_dir / "run.json", spec.to_json())


def dataset_checksum(spec: RunSpec) -> str:
    path = spec.data_dir / "prepare.json"
    return json.loads(path.read_text())["checksum"] if path.is_file() else "unknown"


def start_tracking(run_dir: Path, spec: RunSpec, cfg, tags: Optional[dict] = None) -> Tracker:
    """The run's MLflow run (found or created): settings and flattened config as params."""
    tracker = Tracker(spec.tracking_uri)
    params = {"detector": spec.detector, "loss": spec.loss, "scale": spec.scale, "seed": spec.seed,
              "dataset": f"{spec.data_name}/{spec.annotations}", "study": spec.study, **_flat_cfg(cfg)}
    all_tags = {"git_commit": git_commit(), "seed": str(spec.seed), "dataset": spec.data_name,
                "dataset_checksum": dataset_checksum(spec), "device": cfg.MODEL.DEVICE, **(tags or {})}
    if os.environ.get("DVC_EXP_NAME"):
        all_tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    tracker.start(run_dir, spec.study, spec.ablation, spec.seed, params, all_tags)
    return tracker


def run(run_dir: Path, spec: RunSpec, track: bool = True) -> Path:
    """Train (or resume, or skip if done) the run in ``run_dir``. Returns the final checkpoint.
    Evaluation-only settings of ``spec`` (``eval``, TTA) play no part: the run trains ``spec.training()``."""
    run_dir = Path(run_dir)
    if (run_dir / DONE_FILE).is_file():
        logger.info(f"{run_dir}: already trained ({DONE_FILE}); nothing to do")
        return run_dir / "model_final.pth"
    spec = spec.training()
    from pipeline import datasets
    from pipeline.run_figures import loss_curve

    datasets.register(spec.data_name, spec.data_dir if spec.data_name == "synthetic"
                      else Path(spec.data.get("root") or datasets.default_root()))
    cfg = build_cfg(spec, run_dir)
    prepare_run_dir(run_dir, spec, cfg)
    setup_logger(str(run_dir / "log.txt"), distributed_rank=comm.get_rank())
    setup_logger(str(run_dir / "log.txt"), distributed_rank=comm.get_rank(), name="pipeline")
    tracker = None
    if track and comm.is_main_process():
        tracker = start_tracking(run_dir, spec, cfg)
        tracker.client.update_run(tracker.run_id, status="RUNNING")
    trainer = Trainer(cfg, spec.seed, tracker, spec.train.get("log_period", 20), spec.train.get("keep_checkpoints", 1))
    trainer.resume()
    logger.info(f"training {spec.ablation} seed {spec.seed}: iterations {trainer.start_iter}..{trainer.max_iter}")
    start = time.time()
    try:
        trainer.train()
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    if comm.is_main_process():
        loss_curve(run_dir / METRICS_LOG, run_dir / "loss_curve.png", title=f"{spec.ablation} seed {spec.seed}")
        if tracker is not None:
            tracker.log_final({}, trainer.max_iter - 1, [run_dir / "config.yaml", run_dir / "loss_curve.png"])
            tracker.finish()
        done = {"iterations": trainer.max_iter, "seconds_this_session": round(time.time() - start, 1),
                "resumed_from": trainer.start_iter, "seed": spec.seed}
        write_text(run_dir / DONE_FILE, json.dumps(done, indent=2) + "\n")
    return run_dir / "model_final.pth"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="the run's directory (created or resumed)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml key (repeatable), e.g. --set loss=eql")
    parser.add_argument("--seed", type=int, help="this run's seed (default: the first of params.yaml seeds)")
    parser.add_argument("--study", default="main", help="MLflow experiment (default: %(default)s)")
    parser.add_argument("--row", default="", help="name of the ablation (study row); default: detector+loss+data")
    parser.add_argument("--params", type=Path, default=P.PARAMS_FILE, help="params file (default: %(default)s)")
    parser.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    args = parser.parse_args(argv)
    try:
        spec = resolve(P.load(args.params), args.overrides, args.seed, args.study, args.row)
        run(args.run_dir, spec, track=not args.no_track)
    except (P.ParamError, TrainingDiverged, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
