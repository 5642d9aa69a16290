"""The run store and its MLflow records around a stage: parent runs ended with their rows' summaries."""
import json
from pathlib import Path

import pytest

from pipeline import params as P
from pipeline import stage
from pipeline.launch import StageFailed
from pipeline.runs.evaluate import METRICS_FILE, eval_dir
from pipeline.runs.spec import resolve
from pipeline.runs.tracking import Tracker

# Hand-made results per (loss, seed): box AP, APr, APc, APf and ms per image.
RESULTS = {("softmax", 0): (10.0, 5.0, 8.0, 20.0, 30.0), ("softmax", 1): (14.0, 7.0, 8.0, 21.0, 34.0),
           ("fedloss", 0): (12.0, 9.0, 10.0, 20.0, 31.0), ("fedloss", 1): (13.0, 10.0, 11.0, 21.0, 31.0)}


@pytest.fixture
def study(tmp_path, monkeypatch):
    """A two-row study (softmax, fedloss) of two seeds, a run store and an MLflow sqlite store in
    ``tmp_path``."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stage, "run_store", lambda: tmp_path / "runs")
    params = P.load(P.PARAMS_FILE)
    params.update(seeds=[0, 1], run_studies=["t"], studies={"t": {
        "softmax": {"detector": "centernet2_agnostic", "loss": "softmax"},
        "fedloss": {"detector": "centernet2_agnostic", "loss": "fedloss"}}})
    return {"params": params, "uri": uri}


def fake_jobs(fail_on=None, interrupt=False):
    """Stands in for ``launch.run_all``: each job opens its seed's MLflow run (as training does) and
    'evaluates' to the hand-made RESULTS; a job of loss ``fail_on`` fails, or the wait is interrupted."""

    def run_all(requests, launcher, folder, name="cn2"):
        out = []
        for run_dir, (spec,) in requests:  # one evaluation per run here
            tracker = Tracker(spec.tracking_uri)
            tracker.start(run_dir, spec.study, spec.ablation, spec.seed, {"loss": spec.loss}, {})
            if interrupt:
                raise KeyboardInterrupt
            if spec.loss == fail_on:
                tracker.finish("FAILED")
                raise StageFailed(f"job of {run_dir} failed")
            ap, apr, apc, apf, ms = RESULTS[(spec.loss, spec.seed)]
            metrics = {"bbox": {"AP": ap, "APr": apr, "APc": apc, "APf": apf}, "runtime": {"ms_per_image": ms}}
            eval_dir(run_dir, spec).mkdir(parents=True)
            (eval_dir(run_dir, spec) / METRICS_FILE).write_text(json.dumps(metrics))
            tracker.finish()
            out.append([metrics])
        return out

    return run_all


def _runs(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("t")
    runs = client.search_runs([exp.experiment_id])
    parents = {r.data.tags["cn2.ablation"]: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    return runs, parents


def test_a_stage_ends_its_parent_runs_with_mean_and_std_over_seeds(study, monkeypatch):
    """
    After the stage: no run RUNNING, each row's parent FINISHED with the study json's mean/std.
    By hand, softmax AP (10, 14): mean 12, sample std sqrt(((10-12)^2 + (14-12)^2) / 1) = 2.828;
    APc (8, 8): std 0; runtime (30, 34): 32 ± 2.828. Deliberate break tried: no close_parent in
    stage._execute -> parents RUNNING without metrics; the test failed.
    """
    monkeypatch.setattr(stage, "run_all", fake_jobs())
    out = stage.stage_study(study["params"], "t")
    rows = json.loads(out.read_text())["rows"]
    runs, parents = _runs(study["uri"])
    assert len(runs) == 6 and set(parents) == {"softmax", "fedloss"}
    assert all(r.info.status == "FINISHED" for r in runs)
    for row, parent in parents.items():
        m = parent.data.metrics
        assert m["n_seeds"] == 2
        for key in ("AP", "APr", "APc", "APf"):
            assert m[f"bbox/{key}_mean"] == rows[row]["bbox_mean"][key]["mean"]
            assert m[f"bbox/{key}_std"] == rows[row]["bbox_mean"][key]["std"]
        assert m["runtime_ms_mean"] == rows[row]["runtime_ms"]["mean"]
        assert m["runtime_ms_std"] == rows[row]["runtime_ms"]["std"]
    soft = parents["softmax"].data.metrics
    assert (soft["bbox/AP_mean"], soft["bbox/AP_std"], soft["bbox/APc_std"]) == (12.0, 2.828, 0.0)
    assert (soft["runtime_ms_mean"], soft["runtime_ms_std"]) == (32.0, 2.828)

    # Run again: everything is evaluated already; the same parents are reused and end FINISHED.
    stage.stage_study(study["params"], "t")
    runs_again, parents_again = _runs(study["uri"])
    assert len(runs_again) == 6
    assert {p.info.run_id for p in parents_again.values()} == {p.info.run_id for p in parents.values()}
    assert all(r.info.status == "FINISHED" for r in runs_again)


@pytest.mark.parametrize("interrupt, status", [(False, "FAILED"), (True, "KILLED")])
def test_a_failed_or_interrupted_stage_ends_its_parents_failed_or_killed(study, monkeypatch, interrupt, status):
    """A job that fails ends the parents FAILED, Ctrl-C KILLED; the next, successful run of the
    stage reuses them and ends them FINISHED. Deliberate break tried: ``except KeyboardInterrupt``
    removed -> KILLED case ended FAILED; the test failed."""
    monkeypatch.setattr(stage, "run_all", fake_jobs(fail_on="fedloss", interrupt=interrupt))
    with pytest.raises(KeyboardInterrupt if interrupt else StageFailed):
        stage.stage_study(study["params"], "t")
    _, parents = _runs(study["uri"])
    assert {p.info.status for p in parents.values()} == {status}
    monkeypatch.setattr(stage, "run_all", fake_jobs())
    stage.stage_study(study["params"], "t")
    runs, parents_again = _runs(study["uri"])
    assert {p.info.run_id for p in parents_again.values()} == {p.info.run_id for p in parents.values()}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert parents_again["fedloss"].data.metrics["bbox/AP_mean"] == 12.5


def test_a_changed_evaluation_setting_re_evaluates_without_training(tmp_path, monkeypatch):
    """
    A real (smoke-scale, in-process) study of one run evaluated on 2 images; then eval.max_images: 4
    and the stage again: the run directory is the same (its key leaves ``eval`` out), a second
    evaluation directory appears beside the first, and nothing trains — ``Trainer.train`` is made
    to fail for the second stage, the checkpoints keep their mtimes and the training log its lines.
    Deliberate break tried: ``eval`` back in ``RunSpec.identity`` -> a new run directory trained
    (Trainer.train called); the test failed.
    """
    from pipeline.data.synthetic import SyntheticSpec, generate
    from pipeline.runs import train as tr

    data = tmp_path / "data"
    generate(SyntheticSpec(num_train=20, num_val=6, num_classes=3, image_size=(64, 80), seed=2), data)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stage, "run_store", lambda: tmp_path / "runs")
    params = P.load(P.PARAMS_FILE)
    params.update(scale="smoke", seeds=[0], run_studies=["t"],
                  studies={"t": {"a": {"detector": "centernet2_agnostic", "loss": "fedloss"}}})
    params["data"]["root"] = str(data)
    params["train"].update(max_iter=2, checkpoint_period=1, keep_checkpoints=1, log_period=1, ims_per_batch=2,
                           device="cpu")
    params["eval"] = {"warmup": 0, "max_images": 2}
    params["launcher"] = {**params["launcher"], "cluster": "debug"}
    first = json.loads(stage.stage_study(params, "t").read_text())["rows"]["a"]["seeds"]["seed0"]
    run_dir = Path(first["run_dir"])
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.glob("*.pth")}
    log = (run_dir / tr.METRICS_LOG).read_text()
    assert sorted(before) == ["model_0000001.pth", "model_final.pth"] and len(log.splitlines()) == 2

    def no_training(self):
        raise AssertionError("trained again")

    monkeypatch.setattr(tr.Trainer, "train", no_training)
    params["eval"]["max_images"] = 4
    second = json.loads(stage.stage_study(params, "t").read_text())["rows"]["a"]["seeds"]["seed0"]
    assert second["run_dir"] == first["run_dir"]
    assert (first["images"], second["images"]) == (2, 4)
    assert second["eval_dir"] != first["eval_dir"]
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == sorted(
        Path(e).name for e in (first["eval_dir"], second["eval_dir"]))
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.glob("*.pth")} == before
    assert (run_dir / tr.METRICS_LOG).read_text() == log
    assert json.loads((Path(second["eval_dir"]) / METRICS_FILE).read_text())["images"]["count"] == 4


def test_progress_lines_are_read_from_the_runs_files(tmp_path):
    """
    Four runs in four states, from hand-written files: training (its progress.json), evaluating
    (trained, the evaluation's progress.json), done (metrics.json) and not started. Expected lines
    by hand: ETA 35 s = 0:00:35, loss 1.23456 to 4 significant digits = 1.235. Deliberate break
    tried: ``run_status`` not checking ``train_done.json`` first -> B showed its stale training
    line; the test failed.
    """
    from pipeline.runs.progress import render

    runs = {name: (tmp_path / name, tmp_path / name / "eval" / "val-all-x") for name in "ABCD"}
    for _, ev_dir in runs.values():
        ev_dir.mkdir(parents=True)
    (runs["A"][0] / "progress.json").write_text(json.dumps(
        {"iter": 30, "max_iter": 100, "loss": 1.23456, "sec_per_iter": 0.5, "eta_s": 35.0}))
    (runs["B"][0] / "progress.json").write_text(json.dumps(
        {"iter": 100, "max_iter": 100, "loss": 1.0, "sec_per_iter": 0.5, "eta_s": 0.0}))
    (runs["B"][0] / "train_done.json").write_text("{}")
    (runs["B"][1] / "progress.json").write_text(json.dumps({"evaluating": 7, "of": 100}))
    (runs["C"][0] / "train_done.json").write_text("{}")
    (runs["C"][1] / METRICS_FILE).write_text("{}")
    jobs = [(f"row{name} seed0", run_dir, [ev_dir]) for name, (run_dir, ev_dir) in runs.items()]
    assert render(jobs) == ["1/4 runs done",
                            "  rowA seed0: iter 30/100  loss 1.235  ETA 0:00:35",
                            "  rowB seed0: evaluating 7/100",
                            "  rowD seed0: waiting to start"]


def test_progress_hook_writes_iteration_loss_and_eta(tmp_path):
    """detectron2's storage after 4 of 10 iterations, 0.5 s each from the second on (the timer skips
    warm-up): ETA = 0.5 s x 6 iterations left = 3 s. Deliberate break tried: ``max_iter - it - 1``
    -> eta 2.5; the test failed."""
    from types import SimpleNamespace

    from detectron2.utils.events import EventStorage

    from pipeline.runs.train import ProgressFile

    hook = ProgressFile(tmp_path / "progress.json", every=0)
    with EventStorage(0) as storage:
        hook.trainer = SimpleNamespace(max_iter=10, storage=storage, iter=0)
        for it in range(4):
            storage.iter = hook.trainer.iter = it
            storage.put_scalar("total_loss", 2.0 - it / 10)
            if it:
                storage.put_scalar("time", 0.5)
            hook.after_step()
    assert json.loads((tmp_path / "progress.json").read_text()) == {
        "iter": 4, "max_iter": 10, "loss": 1.7, "sec_per_iter": 0.5, "eta_s": 3.0}


def test_progress_display_on_a_terminal_and_in_a_log(tmp_path):
    """Plain lines (not a terminal) at most every ``plain_every`` seconds, each with a time stamp;
    on a terminal a rich live view showing the same lines."""
    import io

    from rich.console import Console

    from pipeline.runs.progress import StageProgress

    spec = resolve(P.load(P.PARAMS_FILE), seed=0, row="rowA")
    run_dir = tmp_path / "A"
    run_dir.mkdir()
    (run_dir / "progress.json").write_text(json.dumps(
        {"iter": 3, "max_iter": 9, "loss": 2.0, "sec_per_iter": None, "eta_s": None}))
    log = io.StringIO()
    shown = StageProgress([(run_dir, [spec])], plain_every=3600, console=Console(file=log, force_terminal=False))
    shown.update()
    shown.update()  # too soon: nothing more
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].endswith("progress] 0/1 runs done")
    assert lines[1].endswith("progress]   rowA seed0: iter 3/9  loss 2  ETA ?")
    tty = io.StringIO()
    live = StageProgress([(run_dir, [spec])], console=Console(file=tty, force_terminal=True, width=100))
    live.update()
    live.close()
    assert "rowA seed0: iter 3/9  loss 2  ETA ?" in tty.getvalue() and "\x1b[" in tty.getvalue()


def test_a_sqlite_store_keeps_its_artifacts_beside_it_not_in_the_repository(tmp_path, monkeypatch):
    """Artifacts of a store in ``tmp_path`` land in ``tmp_path/mlruns``; the repository's own
    ``mlruns/`` gets nothing. Break tried: artifacts under ``repo_root()/mlruns`` as before (every
    test store wrote into the checkout): the second assertion failed."""
    from pipeline.params import ROOT

    study = "artifacts_beside_store_test"
    (tmp_path / "store").mkdir()
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = Tracker(uri)
    tracker.start(tmp_path / "run", study, "row", 0, {}, {})
    note = tmp_path / "note.txt"
    note.write_text("x")
    tracker.log_final({"AP": 1.0}, 0, [note])
    assert list((tmp_path / "store" / "mlruns" / study).rglob("note.txt"))
    assert not (ROOT / "mlruns" / study).exists()


def test_a_new_recipe_version_trains_anew_instead_of_reusing_the_store(tmp_path, monkeypatch):
    """
    The run store keys runs by their settings; ``model.presets.RECIPE`` is one of them, so the same
    params under a changed recipe (model or training code) get a new run directory, and a run
    directory written before the version existed (run.json without ``recipe``) is refused rather
    than resumed or evaluated as if it were current.
    Deliberate break tried: ``recipe`` left out of ``RunSpec.identity`` -> same key, test failed.
    """
    from dataclasses import asdict

    from detectron2.config import get_cfg

    import model.presets as presets
    from pipeline.runs.spec import RunSpec
    from pipeline.runs.train import prepare_run_dir

    params = P.load(P.PARAMS_FILE)
    spec = resolve(params)
    assert spec.recipe == presets.RECIPE
    monkeypatch.setattr(presets, "RECIPE", presets.RECIPE + 1)
    bumped = resolve(params)
    assert bumped.recipe == presets.RECIPE and bumped.key() != spec.key()

    run_dir = tmp_path / "run"
    prepare_run_dir(run_dir, bumped, get_cfg())
    assert RunSpec.from_json((run_dir / "run.json").read_text()).identity() == bumped.identity()
    older = {k: v for k, v in asdict(bumped).items() if k != "recipe"}
    (run_dir / "run.json").write_text(json.dumps(older))
    with pytest.raises(P.ParamError, match="holds a run with other settings"):
        prepare_run_dir(run_dir, bumped, get_cfg(), starting=False)
