"""
Faults a run survives (issue 17): initial weights, damaged checkpoints, a full disk, two writers on
one run directory, a hostile ``last_checkpoint``, and evaluating twice.

Every test starts from a copy of one trained smoke run (module fixture ``trained``: 5 iterations, a
checkpoint every 2 — iterations 1 and 3 — both kept, then ``model_final.pth``). ``unfinished`` is
that copy as a run stopped before its last iteration: resuming from ``model_0000003.pth`` trains
iteration 4 only, falling back to ``model_0000001.pth`` trains iterations 2-4.
"""
import errno
import hashlib
import json
import logging
import os
import pickle
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.params import ROOT
from pipeline.runs import evaluate as ev
from pipeline.runs import train as tr
from pipeline.runs.spec import resolve
from tests.helpers import tiny_dataset

MAX_ITER, CKPT = 5, 2


def _params(data: Path, **train) -> dict:
    return {
        "data": {"name": "synthetic", "root": str(data)}, "scale": "smoke",
        "detector": "centernet2_agnostic", "loss": "fedloss", "seeds": [0],
        "train": {"max_iter": MAX_ITER, "checkpoint_period": CKPT, "keep_checkpoints": 2, "log_period": 1,
                  "num_workers": 0, "device": "cpu", "opts": [], **train},
        "eval": {"warmup": 1, "max_images": None},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = root / "data"
    tiny_dataset(data, checksum=None)
    params = _params(data)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    run_dir = root / "trained"
    tr.run(run_dir, resolve(params, seed=0, study="faults"), track=False)
    assert sorted(p.name for p in run_dir.glob("*.pth")) == ["model_0000001.pth", "model_0000003.pth",
                                                             "model_final.pth"]
    return {"run_dir": run_dir, "params": params, "params_file": params_file, "data": data}


@pytest.fixture(autouse=True)
def _quiet_closed_streams(monkeypatch):
    """detectron2's ``setup_logger`` is cached: handlers it made in an earlier test still write to
    that test's (closed) captured stdout. Their "--- Logging error ---" reports are not this test's."""
    monkeypatch.setattr(logging, "raiseExceptions", False)


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _copy(trained, dest: Path) -> Path:
    shutil.copytree(trained["run_dir"], dest, ignore=shutil.ignore_patterns(tr.LOCK_FILE, tr.PID_FILE))
    return dest


def _unfinished(trained, dest: Path) -> Path:
    """The trained run as if stopped during iteration 4: its last checkpoint is iteration 3's."""
    run_dir = _copy(trained, dest)
    for name in (tr.DONE_FILE, "model_final.pth", "loss_curve.png"):
        (run_dir / name).unlink()
    metrics = (run_dir / tr.METRICS_LOG).read_text().splitlines()
    (run_dir / tr.METRICS_LOG).write_text("".join(line + "\n" for line in metrics[:4]))
    assert (run_dir / "last_checkpoint").read_text() == "model_0000003.pth"
    return run_dir


def _train(trained, run_dir: Path, *extra):
    tr.main(["--params", str(trained["params_file"]), "--run-dir", str(run_dir), *extra])


def _done(run_dir: Path) -> dict:
    return json.loads((run_dir / tr.DONE_FILE).read_text())


def _steps(run_dir: Path):
    return [json.loads(line)["step"] for line in (run_dir / tr.METRICS_LOG).read_text().splitlines()]


def _error_lines(capsys) -> list:
    """stderr without MLflow's own INFO lines (creating a new sqlite store's tables)."""
    return [line for line in capsys.readouterr().err.strip().splitlines() if " INFO mlflow." not in line]


def _status(uri: str, run_dir: Path) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).get_run((run_dir / "mlflow_run_id").read_text().strip()).info.status


# --- 1. initial weights -------------------------------------------------------------------------

def test_a_run_starts_from_the_weights_in_train_weights(trained, tmp_path, mlflow_uri, monkeypatch):
    """
    A run with ``train.weights`` = another run's ``model_final.pth`` holds exactly those tensors
    when its first step starts (every key of the state dict, buffers included), and records the
    file's path and sha256 (hashlib over the file's bytes) in run.json and as MLflow tags.
    Deliberate breaks tried: the ``load_initial_weights`` call removed -> the weights were the
    seed's random initialisation (backbone.fpn_lateral3.weight differed) and the test failed; on the
    code before this change ``train.weights`` was an unknown key (ParamError), failed.
    """
    from mlflow.tracking import MlflowClient

    source = trained["run_dir"] / "model_final.pth"
    expected = torch.load(source, map_location="cpu", weights_only=True)["model"]
    seen = {}

    def first_step(self):
        seen.update({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        raise KeyboardInterrupt("stop before the first step")

    monkeypatch.setattr(tr.Trainer, "run_step", first_step)
    run_dir = tmp_path / "warm"
    spec = resolve(_params(trained["data"], weights=str(source)), seed=0, study="faults")
    with pytest.raises(KeyboardInterrupt):
        tr.run(run_dir, spec)
    assert seen.keys() == expected.keys()
    for k in expected:
        assert torch.equal(seen[k], expected[k]), k
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    record = json.loads((run_dir / "run.json").read_text())["initial_weights"]
    assert record == {"source": str(source), "path": str(source.resolve()), "sha256": sha}
    run = MlflowClient(mlflow_uri).get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.data.tags["initial_weights_sha256"] == sha
    assert run.data.tags["initial_weights_path"] == str(source.resolve())
    assert run.info.status == "FAILED"  # interrupted


def test_weights_that_cannot_be_fetched_stop_before_training(trained, tmp_path, capsys, monkeypatch):
    """
    Without internet a weights URL gives one line: the URL to download (detectron2:// spelled as
    its https address) and the key to set; nothing is written to the run directory. The http case
    is real (nothing listens on 127.0.0.1:9); the detectron2:// case has detectron2's PathManager
    fail as it does offline. On the code before this change (``train.weights`` unknown) it failed.
    """
    run_dir = tmp_path / "offline"
    with pytest.raises(SystemExit) as exc:
        _train(trained, run_dir, "--no-track", "--set", "train.weights=http://127.0.0.1:9/R-50.pkl")
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot fetch the initial weights http://127.0.0.1:9/R-50.pkl (")
    assert err.endswith("): download http://127.0.0.1:9/R-50.pkl and set train.weights to the downloaded file's path")
    assert not (run_dir / "run.json").exists() and not list(run_dir.glob("*.pth"))

    from detectron2.utils.file_io import PathManager

    def offline(path, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(PathManager, "get_local_path", offline)
    with pytest.raises(SystemExit):
        _train(trained, run_dir, "--no-track", "--set", "train.weights=detectron2://ImageNetPretrained/MSRA/R-50.pkl")
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: cannot fetch the initial weights detectron2://ImageNetPretrained/MSRA/R-50.pkl ([Errno -3] Temporary "
        "failure in name resolution): download https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/"
        "R-50.pkl and set train.weights to the downloaded file's path"]


def test_the_paper_preset_starts_from_imagenet_weights(trained):
    """``train.weights: null`` takes the preset's: none at smoke, the yaml's ImageNet R-50 at paper,
    FAIR's X-101 with the x101 switch (the URLs of Base-CenterNet2.yaml and model/switches.py)."""
    from model import get_model_cfg

    smoke = resolve(trained["params"], seed=0)
    paper = resolve({**trained["params"], "scale": "paper"}, seed=0)
    assert tr.weights_source(smoke, get_model_cfg("centernet2_agnostic", "smoke")) == ""
    assert tr.weights_source(paper, get_model_cfg("centernet2_agnostic", "paper")) == \
        "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    assert tr.weights_source(paper, get_model_cfg("centernet2_agnostic", "paper", switches=["x101"])) == \
        "detectron2://ImageNetPretrained/FAIR/X-101-32x8d.pkl"
    mine = resolve({**trained["params"], "scale": "paper",
                    "train": {**trained["params"]["train"], "weights": "/w.pkl"}})
    assert tr.weights_source(mine, get_model_cfg("centernet2_agnostic", "paper")) == "/w.pkl"


# --- 2. damaged checkpoints ---------------------------------------------------------------------

def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[:100])


DAMAGE = {
    "truncated": (_truncate, "damaged (truncated or incomplete checkpoint archive)"),
    "random bytes": (lambda p: p.write_bytes(random.Random(0).randbytes(2000)),
                     "damaged (not a PyTorch checkpoint: unreadable data)"),
    "deleted": (lambda p: p.unlink(), "(named in last_checkpoint): missing (file not found)"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(trained, tmp_path, damage):
    """
    The last checkpoint (iteration 3) truncated, overwritten with random bytes, or deleted while
    ``last_checkpoint`` names it: one warning line naming the file, what is wrong and the checkpoint
    used instead (iteration 1); the run resumes at iteration 2 and ends with steps 0-4 once each.
    Deliberate break tried: a candidate's CheckpointError re-raised instead of trying the next one
    -> the truncated and random-bytes cases failed (the deleted one is not a candidate: it passed);
    on the code before this change all three failed (torch traceback / ``Checkpoint ... not found!``).
    """
    run_dir = _unfinished(trained, tmp_path / "run")
    damage_fn, what = DAMAGE[damage]
    damage_fn(run_dir / "model_0000003.pth")
    _train(trained, run_dir, "--no-track")
    assert _done(run_dir)["resumed_from"] == 2
    expected = (f"{run_dir / 'model_0000003.pth'} {what}" if damage == "deleted" else
                f"{run_dir / 'model_0000003.pth'}: {what}") + \
        "; resuming from the newest readable checkpoint model_0000001.pth"
    assert expected in (run_dir / "log.txt").read_text()
    assert _steps(run_dir) == [0, 1, 2, 3, 4]
    # The damaged file was replaced by this run's own iteration-3 checkpoint; retention kept two.
    assert torch.load(run_dir / "model_0000003.pth", weights_only=True)["iteration"] == 3
    assert sorted(p.name for p in run_dir.glob("*.pth")) == ["model_0000001.pth", "model_0000003.pth",
                                                             "model_final.pth"]


def test_no_readable_checkpoint_is_one_line_and_a_failed_mlflow_run(trained, tmp_path, mlflow_uri, capsys):
    """
    Both kept checkpoints damaged: exit 1 with one line naming each and saying how to start again;
    the MLflow run (created by this attempt) is FAILED, not left RUNNING. On the code before this
    change (where only ``trainer.train()`` marked runs FAILED) it failed: a torch traceback.
    """
    run_dir = _unfinished(trained, tmp_path / "run")
    _truncate(run_dir / "model_0000003.pth")
    (run_dir / "model_0000001.pth").write_bytes(b"")
    with pytest.raises(SystemExit) as exc:
        _train(trained, run_dir)
    assert exc.value.code == 1
    assert _error_lines(capsys) == [
        f"error: {run_dir / 'model_0000003.pth'}: damaged (truncated or incomplete checkpoint archive); "
        f"{run_dir / 'model_0000001.pth'}: damaged (empty file); no readable checkpoint left to resume from: "
        f"remove {run_dir} to train this run again from the start"]
    assert _status(mlflow_uri, run_dir) == "FAILED"


@pytest.mark.parametrize("damage, what", [
    ("deleted", "missing (no final weights although training finished (train_done.json)); remove {d} and "
                "train the run again"),
    ("truncated", "damaged (truncated or incomplete checkpoint archive)"),
])
def test_evaluate_without_readable_final_weights_is_one_line(trained, tmp_path, capsys, damage, what):
    """``evaluate`` on a finished run whose ``model_final.pth`` is gone or damaged: exit 1, one
    line naming the file. Deliberate break tried: CheckpointError not caught in ``evaluate.main`` ->
    a traceback, both cases failed; before this change: ``Checkpoint ... not found!`` traceback."""
    run_dir = _copy(trained, tmp_path / "run")
    final = run_dir / "model_final.pth"
    final.unlink() if damage == "deleted" else _truncate(final)
    with pytest.raises(SystemExit) as exc:
        ev.main(["--run-dir", str(run_dir)])
    assert exc.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {final}: {what.format(d=run_dir)}"]


# --- 3. a full disk -----------------------------------------------------------------------------

def test_a_full_disk_is_one_line_leaves_no_temp_file_and_a_rerun_resumes(trained, tmp_path, mlflow_uri, capsys,
                                                                         monkeypatch):
    """
    ``fsync`` of a checkpoint's temporary file fails with ENOSPC (what a full disk gives on a
    delayed-allocation filesystem): exit 1 with ``no space left on device writing <file> (<n> MB
    needed)``, n the final weights' tensor bytes (summed here from the trained run's file: numel x
    element size), the ``.tmp`` removed, the MLflow run FAILED; with space again, a rerun resumes
    from iteration 3's checkpoint. Deliberate break tried: the ``os.remove(tmp)`` dropped -> a
    ``model_final.pth.tmp`` stayed, the test failed.
    """
    run_dir = _unfinished(trained, tmp_path / "run")
    real_fsync = os.fsync

    def full_disk(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".pth.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(SystemExit) as exc:
        _train(trained, run_dir)
    assert exc.value.code == 1
    final = torch.load(trained["run_dir"] / "model_final.pth", weights_only=True)["model"]
    mb = sum(t.numel() * t.element_size() for t in final.values()) / 2 ** 20
    assert _error_lines(capsys) == [
        f"error: no space left on device writing {run_dir / 'model_final.pth'} ({mb:.1f} MB needed)"]
    assert not list(run_dir.glob("*.tmp")) and not (run_dir / "model_final.pth").exists()
    assert _status(mlflow_uri, run_dir) == "FAILED"

    monkeypatch.setattr(os, "fsync", real_fsync)  # space freed
    _train(trained, run_dir)
    assert _done(run_dir)["resumed_from"] == 4
    assert (run_dir / "model_final.pth").is_file() and _status(mlflow_uri, run_dir) == "FINISHED"


# --- 4. two writers -----------------------------------------------------------------------------

_HELD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipeline.runs import train as tr
    release, original = Path(sys.argv[1]), tr.Trainer.run_step

    def held(self):  # the first step waits until the test lets it go
        while not release.exists():
            time.sleep(0.1)
        original(self)

    tr.Trainer.run_step = held
    tr.main(sys.argv[2:])
""")


def test_a_second_writer_waits_for_the_first_and_reuses_its_run(trained, tmp_path):
    """
    Two ``pipeline.runs.train`` processes on one run directory: the second says the directory is in
    use by the first's PID and waits; once the first has finished it finds the run trained. Each
    step is in ``train_metrics.jsonl`` once. Not run on the code before this change (no lock there:
    the waiting line never appears, and the test would fail at its 180 s deadline).
    """
    run_dir, release = tmp_path / "shared", tmp_path / "release"
    args = ["--params", str(trained["params_file"]), "--run-dir", str(run_dir), "--no-track"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    first = subprocess.Popen([sys.executable, "-c", _HELD, str(release), *args], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        deadline = time.time() + 180
        while not (run_dir / tr.PID_FILE).is_file():  # the first holds the lock
            assert time.time() < deadline and first.poll() is None, first.stderr.read()
            time.sleep(0.2)
        second_err = tmp_path / "second.err"
        with open(second_err, "w") as err:
            second = subprocess.Popen([sys.executable, "-m", "pipeline.runs.train", *args], cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=err)
        waiting = f"run dir {run_dir} is in use by PID {first.pid}; waiting for it to finish"
        while waiting not in second_err.read_text():
            assert time.time() < deadline and second.poll() is None, second_err.read_text()
            time.sleep(0.2)
        release.touch()
        assert first.wait(timeout=300) == 0, first.stderr.read()
        assert second.wait(timeout=300) == 0, second_err.read_text()
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
    assert f"{run_dir}: already trained by the other process; nothing to do" in second_err.read_text()
    assert _steps(run_dir) == [0, 1, 2, 3, 4]
    assert _done(run_dir)["resumed_from"] == 0


# --- 7. a hostile last_checkpoint ---------------------------------------------------------------

class _Payload:
    """A pickle that, when loaded, creates ``marker``: what a file dropped into a run store could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["evil.pkl", "../evil.pkl", "absolute", "model_0000003.pth"])
def test_a_malicious_pickle_is_never_loaded(trained, tmp_path, where):
    """
    A pickle whose payload creates a file, named in ``last_checkpoint`` (a .pkl in the run dir, one
    level up, an absolute path) or put in place of the last checkpoint: the payload does not run
    (no file appears), a warning names what was refused, and the run resumes from a real
    checkpoint. The payload is live: ``pickle.loads`` of the same bytes for another marker creates
    it. On the code before this change the three last_checkpoint cases ran the payload (the marker
    appeared; detectron2 then failed on os.system's return value) and failed.
    """
    run_dir = _unfinished(trained, tmp_path / "store" / "run")
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Payload(live)))
    assert live.exists()

    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Payload(marker), protocol=2)  # torch's own protocol: its refusal names the function
    if where == "model_0000003.pth":
        (run_dir / where).write_bytes(evil)
        warning = (f"{run_dir / where}: holds Python objects, not just weights (posix.system); refusing to load it; "
                   f"resuming from the newest readable checkpoint model_0000001.pth")
        resumed = 2
    else:
        target = {"evil.pkl": run_dir / "evil.pkl", "../evil.pkl": run_dir.parent / "evil.pkl",
                  "absolute": tmp_path / "elsewhere" / "evil.pkl"}[where]
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(evil)
        name = str(target) if where == "absolute" else where
        (run_dir / "last_checkpoint").write_text(name)
        warning = (f"{run_dir / 'last_checkpoint'} names {name!r}, not a checkpoint of this run (only "
                   f"model_<7 digits>.pth in the run directory are loaded); ignored; resuming from the newest "
                   f"readable checkpoint model_0000003.pth")
        resumed = 4
    _train(trained, run_dir, "--no-track")
    assert not marker.exists()
    assert warning in (run_dir / "log.txt").read_text()
    assert _done(run_dir)["resumed_from"] == resumed


# --- 6. evaluating again ------------------------------------------------------------------------

def test_evaluating_again_adds_no_second_identical_metric_entry(trained, tmp_path, mlflow_uri):
    """
    ``evaluate`` twice on one run: each AP metric has one entry in the MLflow run's history (the
    same value at the same step is not logged again); the runtime, measured anew, may differ and
    is logged when it does. On the code before this change bbox/AP had 2 entries: failed.
    """
    from mlflow.tracking import MlflowClient

    from pipeline.runs.tracking import Tracker

    run_dir = _copy(trained, tmp_path / "run")
    Tracker().start(run_dir, "faults", "evaluate-twice", 0, {"seed": 0}, {})
    first = ev.evaluate(run_dir)
    second = ev.evaluate(run_dir)
    assert first["bbox"] == second["bbox"]
    client = MlflowClient(mlflow_uri)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    for key in ("bbox/AP", "bbox/AP50", "eval_images"):  # (APr/APf: null on this split, never logged)
        assert len(client.get_metric_history(run_id, key)) == 1, key
