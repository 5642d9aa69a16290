import pytest

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
    assert rare["p_in_S"] == pytest.approx(0.53811, abs=1e-5)
    assert "c" not in stats["groups"]


def test_lvis_bound():
    # sqrt(0.001 * 10 / 100170) = sqrt(9.983e-8) = 3.1596e-4
    assert lvis_rare_share_bound(10) == pytest.approx(3.1596e-4, rel=1e-4)
