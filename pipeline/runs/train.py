"""
Train one run: ``python -m pipeline.runs.train --run-dir DIR [--set KEY=VALUE ...] [--seed S]``.

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

Failing safely:

- Initial weights: with nothing to resume, the model starts from ``train.weights`` (null: the scale
  preset's ``MODEL.WEIGHTS`` — none at smoke/synthetic, ImageNet R-50 at paper, X-101 with the x101
  switch), loaded by detectron2's checkpointer (with its Caffe2/pkl name mapping). A URL that cannot
  be fetched stops the run before training, saying which file to download and which key to set.
  Their path and sha256 go to ``run.json`` (``initial_weights``) and the MLflow run's tags.
- Only ``model_<7 digits>.pth`` and ``model_final.pth`` inside the run directory are ever loaded from
  it (whatever ``last_checkpoint`` names), with ``torch.load(..., weights_only=True)``; pickled
  ``.pkl`` weights only from the initial-weights location (``train.weights`` or the preset's).
- A damaged checkpoint (truncated, overwritten, missing) is named in one line with what is wrong;
  resuming falls back to the newest readable kept checkpoint, or stops saying how to start again.
- A full disk: ``error: no space left on device writing <file> (<n> MB needed)``, the temporary file
  removed; the next run resumes from the last complete checkpoint.
- One writer per run directory (a file lock): a second ``pipeline.runs.train`` on the same directory
  waits for the first to finish and then finds the run trained (or resumes it, if the first failed).
- Any error once the MLflow run exists marks it FAILED.
"""
import argparse
import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import sys
import time
import weakref
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional

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
from filelock import FileLock, Timeout

from pipeline import params as P
from pipeline.atomic import write_text
from pipeline.data.loader import LazyLoader, build_train_loader
from pipeline.runs.progress import PROGRESS_FILE
from pipeline.runs.spec import DONE_FILE, METRICS_LOG, RunSpec, build_cfg, resolve
from pipeline.runs.tracking import Tracker, git_commit, redact_uri

FINAL_WEIGHTS = "model_final.pth"
# train.final_dtype: what model_final.pth stores its floating-point tensors as. float16 halves it (55 ->
# 27 MiB a run at the synthetic scale) for a negligible change (measured on a CenterNet2-agnostic run,
# all 200 synthetic val images: box AP 5.635 against 5.630 in float32, AP_r equal); float32 keeps the
# trained values bit for bit.
FINAL_DTYPES = {name: getattr(torch, name) for name in P.FINAL_DTYPES}
# train.keep_checkpoints: periodic checkpoints (model + optimizer + scheduler) left once a run has
# finished; while it trains the last one always stays, which is all resuming needs. The fallbacks
# for a params dict without train.log_period / keep_checkpoints / final_dtype are params.yaml's.
DEFAULTS = P.TRAIN_RUN_DEFAULTS
# The only files resume and evaluation load from a run directory: periodic checkpoints (zero-padded
# iteration: name order is iteration order) and the final weights.
PERIODIC_NAME = re.compile(r"model_[0-9]{7}\.pth")
LOCK_FILE, PID_FILE = ".train.lock", ".train.pid"  # one writer per run directory (see lock_run_dir)
logger = logging.getLogger("pipeline.runs.train")


class TrainingDiverged(FloatingPointError):
    """A loss became NaN or infinite."""


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be used; the message names it and what is wrong."""


class DiskFull(RuntimeError):
    """A checkpoint could not be written: no space left on the device."""


def read_checkpoint(path) -> dict:
    """
    A ``.pth`` file read with ``torch.load(weights_only=True)`` (tensors and plain Python values
    only: nothing in it can run code), or :class:`CheckpointError` naming the file and what is wrong
    with it — not torch's advice to turn ``weights_only`` off, wrong for a damaged file.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (file not found)") from None
    except EOFError:
        raise CheckpointError(f"{path}: damaged (empty file)") from None
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))  # torch names the first class or function it refused
        if found:
            raise CheckpointError(f"{path}: holds Python objects, not just weights ({found.group(1)}); "
                                  f"refusing to load it") from None
        raise CheckpointError(f"{path}: damaged (not a PyTorch checkpoint: unreadable data)") from None
    except RuntimeError as e:
        if "zip archive" in str(e) or "PytorchStreamReader" in str(e):
            raise CheckpointError(f"{path}: damaged (truncated or incomplete checkpoint archive)") from None
        raise CheckpointError(f"{path}: damaged ({str(e).splitlines()[0]})") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
            from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(data).__name__}, not a dict of weights)")
    return data


def _nbytes(obj) -> int:
    """Bytes of the tensors in a (nested) state dict: about the size of its checkpoint."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _disk_full(error: BaseException) -> bool:
    """ENOSPC anywhere in the chain: torch.save reports a failed write as a RuntimeError ("unexpected
    pos") raised while handling the OSError."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return False


def write_checkpoint_file(path: str, data: dict) -> None:
    """``data`` saved to ``path`` through a temporary file and a rename: the file is complete or
    absent. On any error the temporary file is removed; a full disk is :class:`DiskFull`."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if _disk_full(e):
            needed = max(_nbytes(data), 1) / 2 ** 20
            raise DiskFull(f"no space left on device writing {path} ({needed:.1f} MB needed)") from None
        raise


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
    """
    ``DetectionCheckpointer`` whose files appear complete or not at all (temp file + rename), and
    that reads ``.pth`` files with ``weights_only=True`` (:func:`read_checkpoint`) and pickled
    ``.pkl`` weights (detectron2's Caffe2/ImageNet format) only from ``trusted_pickle``: the
    initial weights the params chose.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trusted_pickle: Optional[str] = None

    def _load_file(self, filename: str) -> dict:
        if filename.endswith(".pkl"):
            if self.trusted_pickle is None or os.path.realpath(filename) != os.path.realpath(self.trusted_pickle):
                raise CheckpointError(f"{filename}: pickled weights (.pkl) are loaded only from train.weights")
            return super()._load_file(filename)
        data = read_checkpoint(filename)
        return data if "model" in data else {"model": data}

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict(), **{k: v.state_dict() for k, v in self.checkpointables.items()},
                **kwargs}
        path = os.path.join(self.save_dir, f"{name}.pth")
        write_checkpoint_file(path, data)
        self.logger.info(f"Saved checkpoint {path}")
        self.tag_last_checkpoint(os.path.basename(path))

    def save_weights(self, name: str, dtype: str = "float32", **kwargs) -> None:
        """The model's weights alone (no optimizer, scheduler or RNG state: nothing resumes from it),
        atomically, floating-point tensors cast to ``dtype`` (``FINAL_DTYPES``; loading casts them
        back to the model's); ``last_checkpoint`` keeps pointing at the last full checkpoint."""
        if not self.save_dir or not self.save_to_disk:
            return
        cast = FINAL_DTYPES[dtype]
        weights = {k: v.to(cast) if v.is_floating_point() else v for k, v in self.model.state_dict().items()}
        path = os.path.join(self.save_dir, f"{name}.pth")
        write_checkpoint_file(path, {"model": weights, "dtype": dtype, **kwargs})
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
    end, ``model_final.pth`` with the weights only (in ``final_dtype``). ``max_to_keep=0``: the last
    one stays while the run trains (resuming needs it) and is deleted once the final weights are
    written, since a finished run resumes from nothing.
    """

    def __init__(self, checkpointer: AtomicCheckpointer, period: int, max_to_keep: int,
                 final_dtype: str = DEFAULTS["final_dtype"]):
        super().__init__(checkpointer, period)
        self.keep = max_to_keep
        self.final_dtype = final_dtype

    def before_train(self):
        super().before_train()
        # Zero-padded iteration numbers: name order is iteration order. Those at or after the start
        # (damaged ones that resuming skipped) are overwritten by this run, not counted twice.
        self.recent_checkpoints = sorted(
            str(p) for p in Path(self.checkpointer.save_dir).glob("model_[0-9]*.pth")
            if PERIODIC_NAME.fullmatch(p.name) and int(p.stem[len("model_"):]) < self.trainer.start_iter)

    def step(self, iteration: int, **kwargs) -> None:
        iteration = int(iteration)
        last = iteration >= self.max_iter - 1
        if (iteration + 1) % self.period == 0:
            self.checkpointer.save(f"model_{iteration:07d}", iteration=iteration, **kwargs)
            self.recent_checkpoints.append(self.checkpointer.get_checkpoint_file())
        if last:
            self.checkpointer.save_weights("model_final", dtype=self.final_dtype, iteration=iteration)
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


class ProgressFile(hooks.HookBase):
    """Writes ``{"iter", "max_iter", "loss", "sec_per_iter", "eta_s"}`` to ``path`` at most every
    ``every`` seconds and after the last iteration. ``sec_per_iter`` is the median of detectron2's
    ``IterationTimer`` over the last 20 iterations (null for the first few: it skips warm-up)."""

    def __init__(self, path: Path, every: float = 2.0):
        self.path, self.every = Path(path), every
        self._last: Optional[float] = None

    def after_step(self):
        it, max_iter = self.trainer.iter + 1, self.trainer.max_iter
        now = time.monotonic()
        if self._last is not None and now - self._last < self.every and it < max_iter:
            return
        self._last = now
        storage = self.trainer.storage
        histories = storage.histories()
        loss = histories["total_loss"].latest() if "total_loss" in histories else None
        sec = histories["time"].median(20) if "time" in histories else None
        write_text(self.path, json.dumps({"iter": it, "max_iter": max_iter, "loss": loss, "sec_per_iter": sec,
                                          "eta_s": None if sec is None else sec * (max_iter - it)}))


def autocast_for(precision: str, device: str) -> torch.autocast:
    """
    The context the training forward pass runs in for ``train.precision``: float32 disables it;
    bfloat16 is ``torch.autocast`` on the run's device, so convolutions and matrix products run in
    bfloat16 while the weights, their gradients, the optimizer and the ops autocast keeps in float32
    (losses, softmax, normalisation statistics) stay float32. Unlike float16 it needs no loss
    scaling (float32's exponent range). A GPU without bfloat16 is refused here, before training.
    """
    if precision not in P.PRECISIONS:
        raise ValueError(f"train.precision={precision!r}; allowed values: {', '.join(P.PRECISIONS)}")
    kind = torch.device(device).type
    if precision == "bfloat16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"train.precision=bfloat16: {torch.cuda.get_device_name()} has no bfloat16 support "
                         f"(it needs an Ampere or newer GPU); set train.precision=float32")
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == "bfloat16")


class Trainer(SimpleTrainer):
    """detectron2's ``SimpleTrainer`` with the schedule, checkpointing and logging of one run."""

    def __init__(self, cfg, seed: int, tracker: Optional[Tracker] = None,
                 log_period: int = DEFAULTS["log_period"], keep_checkpoints: int = DEFAULTS["keep_checkpoints"],
                 final_dtype: str = DEFAULTS["final_dtype"], precision: str = DEFAULTS["precision"]):
        seed_all_rng(seed)
        self.autocast = autocast_for(precision, cfg.MODEL.DEVICE)
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
            RetainingCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, keep_checkpoints, final_dtype),
            ProgressFile(Path(cfg.OUTPUT_DIR) / PROGRESS_FILE),  # what a waiting stage shows
            hooks.PeriodicWriter([CommonMetricPrinter(self.max_iter)], period=log_period),
        ])

    def resume(self) -> None:
        """
        Continue from the newest readable periodic checkpoint in OUTPUT_DIR, if any (else start at
        iteration 0). Only ``model_<7 digits>.pth`` files of the directory itself are candidates:
        ``last_checkpoint`` naming anything else is ignored with a warning. A damaged or missing
        checkpoint is skipped, saying which and which one the run resumes from instead; with none
        readable, :class:`CheckpointError` says how to start again.
        """
        run_dir = Path(self.cfg.OUTPUT_DIR)
        problems = checkpoint_problems(run_dir)
        for path in periodic_checkpoints(run_dir):
            try:
                self.checkpointer.load(str(path))
            except CheckpointError as e:
                problems.append(str(e))
                continue
            if problems:
                logger.warning(f"{'; '.join(problems)}; resuming from the newest readable checkpoint {path.name}")
            self.start_iter = self.iter + 1
            break
        else:
            if problems:
                raise CheckpointError(f"{'; '.join(problems)}; no readable checkpoint left to resume from: "
                                      f"remove {run_dir} to train this run again from the start")
        self.loader.start_iter = self.start_iter
        self.metrics_log.truncate(self.start_iter)

    def load_initial_weights(self, weights: "InitialWeights") -> None:
        """The model's starting point (no optimizer or schedule state), detectron2's name mapping
        for Caffe2/ImageNet ``.pkl`` files included."""
        self.checkpointer.trusted_pickle = weights.path if weights.path.endswith(".pkl") else None
        logger.info(f"initial weights: {weights.source} ({weights.path}, sha256 {weights.sha256})")
        self.checkpointer.load(weights.path, checkpointables=[])

    def run_step(self):
        """detectron2's step, the forward pass in ``train.precision``, with a clear stop (iteration, which
        loss) when a loss is NaN/inf."""
        assert self.model.training
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        try:
            with self.autocast:
                loss_dict = self.model(data)
            loss_dict = {k: v.float() for k, v in loss_dict.items()}  # summed and logged in float32
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
        final = Path(self.cfg.OUTPUT_DIR) / FINAL_WEIGHTS
        if self.start_iter >= self.max_iter and not final.is_file():
            # Stopped after the last periodic checkpoint but before the final weights: no step is
            # left to write them, so they come from the checkpoint just loaded.
            self.checkpointer.save_weights(final.stem, iteration=self.max_iter - 1)


def periodic_checkpoints(run_dir: Path) -> List[Path]:
    """The run's periodic checkpoints, newest first: regular files named ``model_<7 digits>.pth``
    directly in ``run_dir`` (a link is not followed out of it)."""
    found = [p for p in Path(run_dir).glob("model_[0-9]*.pth")
             if PERIODIC_NAME.fullmatch(p.name) and p.is_file() and not p.is_symlink()]
    return sorted(found, reverse=True)


def checkpoint_problems(run_dir: Path) -> List[str]:
    """What ``last_checkpoint`` says that resuming cannot use: a name that is not one of the run's
    checkpoints (another name, a path, '..'), or a checkpoint that is gone."""
    tag = Path(run_dir) / "last_checkpoint"
    if not tag.is_file():
        return []
    name = tag.read_text().strip()
    if not PERIODIC_NAME.fullmatch(name):
        return [f"{tag} names {name!r}, not a checkpoint of this run (only model_<7 digits>.pth in the run "
                f"directory are loaded); ignored"]
    if not (Path(run_dir) / name).is_file():
        return [f"{Path(run_dir) / name} (named in last_checkpoint): missing (file not found)"]
    return []


def final_weights(run_dir: Path) -> Path:
    """``run_dir/model_final.pth``, a regular file in the run directory, else :class:`CheckpointError`."""
    path = Path(run_dir) / FINAL_WEIGHTS
    if path.is_symlink():
        raise CheckpointError(f"{path}: a link, not the run's own file; refusing to load it")
    if not path.is_file():
        done = f" although training finished ({DONE_FILE})" if (Path(run_dir) / DONE_FILE).is_file() else ""
        raise CheckpointError(f"{path}: missing (no final weights{done}); remove {run_dir} and train the "
                              f"run again")
    return path


class InitialWeights(dict):
    """Where a run's weights start: ``source`` (as set), ``path`` (the local file), ``sha256``."""

    source = property(lambda self: self["source"])
    path = property(lambda self: self["path"])
    sha256 = property(lambda self: self["sha256"])


def weights_source(spec: RunSpec, cfg) -> str:
    """``train.weights``, else the preset's ``MODEL.WEIGHTS`` ('' = from scratch)."""
    return spec.train.get("weights") or cfg.MODEL.WEIGHTS or ""


def fetch_initial_weights(source: str) -> InitialWeights:
    """
    The local file of ``source`` (a path, or a ``detectron2://`` / http(s) URL fetched into
    detectron2's cache) and its sha256. A URL that cannot be fetched (no internet) or a missing
    file raises :class:`CheckpointError` saying which file to download and which key to set.
    """
    from detectron2.utils.file_io import PathManager

    if "://" in source:
        try:
            local = PathManager.get_local_path(source)
        except Exception as e:  # urllib, socket and iopath errors alike: the file is not here
            url = source.replace("detectron2://", "https://dl.fbaipublicfiles.com/detectron2/")
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"cannot fetch the initial weights {source} ({reason}): download {url} "
                                  f"and set train.weights to the downloaded file's path") from None
    else:
        local = str(Path(source).expanduser().resolve())
        if not Path(local).is_file():
            raise CheckpointError(f"train.weights={source!r}: file not found ({local})")
    digest = hashlib.sha256()
    with open(local, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return InitialWeights(source=source, path=str(Path(local).resolve()), sha256=digest.hexdigest())


def lock_run_dir(run_dir: Path) -> FileLock:
    """
    The run directory's lock, held: one ``pipeline.runs.train`` writes a run directory at a time. A
    second one says ``run dir <dir> is in use by PID <n>; waiting for it to finish`` and waits (then
    finds the run trained, or resumes it if the first failed). The kernel releases the lock of a
    killed process.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        pid_file = run_dir / PID_FILE
        pid = pid_file.read_text().strip() if pid_file.is_file() else "unknown"
        message = f"run dir {run_dir} is in use by PID {pid}; waiting for it to finish"
        print(message, file=sys.stderr, flush=True)
        logger.warning(message)
        lock.acquire()
    write_text(run_dir / PID_FILE, str(os.getpid()))
    return lock


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


def prepare_run_dir(run_dir: Path, spec: RunSpec, cfg, initial_weights: Optional[Dict[str, str]] = None,
                    starting: bool = True) -> None:
    """Write run.json (with ``initial_weights``: source, path, sha256; null from scratch) and
    config.yaml; refuse a directory that holds a different run. A run that resumes keeps its files.
    run.json gets the tracking URI without user and password (``redact_uri``); the caller's ``spec``
    keeps the real one, which is what tracking connects with (``tracking_uri`` is not part of
    ``identity()``, so a resume compares equal)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = run_dir / "run.json"
    if record.is_file():
        previous = RunSpec.from_json(record.read_text())
        if previous.identity() != spec.identity():
            raise P.ParamError(f"{run_dir}: holds a run with other settings (see its run.json); "
                               f"use a new --run-dir")
        if not starting:
            return
    write_text(run_dir / "config.yaml", cfg.dump())
    written = replace(spec, initial_weights=initial_weights, tracking_uri=redact_uri(spec.tracking_uri))
    write_text(run_dir / "run.json", written.to_json())


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
    Evaluation-only settings of ``spec`` (``eval``, TTA) play no part: the run trains ``spec.training()``.
    Holds the run directory's lock (:func:`lock_run_dir`) throughout."""
    run_dir = Path(run_dir)
    if (run_dir / DONE_FILE).is_file():
        logger.info(f"{run_dir}: already trained ({DONE_FILE}); nothing to do")
        return run_dir / FINAL_WEIGHTS
    # Multi-GPU: the main process holds the lock; the others wait for it at the barrier.
    lock = lock_run_dir(run_dir) if comm.is_main_process() else None
    comm.synchronize()
    try:
        if (run_dir / DONE_FILE).is_file():  # trained by the writer this one waited for
            logger.info(f"{run_dir}: already trained ({DONE_FILE}); nothing to do")
            if lock is not None:
                print(f"{run_dir}: already trained by the other process; nothing to do", file=sys.stderr)
            return run_dir / FINAL_WEIGHTS
        return _train(run_dir, spec.training(), track)
    finally:
        if lock is not None:
            lock.release()


def _train(run_dir: Path, spec: RunSpec, track: bool) -> Path:
    from pipeline.data import datasets
    from pipeline.data.prepare import check_prepared
    from pipeline.runs.figures import loss_curve

    check_prepared(spec.data_dir, spec.data)
    datasets.register(spec.data_name, spec.data_dir if spec.data_name == "synthetic"
                      else Path(spec.data.get("root") or datasets.default_root()))
    cfg = build_cfg(spec, run_dir)
    # Starting (nothing to resume): the initial weights are fetched now, so a missing file stops the
    # run before anything is written or tracked.
    starting = not periodic_checkpoints(run_dir) and not (run_dir / "last_checkpoint").exists()
    if starting and spec.pretrain is not None and not Path(cfg.MODEL.WEIGHTS).is_file():
        raise CheckpointError(f"{cfg.MODEL.WEIGHTS} not found: the {spec.scale} scale starts from the pretrain "
                              f"stage's backbone; run `dvc repro pretrain` (or `python -m pipeline.runs.pretrain`) "
                              f"first, or set train.weights")
    weights = fetch_initial_weights(weights_source(spec, cfg)) if starting and weights_source(spec, cfg) else None
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights_source(spec, cfg)
    cfg.freeze()
    prepare_run_dir(run_dir, spec, cfg, dict(weights) if weights else None, starting)
    setup_logger(str(run_dir / "log.txt"), distributed_rank=comm.get_rank())
    setup_logger(str(run_dir / "log.txt"), distributed_rank=comm.get_rank(), name="pipeline")
    tracker = None
    if track and comm.is_main_process():
        tracker = start_tracking(run_dir, spec, cfg)
        tracker.client.update_run(tracker.run_id, status="RUNNING")
    try:  # any error from here on (resume, initial weights, training, a full disk) ends the MLflow run FAILED
        if tracker is not None and weights is not None:
            tracker.set_tags({"initial_weights": weights.source, "initial_weights_path": weights.path,
                              "initial_weights_sha256": weights.sha256})
        trainer = Trainer(cfg, spec.seed, tracker,
                          **{key: spec.train.get(key, default) for key, default in DEFAULTS.items()})
        trainer.resume()
        if trainer.start_iter == 0 and weights is not None:
            trainer.load_initial_weights(weights)
        logger.info(f"training {spec.ablation} seed {spec.seed}: iterations {trainer.start_iter}..{trainer.max_iter}")
        start = time.time()
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
    return run_dir / FINAL_WEIGHTS


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.runs.train", description=__doc__.split("\n\n")[0])
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
    except (P.ParamError, TrainingDiverged, FileNotFoundError, CheckpointError, DiskFull) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"error: no space left on device{f' writing {e.filename}' if e.filename else ''}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
