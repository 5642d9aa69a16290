"""
Hand a stage's runs to submitit and wait for them.

``launcher.cluster`` (params.yaml) picks the executor:
- ``local`` (default): each run is a local process, ``launcher.parallel`` at a time;
- ``slurm``: one Slurm job array with the profile's partition, GPUs, CPUs, memory, ``timeout_min`` and
  ``launcher.parallel`` as array parallelism (``slurm/*.yaml``);
- ``debug``: in this process, one after the other (breakpoints work).

A run job trains (resuming whatever checkpoint its directory holds) and evaluates the weights once per
evaluation setting its stage asks for; finished training and evaluations are not redone. A failed
job fails the stage with the job's id and the tail of its stderr; Ctrl-C or SIGTERM (``kill``, a CI
timeout, ``scancel`` of the stage's own job) cancels every submitted job;
a Slurm job preempted or timed out is requeued by submitit (``Checkpointable``) and resumes from its
last checkpoint. Jobs of several GPUs use detectron2's
``launch``. While it waits, the stage shows each run's progress (``pipeline.runs.progress``).
"""
import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import submitit
import yaml

from pipeline import params as P
from pipeline.runs.progress import StageProgress
from pipeline.runs.spec import DONE_FILE, METRICS_FILE, RunSpec, eval_dir

logger = logging.getLogger("pipeline.launch")


class StageFailed(RuntimeError):
    """A job of the stage failed; the message names the job and ends with its stderr's tail."""


class RunJob(submitit.helpers.Checkpointable):
    """
    Train one run and evaluate its weights once per evaluation setting asked for. On preemption or
    timeout submitit calls :meth:`checkpoint` (inherited), which resubmits this same call: training
    resumes from the run directory's last checkpoint, finished evaluations are not redone.
    """

    def __call__(self, run_dir: str, specs_json: List[str], cwd: str, threads: int = 0,
                 gpus: int = 0) -> List[Dict[str, Any]]:
        import torch

        os.chdir(cwd)  # data paths in a run's settings are relative to the stage's directory
        if threads:
            torch.set_num_threads(threads)
        from pipeline.runs import evaluate, train

        specs = [RunSpec.from_json(s) for s in specs_json]
        if not (Path(run_dir) / DONE_FILE).is_file():
            if gpus > 1:
                from detectron2.engine import launch

                launch(_train_worker, gpus, dist_url="auto", args=(run_dir, specs_json[0]))
            else:
                train.run(Path(run_dir), specs[0])
        out = []
        for spec in specs:
            metrics_file = eval_dir(run_dir, spec) / METRICS_FILE
            if not metrics_file.is_file():
                evaluate.evaluate(Path(run_dir), spec)
            out.append(yaml.safe_load(metrics_file.read_text()))
        return out


def _train_worker(run_dir: str, spec_json: str) -> None:
    from pipeline.runs import train

    train.run(Path(run_dir), RunSpec.from_json(spec_json))


def _tail(job, lines: int = 25) -> str:
    try:
        text = job.stderr() or ""
    except Exception:  # noqa: BLE001  (a job that never started has no log)
        text = ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _executor(launcher: Dict[str, Any], folder: Path, name: str):
    cluster = launcher.get("cluster", "local")
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=cluster)
    executor.update_parameters(timeout_min=launcher.get("timeout_min", 600), name=name)
    gpus = threads = 0
    if cluster == "slurm":
        profile = P.load_profile(launcher.get("profile"))
        executor.update_parameters(**{P.PROFILE_KEYS[k]: v for k, v in profile.items()},
                                   slurm_array_parallelism=launcher.get("parallel", 2))
        gpus = int(profile.get("gpus_per_node", 0))
        threads = int(profile.get("cpus_per_task", 0))
    elif cluster == "local":
        # Share the cores between the parallel jobs instead of oversubscribing them.
        threads = max(1, (os.cpu_count() or 1) // max(1, launcher.get("parallel", 2)))
    return executor, gpus, threads


def job_payloads(requests: Sequence[Tuple[Path, List[RunSpec]]]) -> List[List[str]]:
    """
    Each job's specs as JSON, with the tracking URI's credentials removed: submitit writes the
    payload to the job folder (``slurm-logs/``), a file others may read. A URI with credentials
    (``https://user:token@host``) reaches the jobs through ``MLFLOW_TRACKING_URI`` in their
    environment instead (local processes inherit it, Slurm exports it), which the jobs' tracking
    prefers over the spec's (``pipeline.runs.tracking.tracking_uri``); a variable the user set is kept.
    """
    from dataclasses import replace

    from pipeline.runs.tracking import redact_uri

    for _, specs in requests:
        for spec in specs:
            if spec.tracking_uri and redact_uri(spec.tracking_uri) != spec.tracking_uri:
                os.environ.setdefault("MLFLOW_TRACKING_URI", spec.tracking_uri)
    return [[replace(s, tracking_uri=redact_uri(s.tracking_uri)).to_json() for s in specs] for _, specs in requests]


def run_all(requests: Sequence[Tuple[Path, List[RunSpec]]], launcher: Dict[str, Any], folder: Path,
            name: str = "cn2") -> List[List[Dict[str, Any]]]:
    """One job per (run_dir, specs): train the run, evaluate it with each spec's evaluation settings;
    returns, in order, each job's list of metrics. Blocks until all finish."""
    if not requests:
        return []
    executor, gpus, threads = _executor(launcher, folder, name)
    n = len(requests)
    args = ([str(d) for d, _ in requests], job_payloads(requests), [os.getcwd()] * n, [threads] * n, [gpus] * n)
    cluster = launcher.get("cluster", "local")
    jobs: List[Any] = []
    progress = StageProgress(requests) if cluster != "debug" else None  # debug: the job's own output
    with _interruptible():
        try:
            if cluster == "local":
                # No job arrays on the local executor: keep `parallel` jobs running, start the next
                # as soon as one ends.
                parallel = max(1, launcher.get("parallel", 2))
                pending = list(range(len(requests)))
                active: List[Any] = []
                while pending or active:
                    while pending and len(active) < parallel:
                        i = pending.pop(0)
                        job = executor.submit(RunJob(), *(a[i] for a in args))
                        jobs.append(job)
                        active.append(job)
                        logger.info(f"job {job.job_id}: {requests[i][0]} (logs in {folder / job.job_id})")
                    done = [j for j in active if j.done()]
                    for job in done:
                        active.remove(job)
                        _wait(job)  # raises StageFailed on a failed job
                    if not done:
                        progress.update()
                        time.sleep(1)
                return [_wait(job) for job in jobs]
            jobs = executor.map_array(RunJob(), *args)
            logger.info(f"submitted {len(jobs)} job(s) to {cluster}: {', '.join(j.job_id for j in jobs)}; "
                        f"logs in {folder}")
            while progress is not None and not all(j.done() for j in jobs):
                progress.update()
                time.sleep(2)
            return [_wait(job) for job in jobs]
        except (KeyboardInterrupt, StageFailed):
            running = [j for j in jobs if not j.done()]
            for job in running:
                job.cancel(check=False)
            if running:
                logger.error(f"cancelled {len(running)} running job(s): {', '.join(j.job_id for j in running)}")
            raise
        finally:
            if progress is not None:
                progress.close()


@contextmanager
def _interruptible():
    """
    While a stage waits on its jobs: SIGTERM stops it as Ctrl-C does (``run_all`` then cancels the
    running jobs; without this, ``kill`` left local jobs training on). And jobs started meanwhile can
    be cancelled even when this process ignores SIGINT, as a non-interactive shell's background
    commands do: children inherit an ignored SIGINT across exec, and submitit cancels a local job
    with SIGINT. A Python handler is reset to the default across exec, so an ignored SIGINT is
    replaced by one that does nothing (this process still ignores Ctrl-C).
    """
    if threading.current_thread() is not threading.main_thread():  # handlers: main thread only
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    old_term = signal.signal(signal.SIGTERM, stop)
    old_int = signal.getsignal(signal.SIGINT)
    if old_int == signal.SIG_IGN:
        signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


def _wait(job) -> Dict[str, Any]:
    # A debug job runs inside result(); the others are polled.
    while not isinstance(job, submitit.DebugJob) and not job.done():
        time.sleep(2)
    try:
        return job.result()
    except Exception as e:  # noqa: BLE001  (submitit wraps the job's own exception)
        raise StageFailed(f"job {job.job_id} failed ({type(e).__name__}); last lines of its stderr "
                          f"({job.paths.stderr}):\n{_tail(job)}") from None


def main_guard(func):
    """Run a stage entry point: one-line errors for bad params, the job's tail for a failed job."""
    try:
        func()
    except P.ParamError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
