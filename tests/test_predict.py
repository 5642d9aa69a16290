"""
``python -m pipeline.runs.predict`` on a smoke-scale CascadeRCNN run (2 training iterations, test score
threshold 1e-4 so every image has detections).

The expected detections come from detectron2's own ``DefaultPredictor`` (config.yaml with
``MODEL.WEIGHTS`` = the run's model_final.pth: the same resize, the same model), converted to the
results format by hand: bbox = [x1, y1, x2 - x1, y2 - y1], category_id = class index + 1 (the synthetic
dataset's ids are 1, 2, 3 in the order of its category list).

Deliberate breaks tried, each failed a test here: (1) ``to_results`` without the id mapping (category
ids 0-based); (2) ``keep_above`` with ``>`` replaced by nothing (threshold ignored): the JSON held
scores below it; (3) ``predict`` stopping at the first unreadable image (``raise`` instead of
``continue``): the command died with PIL's UnidentifiedImageError instead of one line.
"""
import json
import shutil

import numpy as np
import pytest
from detectron2.config import CfgNode
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from PIL import Image

from pipeline.runs import predict as pr
from pipeline.runs import train as tr
from pipeline.runs.spec import resolve
from tests.helpers import smoke_params, tiny_dataset


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data = root / "data"
    tiny_dataset(data, num_val=4, seed=3)
    params = smoke_params(data, "cascadercnn", max_iter=2, checkpoint_period=2, log_period=1, num_workers=0,
                          opts=["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 1e-4])
    tr.run(root / "run", resolve(params, seed=0), track=False)
    yield {"run_dir": root / "run", "images": sorted((data / "images" / "val").glob("*.png"))}
    shutil.rmtree(root, ignore_errors=True)


def _expected(run_dir, image_file):
    cfg = CfgNode.load_cfg((run_dir / "config.yaml").read_text())
    cfg.MODEL.WEIGHTS = str(run_dir / "model_final.pth")
    return DefaultPredictor(cfg)(read_image(str(image_file), format="BGR"))["instances"]


def test_pictures_and_results_json_of_a_folder_and_a_file(run, tmp_path, capsys):
    out = tmp_path / "out"
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    folder = run["images"][0].parent
    with pytest.raises(SystemExit) as exc:
        pr.main(["--run-dir", str(run["run_dir"]), str(bad), str(folder), "--out", str(out), "--threshold", "0"])
    assert exc.value.code == 1  # one image failed
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}: cannot read image")
    assert "4 image(s)" in captured.out and "1 failed" in captured.out

    # One picture per readable image, enlarged so the longer side is 512 px (80 px wide -> x6.4).
    for f in run["images"]:
        picture = Image.open(out / f"{f.stem}.png")
        h, w = read_image(str(f)).shape[:2]
        assert max(picture.size) == 512 and abs(picture.size[0] / picture.size[1] - w / h) < 0.02

    records = json.loads((out / "detections.json").read_text())
    assert {r["image_id"] for r in records} == {2, 3, 4, 5}  # the bad file was input 1
    first = [r for r in records if r["image_id"] == 2]
    assert {r["file_name"] for r in first} == {str(run["images"][0])}
    expected = _expected(run["run_dir"], run["images"][0])
    assert len(first) == len(expected) > 0
    boxes = expected.pred_boxes.tensor.numpy()
    want = sorted(zip(expected.scores.tolist(), (expected.pred_classes + 1).tolist(),
                      np.c_[boxes[:, :2], boxes[:, 2:] - boxes[:, :2]].tolist()))
    got = sorted((r["score"], r["category_id"], r["bbox"]) for r in first)
    for (ws, wc, wb), (gs, gc, gb) in zip(want, got):
        assert abs(ws - gs) < 1e-5 and wc == gc and np.abs(np.array(wb) - gb).max() < 1e-3


def test_threshold_glob_and_an_input_that_names_nothing(run, tmp_path, capsys):
    out = tmp_path / "out"
    pattern = str(run["images"][0].parent / "*.png")
    # A threshold that keeps some detections and drops others: the median score of the first image.
    threshold = float(np.median(_expected(run["run_dir"], run["images"][0]).scores.numpy()))
    with pytest.raises(SystemExit) as exc:
        pr.main(["--run-dir", str(run["run_dir"]), pattern, str(tmp_path / "missing*.jpg"), "--out", str(out),
                 "--threshold", str(threshold)])
    assert exc.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == [f"error: {tmp_path / 'missing*.jpg'}: no such file, folder, or matching glob"]
    records = json.loads((out / "detections.json").read_text())
    assert records and min(r["score"] for r in records) >= threshold
    assert len(list(out.glob("*.png"))) == len(run["images"])


def test_a_run_without_weights_is_refused_in_one_line(run, tmp_path, capsys):
    run_dir = tmp_path / "unfinished"
    run_dir.mkdir()
    for name in ("run.json", "config.yaml"):
        shutil.copy(run["run_dir"] / name, run_dir / name)
    with pytest.raises(SystemExit) as exc:
        pr.main(["--run-dir", str(run_dir), str(run["images"][0]), "--out", str(tmp_path / "o")])
    assert exc.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: {run_dir.resolve()}: no model_final.pth " \
                                              "(the run has not finished training)"
