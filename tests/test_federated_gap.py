import json

import pytest

from tests.helpers import load_script

federated_gap = load_script("tools/federated_gap.py")

A, B, C = [10, 10, 20, 20], [50, 50, 20, 20], [10, 10, 20, 20]  # boxes [x, y, w, h]


def _labels():
    """Two images. Image 1 holds A (category 1) and B (category 2), image 2 holds C (category 2).
    Federated labels: image 1 is labelled for category 1 only (B is an unlabelled present object),
    image 2 for category 2 with category 1 a verified negative. Category 3 has no box anywhere."""
    cats = [{"id": 1, "name": "one", "frequency": "f"}, {"id": 2, "name": "two", "frequency": "r"},
            {"id": 3, "name": "three", "frequency": "c"}]
    images = [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}]
    ann = [(1, 1, A), (2, 1, B), (3, 2, C)]  # (annotation id, image, box); categories below
    coco = {"categories": cats, "images": images,
            "annotations": [{"id": i, "image_id": im, "category_id": cat, "bbox": box, "area": 400.0, "iscrowd": 0}
                            for (i, im, box), cat in zip(ann, (1, 2, 2))]}
    lvis = {"categories": cats,
            "images": [{**images[0], "neg_category_ids": [], "not_exhaustive_category_ids": []},
                       {**images[1], "neg_category_ids": [1], "not_exhaustive_category_ids": []}],
            "annotations": [{k: v for k, v in a.items() if k != "iscrowd"}
                            for a in coco["annotations"] if a["id"] != 2]}
    return lvis, coco


DETECTIONS = [
    {"image_id": 1, "category_id": 1, "bbox": A, "score": 0.9},             # true positive (A)
    {"image_id": 2, "category_id": 1, "bbox": [60, 60, 20, 20], "score": 0.8},  # false: 1 is a verified negative
    {"image_id": 1, "category_id": 2, "bbox": [70, 10, 20, 20], "score": 0.95},  # false, or ignored (federated)
    {"image_id": 2, "category_id": 2, "bbox": C, "score": 0.7},             # true positive (C)
]


def test_exhaustive_labels_make_every_absent_category_a_negative():
    lvis, coco = _labels()
    exh = federated_gap.exhaustive_as_lvis(lvis, coco)
    assert [im["neg_category_ids"] for im in exh["images"]] == [[3], [1, 3]]
    assert sorted(a["id"] for a in exh["annotations"]) == [1, 2, 3]
    assert all("iscrowd" not in a for a in exh["annotations"])


def test_three_scorings_by_hand():
    """Category 1 (both protocols): A found first (0.9), then a false positive (0.8): AP 1.
    Category 2, federated: image 1 is not labelled for it, so the 0.95 box there is ignored; C
    found: AP 1. Category 2, exhaustive: the 0.95 box is false, C found at 0.7, B missed: recall
    0.5 at precision 0.5, so 51 of the 101 recall points at 0.5: AP 51 * 0.5 / 101 = 0.252475 at
    every IoU threshold (true boxes are exact). Means: 100 federated, (1 + 0.252475) / 2 = 62.6238
    exhaustive, in LVISEval and COCOeval alike. Category 3 has no box: its group ("c") has no AP."""
    lvis, coco = _labels()
    out = federated_gap.score(DETECTIONS, lvis, coco)
    assert out["federated"]["AP"] == pytest.approx(100.0)
    assert out["federated"]["APr"] == pytest.approx(100.0)
    assert out["exhaustive"]["AP"] == pytest.approx(62.6238, abs=1e-3)
    assert out["exhaustive"]["APr"] == pytest.approx(25.2475, abs=1e-3)
    assert out["exhaustive"]["APf"] == pytest.approx(100.0)
    assert out["exhaustive"]["APc"] is None
    assert out["coco"]["AP"] == pytest.approx(62.6238, abs=1e-3)
    assert out["coco"]["AP50"] == pytest.approx(62.6238, abs=1e-3)


def test_a_subset_is_scored_on_its_images_only():
    """Image 2 alone: category 1 has no box there (its false positive scores nothing), category 2
    is found: AP 1 in all three, though the exhaustive scoring of both images is 62.6."""
    lvis, coco = _labels()
    out = federated_gap.score(DETECTIONS, lvis, coco, image_ids=[2])
    assert out["federated"]["AP"] == pytest.approx(100.0)
    assert out["exhaustive"]["AP"] == pytest.approx(100.0)
    assert out["coco"]["AP"] == pytest.approx(100.0)


def test_eval_dir_and_errors(tmp_path, capsys):
    lvis, coco = _labels()
    (tmp_path / "lvis.json").write_text(json.dumps(lvis))
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    eval_dir = tmp_path / "eval" / "key"
    eval_dir.mkdir(parents=True)
    gt = ["--lvis-gt", str(tmp_path / "lvis.json"), "--coco-gt", str(tmp_path / "coco.json")]
    with pytest.raises(SystemExit) as e:
        federated_gap.main(["--eval-dir", str(eval_dir), *gt])
    assert e.value.code == 1 and str(eval_dir) in capsys.readouterr().err
    (eval_dir / "lvis_instances_results.json").write_text(json.dumps(DETECTIONS))
    (eval_dir / "metrics.json").write_text(json.dumps({"images": {"count": 1, "ids": [2]}}))
    federated_gap.main(["--eval-dir", str(eval_dir), *gt, "--json", str(tmp_path / "out.json")])
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["exhaustive"]["AP"] == pytest.approx(100.0)  # metrics.json's images: image 2 only
    federated_gap.main(["--detections", str(eval_dir / "lvis_instances_results.json"), *gt,
                        "--json", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text())["exhaustive"]["AP"] == pytest.approx(62.6238, abs=1e-3)
