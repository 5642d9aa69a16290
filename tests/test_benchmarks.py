"""The benchmark scripts run and report what they measured (speed itself is not asserted)."""
import importlib.util
import json

from pipeline.params import ROOT


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_speed_times_each_detector_and_projects_its_schedule(tmp_path):
    bench = _load("train_speed")
    out = tmp_path / "speed.json"
    bench.main(["--scale", "smoke", "--batch", "1", "--iters", "1", "--classes", "3", "--schedule", "50",
                "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["centernet", "cascadercnn", "centernet2_specific", "centernet2_agnostic"]
    for row in rows.values():
        assert row["s_per_iter"] > 0 and row["schedule_iters"] == 50
        assert abs(row["hours_per_run"] - row["s_per_iter"] * 50 / 3600) < 0.01


def test_train_speed_table3_rows_are_the_training_steps():
    bench = _load("train_speed")
    rows = dict(bench._rows("smoke", "cpu", 3, table3=True))
    # tta trains nothing (its row evaluates the previous row's weights): no training row for it.
    assert list(rows) == ["centernet2_agnostic+fedloss", "+mask", "+sched2x", "+fpn_p2p6", "+x101", "+dcn",
                          "+pointrend", "+larger_input"]
    assert rows["+sched2x"].SOLVER.MAX_ITER == 2 * rows["+mask"].SOLVER.MAX_ITER
    assert rows["+larger_input"].MODEL.RESNETS.DEFORM_ON_PER_STAGE == [False, True, True, True]
