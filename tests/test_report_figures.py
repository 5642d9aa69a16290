"""
The report's per-category AP (``pipeline.report.figures.category_ap``), from saved detections, checked on
detections whose AP is known by hand, and the two figures that use a trained run.

Run directory by hand: a tiny synthetic dataset (3 categories), ``run.json`` and a ``config.yaml``
naming its validation split, and an evaluation directory ``eval/k/`` (``pipeline.runs.evaluate`` writes
one per evaluation setting) with ``lvis_instances_results.json``:
- category A: every ground-truth box of A on the evaluated images, score 1 -> each is a true
  positive at every IoU threshold, precision 1 at every recall point: AP 100;
- category B: every box of B moved by its own width and height (IoU 0 with any box of B): no true
  positive: AP 0;
- category C: no detection: AP 0.
Only the first 3 validation images are "evaluated" (``eval/k/metrics.json`` ``images.ids``); A's boxes
on the other images are not detected, so A's AP is 100 only if those images are left out, as the
evaluation left them out.

Deliberate break tried, which failed this test: the ``images.ids`` filter removed from
``category_ap`` (A's AP came out 33.7 instead of 100: its boxes on the other images counted as
misses). (Precision at area "small" instead of "all" did not fail it: every object of these 64 px
images is small.)
"""
import json

import pytest
from detectron2.config import CfgNode

from pipeline.report import figures as rp
from pipeline.runs.spec import resolve
from tests.helpers import smoke_params, tiny_dataset


@pytest.fixture
def run_dir(tmp_path):
    data = tmp_path / "data"
    tiny_dataset(data, num_val=8, image_size=(64, 64), seed=5, checksum=None)
    params = smoke_params(data, "cascadercnn")
    run = tmp_path / "run"
    (run / "eval" / "k").mkdir(parents=True)
    (run / "run.json").write_text(resolve(params, seed=0).to_json())
    (run / "config.yaml").write_text(CfgNode({"DATASETS": {"TEST": ["synthetic_lvis_val"]}}).dump())
    return run, json.loads((data / "annotations" / "lvis_v1_val.json").read_text())


def test_category_ap_from_detections_of_known_ap(run_dir):
    run, gt = run_dir
    evaluated = sorted(im["id"] for im in gt["images"])[:3]
    anns = [a for a in gt["annotations"] if a["image_id"] in evaluated]
    cats = sorted({a["category_id"] for a in anns})
    assert len(cats) >= 2, "the fixture needs two categories with boxes on the evaluated images"
    a_cat, b_cat = cats[0], cats[1]
    other = [a for a in gt["annotations"] if a["image_id"] not in evaluated and a["category_id"] == a_cat]
    assert other, "category A must also have boxes outside the evaluated images"
    detections = [{"image_id": a["image_id"], "category_id": a_cat, "bbox": a["bbox"], "score": 1.0}
                  for a in anns if a["category_id"] == a_cat]
    detections += [{"image_id": a["image_id"], "category_id": b_cat, "score": 0.9,
                    "bbox": [a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3], a["bbox"][2], a["bbox"][3]]}
                   for a in anns if a["category_id"] == b_cat]
    (run / "eval" / "k" / "lvis_instances_results.json").write_text(json.dumps(detections))
    (run / "eval" / "k" / "metrics.json").write_text(json.dumps({"images": {"count": 3, "ids": evaluated}}))

    ap = rp.category_ap(run / "eval" / "k", run)
    assert ap[a_cat] == pytest.approx(100.0)
    assert ap[b_cat] == 0.0
    assert set(ap) == set(cats)  # categories with ground truth on the evaluated images only
    assert all(v == 0.0 for c, v in ap.items() if c not in (a_cat, b_cat))
    cached = json.loads((run / "eval" / "k" / "ap_by_category.json").read_text())
    assert cached["ap"][str(a_cat)] == pytest.approx(100.0)


def test_figures_without_runs_say_so(tmp_path):
    """No main run and no Table 2 results yet: each figure is written, saying what to run."""
    rp.predictions(None, tmp_path / "p.png")
    rp.ap_by_category({}, {}, tmp_path / "a.png")
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "a.png").stat().st_size > 0
    assert rp.main_run_dir(tmp_path) is None


def test_the_main_run_is_the_lowest_seed_that_finished_training(tmp_path, monkeypatch, capsys):
    """``results/main_runs.json`` lists seeds 10, 2 and 1 (1 without weights): seed 2 is used, by the
    report and by ``--run-dir main``; seed order is numeric. Deliberate break tried, which failed this
    test: seeds sorted as strings (seed10 came first)."""
    from pipeline.runs import predict as pr

    runs = {}
    for seed, trained in ((10, True), (2, True), (1, False)):
        d = tmp_path / "runs" / f"seed{seed}"
        d.mkdir(parents=True)
        if trained:
            (d / "model_final.pth").write_bytes(b"")
        runs[f"seed{seed}"] = {"run_dir": str(d)}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "main_runs.json").write_text(json.dumps({"seeds": runs}))
    assert rp.main_run_dir(tmp_path / "results") == tmp_path / "runs" / "seed2"
    monkeypatch.chdir(tmp_path)
    assert pr.run_dir_arg("main") == tmp_path / "runs" / "seed2"
    (tmp_path / "results" / "main_runs.json").write_text(json.dumps({"seeds": {}}))
    with pytest.raises(SystemExit):
        pr.main(["--run-dir", "main", "x.png"])
    assert "main: no trained main run in results/main_runs.json" in capsys.readouterr().err


def test_accuracy_vs_runtime_says_table1_was_not_run_instead_of_empty_axes(tmp_path, monkeypatch):
    """A Table-2-only re-scoring has no Table 1 rows: the figure says so (it drew empty axes before)."""
    said = []
    monkeypatch.setattr(rp, "_placeholder", lambda path, text: said.append(text))
    rp.accuracy_vs_runtime({}, {"table1": {"centernet": None, "centernet_coco": None}}, {}, tmp_path / "f.png")
    assert len(said) == 1 and "Table 1 not run" in said[0]
    stat = {"mean": 20.0, "std": 1.0, "n": 2, "values": [19.0, 21.0]}
    rows = {"centernet": {"AP": stat, "runtime_ms": {**stat, "mean": 50.0}}, "centernet_coco": None}
    rp.accuracy_vs_runtime({}, {"table1": rows}, {}, tmp_path / "g.png")
    assert len(said) == 1 and (tmp_path / "g.png").is_file()
