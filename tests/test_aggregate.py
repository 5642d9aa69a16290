"""Seed statistics of the aggregate stage: mean, std, Welch's p-value and the "holds" rule, on
hand-made study results (no training)."""
import json

import pytest

from pipeline.report import aggregate

# One study, four rows; each seed's box AP (APr the same numbers). Row a has a result for seed 2 on
# disk, but params list seeds [0, 1] for it: that result must be ignored.
AP = {"a": {0: 20.0, 1: 22.0, 2: 99.0}, "b": {0: 10.0, 1: 11.0, 2: 15.0}, "c": {0: 21.0, 1: 25.0},
      "d": {0: 30.0}}
SEEDS = {"a": [0, 1], "b": [0, 1, 2], "c": [0, 1], "d": [0]}
PAPER = {
    "t": {"a": {"AP": 25.0, "APr": 10.0}, "b": {"AP": 20.0, "APr": 15.0}},
    "comparisons": {"t": [["a", "b", "AP"], ["a", "b", "APr"], ["c", "a", "AP"], ["d", "a", "AP"],
                          ["a", "b", "APc"]]},
}


@pytest.fixture
def summary(tmp_path, monkeypatch):
    rows = {name: {"detector": "centernet", "loss": "softmax", "seeds": SEEDS[name]} for name in AP}
    params = {"seeds": [0, 1], "studies": {"t": rows}, "run_studies": ["t"]}
    results = {"study": "t", "rows": {
        name: {"seeds": {f"seed{s}": {"bbox": {"AP": v, "APr": v, "APc": v}, "segm": None, "runtime_ms": 5.0 + s,
                                      "mlflow_run_id": f"{name}{s}"} for s, v in values.items()}}
        for name, values in AP.items()}}
    (tmp_path / "results" / "studies").mkdir(parents=True)
    (tmp_path / "results" / "studies" / "t.json").write_text(json.dumps(results))
    monkeypatch.chdir(tmp_path)
    return aggregate.collect(params)


def test_mean_and_sample_std_over_two_and_three_seeds(summary):
    """
    a, seeds [0, 1]: 20, 22 -> mean 21, std = sqrt(((20-21)^2 + (22-21)^2) / (2-1)) = sqrt(2) = 1.414
    (seed 2's 99 is not a listed seed). b, seeds [0, 1, 2]: 10, 11, 15 -> mean 12, std = sqrt((4 + 1
    + 9) / 2) = sqrt(7) = 2.646. One seed: std 0. Breaks tried, each failed this test: population
    std (ddof=0: 1.0 and 2.160) and reading every seed on disk (a's mean 47).
    """
    t = summary["t"]
    assert t["a"]["AP"] == {"mean": 21.0, "std": 1.414, "n": 2, "values": [20.0, 22.0]}
    assert t["b"]["AP"] == {"mean": 12.0, "std": 2.646, "n": 3, "values": [10.0, 11.0, 15.0]}
    assert t["d"]["AP"] == {"mean": 30.0, "std": 0.0, "n": 1, "values": [30.0]}
    assert t["a"]["runtime_ms"]["mean"] == 5.5 and t["b"]["runtime_ms"]["std"] == 1.0
    assert t["a"]["mlflow_run_ids"] == {"seed0": "a0", "seed1": "a1"}
    assert t["a"]["mask_AP"]["n"] == 0  # no segm results: no mask statistics


def test_welch_p_value_and_the_holds_rule(summary):
    """
    a vs b (AP): diff 21 - 12 = 9; Welch t = 9 / sqrt(2/2 + 7/3) = 4.9295 with Welch-Satterthwaite
    df = (1 + 7/3)^2 / (1^2/1 + (7/3)^2/2) = 2.985, two-sided p = 0.016191 (scipy.stats.ttest_ind
    (equal_var=False), run once by hand; Student's pooled test would give 0.023589).
    Holds: the report's a - b is +5 (same sign) and p < 0.05 -> yes. On APr the report's a - b is
    -5: same p, opposite sign -> no. c vs a: diff +2, p = 0.493133 (21, 25 vs 20, 22) -> no,
    although the report has no value (no sign to match). d (one seed) vs a: no p, holds n/a.
    a vs b on APc, which the report lacks: p alone decides -> yes.
    Breaks tried, each failed this test: equal_var=True (p 0.023589), holds ignoring the sign,
    holds ignoring p.
    """
    out = {(c["a"], c["b"], c["metric"]): c for c in aggregate.compare(summary, PAPER)["t"]}
    ab = out[("a", "b", "AP")]
    assert ab["diff"] == 9.0 and ab["paper_diff"] == 5.0 and ab["n"] == [2, 3]
    assert ab["p"] == pytest.approx(0.016191280760738915, rel=1e-9)
    assert ab["holds"] is True
    flipped = out[("a", "b", "APr")]
    assert flipped["paper_diff"] == -5.0 and flipped["p"] == pytest.approx(0.016191280760738915, rel=1e-9)
    assert flipped["holds"] is False
    ca = out[("c", "a", "AP")]
    assert ca["diff"] == 2.0 and ca["paper_diff"] is None
    assert ca["p"] == pytest.approx(0.49313270812084714, rel=1e-9) and ca["holds"] is False
    da = out[("d", "a", "AP")]
    assert da["diff"] == 9.0 and da["n"] == [1, 2] and da["p"] is None and da["holds"] is None
    no_paper = out[("a", "b", "APc")]
    assert no_paper["paper_diff"] is None and no_paper["holds"] is True


def test_a_study_left_out_of_run_studies_is_not_run_even_with_an_old_results_file(tmp_path, monkeypatch):
    """`dvc exp run -S 'run_studies=[table2]' -S eval.detections_per_image=10` re-scores Table 2 only:
    Table 1's results file from an earlier run (300 per image) must not appear in its tables as if it
    were this run's. Seen in a reference re-scoring: its table1.md said "Not run" above the old numbers."""
    rows = {"a": {"detector": "centernet", "loss": "softmax", "seeds": [0]}}
    (tmp_path / "results" / "studies").mkdir(parents=True)
    (tmp_path / "results" / "studies" / "old.json").write_text(json.dumps({"study": "old", "rows": {
        "a": {"seeds": {"seed0": {"bbox": {"AP": 30.0}, "segm": None, "runtime_ms": 5.0}}}}}))
    monkeypatch.chdir(tmp_path)
    params = {"seeds": [0], "studies": {"old": rows}, "run_studies": []}
    assert aggregate.collect(params) == {"old": {"a": None}}
    assert aggregate.collect({**params, "run_studies": ["old"]})["old"]["a"]["AP"]["values"] == [30.0]
    table = aggregate.render("old", params, aggregate.collect(params), {}, {})
    assert "Not run: `old` is not in params.yaml's `run_studies`" in table and "30.0" not in table
