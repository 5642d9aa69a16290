import json
import math

import pytest
import torch

from tests.helpers import load_script

tail_imbalance = load_script("tools/tail_imbalance.py")
group_stats, lvis_rare_share_bound = tail_imbalance.group_stats, tail_imbalance.lvis_rare_share_bound


def test_shares_follow_the_repeat_factors():
    """4 images: category 1 ("f") in images 1-3 (f = 0.75), category 2 ("r") in image 4 (f = 0.25).
    At t = 0.5 image 4 repeats sqrt(0.5 / 0.25) = 1.41421 times, the others once: the sum is
    4.41421, so category 2's sampled share is 1.41421 / 4.41421 = 0.32038 and category 1's
    0.67962; sigmoid negatives per positive for category 2: 0.67962 / 0.32038 = 2.1213; in S of a
    2-image batch: 1 - 0.67962^2 = 0.53811."""
    data = {"categories": [{"id": 1, "frequency": "f"}, {"id": 2, "frequency": "r"}],
            "images": [{"id": i} for i in (1, 2, 3, 4)],
            "annotations": [{"image_id": i, "category_id": 1} for i in (1, 2, 3)]
            + [{"image_id": 4, "category_id": 2}, {"image_id": 4, "category_id": 2}]}  # 2 boxes, 1 image
    stats = group_stats(data, threshold=0.5, batch=2)
    rare, frequent = stats["groups"]["r"], stats["groups"]["f"]
    assert rare["images"] == [1, 1] and frequent["images"] == [3, 3]
    assert rare["share"][1] == pytest.approx(0.32038, abs=1e-5)
    assert frequent["share"][1] == pytest.approx(0.67962, abs=1e-5)
    assert rare["sigmoid_negatives_per_positive"] == pytest.approx(2.1213, abs=1e-4)
    assert rare["p_present"] == pytest.approx(0.53811, abs=1e-5)
    assert "c" not in stats["groups"]


def test_lvis_bound():
    # sqrt(0.001 * 10 / 100170) = sqrt(9.983e-8) = 3.1596e-4
    assert lvis_rare_share_bound(10) == pytest.approx(3.1596e-4, rel=1e-4)


# --- what FedLoss trains each category on (fed_loss_exposure), with the training runs' sampler ------

C = 10
COUNTS = [(k + 1) ** 2 for k in range(C)]  # sqrt(count) = k + 1: FedLoss's sampling weights


def _fed_loss(tmp_path, set_size):
    path = tmp_path / "cat_info.json"
    path.write_text(json.dumps([{"id": k + 1, "image_count": n} for k, n in enumerate(COUNTS)]))
    return tail_imbalance.federated_loss(path, C, set_size)


def _fixed_batch(generator):
    """Image 0 holds category 2; image 1 holds 2 and 5."""
    images = torch.zeros(2, C, dtype=torch.bool)
    images[0, 2] = images[1, 2] = images[1, 5] = True
    return images


def test_exposure_without_sampled_negatives(tmp_path):
    """|S| = 3 and labels {2, 5, background}: S = {2, 5} every time. Category 5 is in S with one
    image (image 0) lacking it: 1 negative per iteration; category 2: none; the rest never in S."""
    out = tail_imbalance.fed_loss_exposure(_fixed_batch, _fed_loss(tmp_path, 3), 50, torch.Generator().manual_seed(0))
    expected_in = torch.zeros(C, dtype=torch.float64)
    expected_in[[2, 5]] = 1.0
    assert torch.equal(out["in_S"], expected_in)
    expected_neg = torch.zeros(C, dtype=torch.float64)
    expected_neg[5] = 1.0
    assert torch.equal(out["negatives"], expected_neg)


def test_exposure_with_one_sampled_negative(tmp_path):
    """|S| = 4: one negative drawn from the 8 absent categories with weight sqrt(count) = k + 1,
    whose sum is 55 - 3 - 6 = 46: P(k in S) = (k + 1) / 46 (category 9: 0.21739, 0: 0.02174), and
    a sampled category lacks both images: 2 negatives each time it is in S. Break tried: the
    background index not counted towards |S| (two negatives drawn) -> category 0 near 0.048, fails;
    the |S| = 3 test above fails too."""
    trials = 4000
    out = tail_imbalance.fed_loss_exposure(_fixed_batch, _fed_loss(tmp_path, 4), trials,
                                           torch.Generator().manual_seed(0))
    for k in (0, 9):
        p = (k + 1) / 46
        tol = 4 * math.sqrt(p * (1 - p) / trials)  # 4 binomial std
        assert out["in_S"][k] == pytest.approx(p, abs=tol)
        assert out["negatives"][k] == pytest.approx(2 * p, abs=2 * tol)
    assert out["in_S"][[2, 5]].tolist() == [1.0, 1.0]
    assert float(out["in_S"].sum()) == pytest.approx(3.0)  # |S| - 1 categories every iteration


def test_batches_follow_the_repeat_factors():
    """The first test's data at t = 0.5: image 4 (category 2) is drawn with probability
    1.41421 / 4.41421 = 0.32038; a 1-image batch holds category 2 that often and never both."""
    data = {"categories": [{"id": 1, "frequency": "f"}, {"id": 2, "frequency": "r"}],
            "images": [{"id": i} for i in (1, 2, 3, 4)],
            "annotations": [{"image_id": i, "category_id": 1} for i in (1, 2, 3)]
            + [{"image_id": 4, "category_id": 2}]}
    draw = tail_imbalance.presence_from_images(data, threshold=0.5, batch=1)
    g = torch.Generator().manual_seed(0)
    batches = torch.stack([draw(g)[0] for _ in range(5000)])  # (5000, 2)
    assert batches.sum(1).eq(1).all()
    # 4 binomial std = 0.026; without the repeat factors the share would be 0.25
    assert float(batches[:, 1].double().mean()) == pytest.approx(0.32038, abs=4 * math.sqrt(0.32 * 0.68 / 5000))


def test_shares_from_counts():
    """N = 1000, t = 0.01: 1 image -> f = 0.001, repeated sqrt(10) = 3.16228 times: s <= 0.0031623;
    100 images -> f = 0.1 > t, not repeated: 0.1; no image: 0."""
    s = tail_imbalance.shares_from_counts([1, 100, 0], 1000, 0.01)
    assert s.tolist() == pytest.approx([0.0031623, 0.1, 0.0], abs=1e-7)


def test_cli_on_cat_info(tmp_path, capsys):
    path = tmp_path / "cat_info.json"
    path.write_text(json.dumps([{"id": k + 1, "image_count": n, "frequency": "r" if n <= 10 else "f"}
                                for k, n in enumerate(COUNTS)]))
    assert tail_imbalance.main(["--cat-info", str(path), "--num-images", "200", "--batch", "2",
                                "--set-size", "4", "--trials", "200"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[:3] for r in rows] == [["r", "3", "1-9"], ["f", "7", "16-100"]]
    with pytest.raises(SystemExit):
        tail_imbalance.main(["--cat-info", str(path), "--trials", "0"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": 1, "image_count": 3}, {"id": 2, "image_count": "many"}]))
    with pytest.raises(SystemExit):
        tail_imbalance.main(["--cat-info", str(bad)])
    assert "bad.json: record 1: field 'image_count'" in capsys.readouterr().err
