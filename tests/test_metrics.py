import numpy as np
import pytest

from modules.metrics import clicks_to_reach, failures, iou, miou_at_click, noc, summarize


def test_iou_hand_computed_with_ignore():
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True  # 4 px
    pred = np.zeros((4, 4), bool)
    pred[:2, :3] = True  # 6 px, 4 overlap
    assert iou(pred, gt) == pytest.approx(4 / 6)
    ignore = np.zeros((4, 4), bool)
    ignore[:, 2] = True  # drops the 2 wrong pixels
    assert iou(pred, gt, ignore) == 1.0
    with pytest.raises(ValueError):
        iou(np.zeros((2, 2)), np.zeros((2, 2)))


def test_noc_and_failures_hand_computed():
    ious = np.array([
        [0.5, 0.86, 0.91, 0.95],  # reaches .85 at 2, .90 at 3
        [0.9, 0.9, 0.9, 0.9],  # reaches both at 1
        [0.1, 0.2, 0.3, 0.84],  # never
    ])
    assert clicks_to_reach(ious, 0.85, 4).tolist() == [2, 1, 4]
    assert noc(ious, 0.85, max_clicks=4) == pytest.approx(7 / 3)
    assert noc(ious, 0.90, max_clicks=4) == pytest.approx(8 / 3)
    assert failures(ious, 0.85, 4) == 1 and failures(ious, 0.95, 4) == 2 and failures(ious, 0.5, 4) == 0
    assert miou_at_click(ious) == pytest.approx([0.5, 1.96 / 3, 2.11 / 3, 2.69 / 3])


def test_noc_caps_at_max_clicks():
    ious = np.tile(np.linspace(0.0, 0.95, 25), (2, 1))
    # reaching 0.9 takes 24 clicks, beyond max 20 -> 20
    assert noc(ious, 0.9, max_clicks=20) == 20.0


def test_summarize_schema():
    ious = np.random.default_rng(0).random((5, 20))
    s = summarize(ious)
    assert set(s) == {"noc", "noc_ci95", "failures", "miou_at_click", "n_objects"}
    lo, hi = s["noc_ci95"]["90"]
    assert lo <= s["noc"]["90"] <= hi
    assert set(s["noc"]) == {"80", "85", "90"} and set(s["failures"]) == {"80", "85", "90"}
    assert len(s["miou_at_click"]) == 20 and s["n_objects"] == 5
    with pytest.raises(ValueError):
        summarize(ious[:, :10])


def test_sequence_drift_windows():
    from modules.metrics import sequence_drift

    ious = np.zeros((10, 5))
    ious[:, 3] = np.arange(10) / 10  # IoU@4 grows along the sequence
    d = sequence_drift(ious, click=4, window=100)  # shrinks to 5
    assert d == {"click": 4, "window": 5, "first": pytest.approx(0.2), "last": pytest.approx(0.7)}


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_objects():
    from modules.metrics import bootstrap_interval

    rng = np.random.default_rng(0)
    small, large = rng.integers(1, 21, 20).astype(float), rng.integers(1, 21, 500).astype(float)
    lo, hi = bootstrap_interval(small)
    assert lo < small.mean() < hi
    lo2, hi2 = bootstrap_interval(large)
    assert hi2 - lo2 < (hi - lo) / 2
    assert bootstrap_interval(small) == bootstrap_interval(small)  # seeded


def test_repeated_clicks_counts_same_sign_neighbours():
    from modules.clicks import Click
    from modules.metrics import repeated_clicks

    clicks = [Click(10, 10, True), Click(11, 11, True), Click(11, 11, False), Click(30, 30, True), Click(10, 12, True)]
    assert repeated_clicks(clicks) == 2  # (11, 11)+ next to (10, 10)+, and (10, 12)+; the negative one is new
