"""
MLflow tracking of runs: one experiment per study, one parent run per ablation (detector + loss +
dataset ...), one nested run per seed. A stage opens the parent runs of its rows, and ends them
(FINISHED, or FAILED / KILLED when a job failed or the stage was interrupted) with the row's mean and
std over seeds of each table metric (``bbox/AP_mean``, ``bbox/AP_std``, ..., ``n_seeds``): the MLflow
UI's compare view shows a row per ablation. A stage run again reuses its parents.

- Store: ``$MLFLOW_TRACKING_URI`` if set, else ``params.yaml`` ``tracking.uri``, else MLflow's
  sqlite store ``mlflow.db`` at the repository root, as an absolute URI. DVC runs queued or
  ``--temp`` experiments in copies under ``<repo>/.dvc/tmp/exps/``; the root is taken from outside
  that folder so every experiment writes to the one store. Artifacts go to ``mlruns/`` beside a
  sqlite database (``<repo>/mlruns`` for the default store).
- Every write happens under one file lock next to the store: parallel seeds (processes or Slurm
  jobs) neither race to create the same parent run nor hit sqlite's "database is locked".
- A run directory remembers its MLflow run id (``mlflow_run_id``): a resumed run continues the
  same MLflow run, and steps it has already logged are not logged again.
"""
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterable, Optional

from filelock import FileLock

from pipeline.atomic import write_text
from pipeline.params import ROOT
from pipeline.paths import inside

RUN_ID_FILE = "mlflow_run_id"
TAG_ABLATION = "cn2.ablation"
TAG_RUN_DIR = "cn2.run_dir"


def repo_root(path: Path = ROOT) -> Path:
    """The user's repository, also from inside a DVC experiment's temporary copy."""
    parts = Path(path).resolve().parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return Path(path).resolve()


def tracking_uri(configured: Optional[str] = None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        return uri
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def _lock_path(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        return uri[len("sqlite:///"):] + ".lock"
    if "://" not in uri:  # a file store directory
        return str(Path(uri).resolve()) + ".lock"
    return str(repo_root() / ".mlflow.lock")


def redact_uri(uri: Optional[str]) -> Optional[str]:
    """``uri`` without the user name and password (token) of its network location, for what is
    written to files: ``https://user:token@host/x`` -> ``https://host/x``."""
    if not uri or "@" not in uri:
        return uri
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def filter_value(value) -> str:
    """``value`` quoted for an MLflow search filter. MLflow takes a quoted string as it is (it does not
    unescape), so the quote used is one the value does not hold; a value holding both quotes or a
    backslash is refused."""
    value = str(value)
    if "\\" not in value:
        for quote in ("'", '"'):
            if quote not in value:
                return f"{quote}{value}{quote}"
    raise ValueError(f"{value!r} cannot be searched for in MLflow: it holds both quote characters or a backslash")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Tracker:
    """The MLflow run of one training run (a seed of an ablation)."""

    def __init__(self, uri: Optional[str] = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(uri)
        mlflow.set_tracking_uri(self.uri)
        self.lock = FileLock(_lock_path(self.uri), timeout=600)
        with self.lock:  # the first client of a new sqlite store creates its tables: one at a time
            self.client = MlflowClient(self.uri)
            self.client.search_experiments(max_results=1)
        self.run_id: Optional[str] = None

    @contextmanager
    def _locked(self):
        with self.lock:
            yield

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        # A sqlite store keeps its artifacts in mlruns/ beside the database (the default store:
        # <repo>/mlruns), so a store elsewhere (a test's, a user's) writes nothing into the repo.
        # Other stores choose their own artifact location.
        location = (inside(Path(self.uri[len("sqlite:///"):]).resolve().parent / "mlruns", name).as_uri()
                    if self.uri.startswith("sqlite:///") else None)
        return self.client.create_experiment(name, artifact_location=location)

    def _find(self, experiment_id: str, filter_string: str):
        runs = self.client.search_runs([experiment_id], filter_string=filter_string, max_results=2)
        return runs[0] if runs else None

    def _parent(self, experiment_id: str, ablation: str):
        parent = self._find(experiment_id,
                            f"tags.`{TAG_ABLATION}` = {filter_value(ablation)} and tags.`mlflow.parentRunId` IS NULL")
        if parent is None:
            parent = self.client.create_run(experiment_id, run_name=ablation, tags={TAG_ABLATION: ablation})
        return parent

    def open_parent(self, study: str, ablation: str) -> str:
        """The parent run of ``ablation`` in ``study`` (found, else created), marked RUNNING: a stage
        opens the parents of its rows before its jobs start and closes them (:meth:`close_parent`)."""
        with self._locked():
            parent = self._parent(self._experiment(study), ablation)
            if parent.info.status != "RUNNING":
                self.client.update_run(parent.info.run_id, status="RUNNING")
            return parent.info.run_id

    def close_parent(self, run_id: str, metrics: Dict[str, float], status: str = "FINISHED") -> None:
        """Log ``metrics`` (the row's summary over seeds) on a parent run and end it with ``status``
        (FINISHED, FAILED or KILLED)."""
        import time

        from mlflow.entities import Metric

        with self._locked():
            now = int(time.time() * 1000)
            items = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None]
            if items:
                self.client.log_batch(run_id, metrics=items)
            self.client.set_terminated(run_id, status)

    def start(self, run_dir: Path, study: str, ablation: str, seed: int, params: Dict[str, str],
              tags: Dict[str, str]) -> str:
        """Find or create the parent (ablation) and child (seed) runs; return the child's id."""
        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / RUN_ID_FILE
        with self._locked():
            if id_file.is_file():
                self.run_id = id_file.read_text().strip()
                return self.run_id
            exp = self._experiment(study)
            parent_id = self._parent(exp, ablation).info.run_id
            child = self._find(exp, f"tags.`{TAG_RUN_DIR}` = {filter_value(run_dir)}")
            if child is None:
                child = self.client.create_run(exp, run_name=f"{ablation}/seed{seed}", tags={
                    "mlflow.parentRunId": parent_id, TAG_ABLATION: ablation, TAG_RUN_DIR: str(run_dir),
                    **tags})
            self.run_id = child.info.run_id
            self._log_params(self.run_id, params)
            if not self.client.get_run(parent_id).data.params:
                self._log_params(parent_id, {k: v for k, v in params.items() if not k.startswith("d2.")})
            write_text(id_file, self.run_id)
        return self.run_id

    def _log_params(self, run_id: str, params: Dict[str, str]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def last_logged_step(self, key: str = "total_loss") -> int:
        """Highest step of ``key`` already in the run (-1 when none)."""
        history = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=-1)

    def log_metrics(self, rows: Iterable[tuple]) -> None:
        """``rows``: (step, {name: value}) pairs; steps already logged are skipped (resume)."""
        import time

        from mlflow.entities import Metric

        with self._locked():
            done = self.last_logged_step()
            now = int(time.time() * 1000)
            items = [Metric(k, float(v), now, step) for step, metrics in rows if step > done
                     for k, v in metrics.items()]
            for i in range(0, len(items), 1000):
                self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_final(self, metrics: Dict[str, float], step: int, artifacts: Iterable[Path] = (),
                  artifact_path: Optional[str] = None) -> None:
        import time

        from mlflow.entities import Metric

        with self._locked():
            now = int(time.time() * 1000)
            items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
            self.client.log_batch(self.run_id, metrics=items)
            for path in artifacts:
                if Path(path).is_file():
                    self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Dict[str, str]) -> None:
        with self._locked():
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def finish(self, status: str = "FINISHED") -> None:
        with self._locked():
            self.client.set_terminated(self.run_id, status)
