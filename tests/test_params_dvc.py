"""
Which params each stage reads: study rows set their own detector, loss and switches, and dvc.yaml
lists for every stage exactly the params its code reads, so a changed knob re-runs exactly the
stages it changes (no training: the stages' inputs are derived, DVC only compares params).
"""
import copy
import json
import shutil
from dataclasses import asdict

import pytest
import yaml

from pipeline import params as P
from pipeline.data import prepare
from pipeline.report import aggregate
from pipeline.runs import pretrain
from pipeline.runs.spec import resolve, study_specs
from pipeline.runs.tracking import tracking_uri

# One change per line: a dotted params key and a valid new value; each table1-3 row named here
# exists in params.yaml.
CHANGES = {
    "data.name": "coco_2017",
    "data.root": "/elsewhere",
    "data.annotations": "coco",
    "data.synthetic.seed": 1,
    "scale": "smoke",
    "detector": "centernet",
    "loss": "eql",
    "seeds": [0],
    "switches": ["mask"],
    "train.max_iter": 7,
    "train.precision": "bfloat16",
    "pretrain.max_iter": 7,
    "eval.max_images": 7,
    "tracking.uri": "sqlite:////elsewhere/mlflow.db",
    "launcher.parallel": 1,
    "run_studies": ["table1"],
    "studies.table1.centernet.seeds": [0],
    "studies.table2.cascadercnn_eql.seeds": [0],
    "studies.table3.mask.seeds": [0],
}
TRAINING = {"main", "study@table1", "study@table2"}
# The stages each change makes stale, worked out from what each stage's code reads: prepare the
# data section but the label choice (it writes both label sets); main its own detector, loss and
# switches and everything a run depends on or is launched or tracked with; a study the same but
# detector, loss and switches (its rows set those) plus its own rows; aggregate the seeds, the
# studies and which are run, and the scale and dataset name its table headers print; report the
# seeds, studies and which are run (for the same rows as the tables) and the MLflow store it lists
# runs from.
STALE = {
    "data.name": {"prepare", "pretrain", *TRAINING, "aggregate"},
    "data.root": {"prepare", "pretrain", *TRAINING},
    "data.annotations": TRAINING,
    "data.synthetic.seed": {"prepare", *TRAINING},
    "scale": {"pretrain", *TRAINING, "aggregate"},
    "detector": {"main"},
    "loss": {"main"},
    "seeds": {*TRAINING, "aggregate", "report"},
    "switches": {"main"},
    "train.max_iter": TRAINING,
    "train.precision": TRAINING,
    "pretrain.max_iter": {"pretrain", *TRAINING},
    "eval.max_images": TRAINING,
    "tracking.uri": {*TRAINING, "report"},
    "launcher.parallel": TRAINING,
    "run_studies": {"aggregate", "report"},  # and study@table2 is no longer a stage
    "studies.table1.centernet.seeds": {"study@table1", "aggregate", "report"},
    "studies.table2.cascadercnn_eql.seeds": {"study@table2", "aggregate", "report"},
    "studies.table3.mask.seeds": set(),  # table3 is not in run_studies: nothing reads its rows
}
# DVC compares `studies` as one param, so a row of a study outside run_studies re-runs the two
# report stages, which then write the same files: the one place DVC re-runs more than the code reads.
DVC_STALE = {**STALE, "studies.table3.mask.seeds": {"aggregate", "report"}}


def _changed(params, key):
    out = copy.deepcopy(params)
    node, (*path, last) = out, key.split(".")
    for part in path:
        node = node[part]
    node[last] = CHANGES[key]
    return out


def test_study_rows_set_their_own_detector_loss_and_switches():
    """
    With the main experiment at cascadercnn + eql + [mask], Table 1's rows keep their own detector
    and loss and no switches, Table 3's rows exactly the switches they list; what rows do inherit
    (seeds, train, data key by key) they still inherit. Break tried: the old merge of each row into
    all of the top-level params (Table 1's centernet row got [mask]); this test failed on it.
    """
    params = {**P.load(), "detector": "cascadercnn", "loss": "eql", "switches": ["mask"], "seeds": [3, 4],
              "train": {**P.load()["train"], "max_iter": 9}}
    rows = P.study_rows(params, "table1")
    assert (rows["centernet"]["detector"], rows["centernet"]["loss"], rows["centernet"]["switches"]) == (
        "centernet", "softmax", [])
    assert rows["centernet"]["seeds"] == [3, 4] and rows["centernet"]["train"]["max_iter"] == 9
    assert rows["centernet_coco"]["seeds"] == [0]
    assert rows["centernet_coco"]["data"] == {**params["data"], "annotations": "coco"}
    table3 = P.study_rows(params, "table3")
    assert table3["baseline"]["switches"] == [] and table3["mask"]["switches"] == ["mask"]
    assert table3["sched2x"]["switches"] == ["mask", "sched2x"]
    specs = study_specs(params, "table1")["centernet"]
    assert [(s.detector, s.loss, s.switches, s.seed) for s in specs] == [
        ("centernet", "softmax", [], 3), ("centernet", "softmax", [], 4)]


def test_run_fallbacks_are_params_yaml_defaults():
    """A run whose params leave out log_period, keep_checkpoints or final_dtype (the tests' partial
    params) behaves as params.yaml's defaults say; editing either alone fails here."""
    assert {key: P.load()["train"][key] for key in P.TRAIN_RUN_DEFAULTS} == P.TRAIN_RUN_DEFAULTS


def _fake_results(params, root):
    """Hand-made results for every row of every study, seeds 0 and 1 (AP 10 + row index + seed)."""
    (root / "results" / "studies").mkdir(parents=True)
    for study, rows in params["studies"].items():
        payload = {"study": study, "rows": {
            name: {"seeds": {f"seed{s}": {"bbox": {"AP": 10.0 + i + s, "APr": 1.0 + s}, "segm": None,
                                          "runtime_ms": 5.0 + s, "mlflow_run_id": f"{name}-{s}"} for s in (0, 1)}}
            for i, name in enumerate(rows)}}
        (root / "results" / "studies" / f"{study}.json").write_text(json.dumps(payload))


def _stage_inputs(params):
    """What each stage's code takes from ``params``, as text (in the working directory's results)."""
    launcher = json.dumps(params.get("launcher"), sort_keys=True)
    out = {"prepare": repr(prepare.data_settings(params)),
           "pretrain": json.dumps(pretrain.stage_settings(params), sort_keys=True),
           "main": json.dumps([asdict(resolve(params, seed=s)) for s in params["seeds"]], sort_keys=True) + launcher}
    for study in params["run_studies"]:
        specs = {row: [asdict(s) for s in ss] for row, ss in study_specs(params, study).items()}
        out[f"study@{study}"] = json.dumps(specs, sort_keys=True) + launcher
    shutil.rmtree("reports", ignore_errors=True)
    aggregate.aggregate(params)
    out["aggregate"] = "".join(p.read_text() for p in sorted(aggregate.REPORTS.glob("*.*")))
    out["report"] = json.dumps(aggregate.collect(params), sort_keys=True) + tracking_uri(P.get(params, "tracking.uri"))
    return out


def test_each_change_reaches_exactly_the_stages_in_the_table(tmp_path, monkeypatch):
    """
    The stages' own code decides: a stage is stale when what it takes from params (its runs'
    settings and launcher; the tables and summaries it writes from fixed results; the data settings)
    differs after the change. Break tried: the old study-row merge (a switches change reached both
    studies); this test failed on it.
    """
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # it would override tracking.uri
    monkeypatch.chdir(tmp_path)
    params = P.load()
    _fake_results(params, tmp_path)
    base = _stage_inputs(params)
    derived = {}
    for key in CHANGES:
        changed = _stage_inputs(_changed(params, key))
        derived[key] = {stage for stage, text in changed.items() if base.get(stage) != text}
    assert derived == STALE


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    """dvc.yaml and params.yaml in a DVC project of their own, every dependency and output a
    placeholder, committed: ``dvc status`` then reports only what a params change does."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    root = tmp_path_factory.mktemp("dvcparams")
    shutil.copy(P.ROOT / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(P.load(), sort_keys=False))
    Repo.init(str(root), no_scm=True)
    (root / ".dvc" / "config").write_text("[core]\n    no_scm = true\n    analytics = false\n"
                                          "    check_update = false\n")
    with pytest.MonkeyPatch.context() as mp, Repo(str(root)) as repo:
        mp.chdir(root)  # DVC resolves paths from the working directory
        for stage in repo.index.stages:
            for item in [*stage.deps, *stage.outs]:
                if isinstance(item, ParamsDependency):
                    continue
                path = root / item.def_path
                if path.suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("placeholder")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "placeholder").write_text("placeholder")
        repo.commit(force=True)
    return root


def _dvc_stale(root):
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {stage.addressing for stage in repo.index.stages
                if any(d.status() for d in stage.deps if isinstance(d, ParamsDependency))}


def test_dvc_yaml_makes_exactly_the_stages_in_the_table_stale(dvc_repo, monkeypatch):
    """Each change written into params.yaml in turn, ``dvc status``'s params check per stage.
    Break tried: dvc.yaml's study stage without ``tracking`` (tracking.uri reached main and report
    only); this test failed on it."""
    monkeypatch.chdir(dvc_repo)
    params = yaml.safe_load((dvc_repo / "params.yaml").read_text())
    assert _dvc_stale(dvc_repo) == set()
    found = {}
    try:
        for key in CHANGES:
            (dvc_repo / "params.yaml").write_text(yaml.safe_dump(_changed(params, key), sort_keys=False))
            found[key] = _dvc_stale(dvc_repo)
    finally:
        (dvc_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert found == DVC_STALE
