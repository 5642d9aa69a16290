"""python -m pipeline.report.reference: a user's run tested cell by cell against a reference snapshot."""
import copy
import json
import math

import pytest
import yaml

from pipeline import params as P
from pipeline.report import reference as R


def _params(**eval_overrides):
    params = P.load(P.PARAMS_FILE)
    params["eval"].update(eval_overrides)
    return params


def test_the_params_a_dvc_exp_run_command_sets():
    cmd = ("dvc exp run -S 'seeds=[0,1,2]' -S eval.max_images=null --set-param=train.max_iter=3000 "
           "-S params.yaml:loss=eql --queue")
    assert R.dvc_overrides(cmd) == ["seeds=[0,1,2]", "eval.max_images=null", "train.max_iter=3000", "loss=eql"]
    assert R.dvc_overrides("dvc repro") == []
    with pytest.raises(ValueError, match="sets a key of other.yaml"):
        R.dvc_overrides("dvc exp run -S other.yaml:x=1")


def test_settings_apply_the_overrides_to_the_commits_params():
    base = _params()
    recorded = R.settings(base, "dvc exp run -S 'seeds=[0,1,2]' -S eval.max_images=null", "abc", 3)
    assert recorded["params"]["seeds"] == [0, 1, 2] and recorded["params"]["eval"]["max_images"] is None
    assert recorded["recipe"] == 3 and recorded["commit"] == "abc"
    assert base["seeds"] == P.load(P.PARAMS_FILE)["seeds"]  # the input is not modified
    # The file is committed: a tracking URI's credentials stay out (https://user:secret@host/x -> host/x).
    recorded = R.settings(base, "dvc exp run -S tracking.uri=https://user:secret@host/x", "abc", 3)
    assert recorded["params"]["tracking"]["uri"] == "https://host/x" and "secret" not in json.dumps(recorded)
    assert recorded["command"] == "dvc exp run -S tracking.uri=https://host/x"
    # A password holding "@": the host is what follows the last one (tracking.redact_uri's rule).
    assert R.redact_command("dvc exp run -S 'tracking.uri=https://u:p@ss@host:5000/x'") == \
        "dvc exp run -S 'tracking.uri=https://host:5000/x'"


def test_welch_from_the_cells_mean_std_and_n():
    # 20.0 ± 0.5 vs 17.0 ± 0.5, n = 3 each: t = 3 / sqrt(0.25/3 + 0.25/3) = 7.348, Welch's df = 4
    # (equal variances and n); two-sided p = 2 * P(T_4 > 7.348) = 0.0018.
    r = R.cell_test({"mean": 20.0, "std": 0.5, "n": 3}, {"mean": 17.0, "std": 0.5, "n": 3})
    t = 3 / math.sqrt(0.25 / 3 * 2)
    assert t == pytest.approx(7.348, abs=1e-3)
    # T_4's survival function in closed form: P(T_4 > t) = 1/2 - t (t^2 + 6) / (2 (t^2 + 4)^1.5)
    p = 2 * (0.5 - t * (t * t + 6) / (2 * (t * t + 4) ** 1.5))
    assert r["p"] == pytest.approx(p, rel=1e-6) and r["p"] == pytest.approx(0.0018, abs=1e-4)
    assert r["diff"] == 3.0 and r["verdict"] == "differs"
    # 17.5 vs 17.0: t = 1.2247, p = 0.288: consistent.
    r = R.cell_test({"mean": 17.5, "std": 0.5, "n": 3}, {"mean": 17.0, "std": 0.5, "n": 3})
    assert r["p"] == pytest.approx(0.2879, abs=1e-4) and r["verdict"] == "consistent"
    assert R.cell_test({"mean": 17.0, "std": 0.9, "n": 2}, {"mean": 17.0, "std": 0.5, "n": 3})["verdict"] == "same"
    assert R.cell_test({"mean": 7.3, "std": 0.0, "n": 1}, {"mean": 7.0, "std": 0.0, "n": 1})["verdict"] == "n/a"
    assert R.cell_test({"mean": 7.3, "std": 0.0, "n": 3}, {"mean": 7.0, "std": 0.0, "n": 3})["verdict"] == "n/a"


def test_only_settings_that_change_the_numbers_are_listed_row_by_row():
    ref = _params(max_images=None)
    ref["seeds"] = [0, 1, 2]
    yours = _params(max_images=100)
    yours["launcher"]["parallel"] = 7           # how jobs run: not a difference
    yours["train"]["checkpoint_period"] = 10    # nor how often they checkpoint
    yours["studies"]["table1"]["cascadercnn_coco"]["data"] = {"annotations": "lvis"}  # one row's own
    diffs = R.row_differences(yours, ref, "table1")
    assert diffs["centernet"] == [("eval.max_images", 100, None)]
    assert diffs["cascadercnn_coco"] == [("data.annotations", "lvis", "coco"), ("eval.max_images", 100, None)]
    assert R.row_differences(ref, copy.deepcopy(ref), "table1")["centernet"] == []


def _summary(ap_cascade, std=0.78):
    row = {"AP": ap_cascade, "AP_std": std, "AP_n": 3, "APr": 6.419, "APr_std": 1.702, "APr_n": 3}
    return {"table1": {"cascadercnn": row,
                       "centernet2_agnostic": {"AP": 20.4, "AP_std": 0.77, "AP_n": 3},
                       "cascadercnn_coco": {"AP": 10.53, "AP_std": 0.0, "AP_n": 1}},
            "table2": {}, "table3": {}}


@pytest.fixture
def snapshot(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    ref_params = _params(max_images=None)
    ref_params["run_studies"] = ["table1"]
    (ref / "summary.json").write_text(json.dumps(_summary(17.0)))
    (ref / "settings.json").write_text(json.dumps(
        R.settings(ref_params, "dvc exp run -S 'seeds=[0,1,2]'", "c" * 40, 3)))
    return ref


def _run(tmp_path, snapshot, summary, capsys, **eval_overrides):
    params = _params(**eval_overrides)
    params["seeds"] = [0, 1, 2]
    params["run_studies"] = ["table1"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "vs.md"
    R.main(["--reference", str(snapshot), "--summary", str(tmp_path / "summary.json"),
            "--params", str(tmp_path / "params.yaml"), "--out", str(out)])
    return out.read_text(), capsys.readouterr().out


def test_a_run_like_the_reference_is_the_same_and_a_changed_cell_differs(tmp_path, snapshot, capsys):
    md, printed = _run(tmp_path, snapshot, _summary(17.0), capsys, max_images=None)
    assert "table1: 4 cells, 4 same; same settings" in printed
    assert "Settings that differ" not in md and "Seeds:" not in md

    md, printed = _run(tmp_path, snapshot, _summary(20.0, std=0.5), capsys, max_images=None)
    # 20.0 ± 0.5 vs 17.0 ± 0.78 (n = 3 each): t = 3 / sqrt(0.25/3 + 0.6084/3) = 5.61, Welch's
    # df = 0.2861^2 / (0.0833^2/2 + 0.2028^2/2) = 3.41, p = 0.0079 (T_3 gives 0.011, T_4 0.005).
    assert "table1: 4 cells, 3 same, 1 differs (cascadercnn AP +3.00); same settings" in printed
    assert "| cascadercnn | AP | 20.00 ± 0.50 (n=3) | 17.00 ± 0.78 (n=3) | +3.00 | 0.00791 | differs |" in md
    assert md.index("| cascadercnn | AP |") < md.index("| cascadercnn | APr |") \
        < md.index("| centernet2_agnostic | AP |") < md.index("| cascadercnn_coco | AP |")  # params.yaml's order


def test_other_settings_are_named_beside_the_cells(tmp_path, snapshot, capsys):
    md, printed = _run(tmp_path, snapshot, _summary(17.5), capsys, max_images=100)
    assert "settings differ: eval.max_images" in printed
    assert "Settings that differ in every row (yours; reference): `eval.max_images` 100; null." in md
    assert "| consistent (settings differ) |" in md


def test_a_snapshot_without_settings_is_one_clear_error(tmp_path, snapshot, capsys):
    (snapshot / "settings.json").unlink()
    with pytest.raises(SystemExit):
        _run(tmp_path, snapshot, _summary(17.0), capsys)
    err = capsys.readouterr().err
    assert f"{snapshot / 'settings.json'}: not found" in err and "tools/snapshot_reference.py" in err
