import numpy as np
import pytest

from modules.clicks import Click
from modules.simulate import next_click, sample_initial_clicks


def square(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_first_click_goes_to_the_object_centre():
    gt = square(20, 20, 5, 16, 3, 14)  # 11 x 11 square, centre (10, 8)
    assert next_click(np.zeros_like(gt), gt) == Click(10, 8, True)


def test_false_positive_gives_negative_click():
    gt = square(30, 30, 2, 8, 2, 8)
    pred = gt | square(30, 30, 15, 26, 15, 26)  # an extra 11x11 blob predicted
    assert next_click(pred, gt) == Click(20, 20, False)


def test_deeper_error_region_wins():
    gt = square(40, 40, 0, 40, 0, 20) | square(40, 40, 30, 31, 30, 31)
    pred = square(40, 40, 0, 40, 0, 10)  # FN: 40x10 band (depth 5); FP: none; FN dot depth 1
    c = next_click(pred, gt)
    assert c.positive and 10 <= c.x < 20
    # now a wide FP blob is deeper than the thin FN stripe
    pred2 = gt.copy()
    pred2[:, 19] = False  # thin FN stripe, depth 1
    pred2 |= square(40, 40, 5, 25, 22, 38)  # FP 20x16, depth 8
    c2 = next_click(pred2, gt)
    assert not c2.positive and 22 <= c2.x < 38 and 5 <= c2.y < 25


def test_image_border_counts_as_boundary():
    gt = square(10, 30, 0, 10, 0, 30)  # whole image is object
    c = next_click(np.zeros_like(gt), gt)
    assert c == Click(4, 14, True) or c == Click(5, 15, True) or (4 <= c.y <= 5 and 4 <= c.x <= 25)


def test_ignore_pixels_are_neither_errors_nor_clickable():
    gt = square(20, 20, 5, 15, 5, 15)
    pred = gt.copy()
    ignore = np.zeros_like(gt)
    ignore[0:4, :] = True
    pred[0:4, :] = True  # wrong, but ignored
    assert next_click(pred, gt, ignore) is None
    ignore2 = square(20, 20, 0, 20, 0, 10)
    c = next_click(np.zeros_like(gt), gt, ignore2)
    assert c.positive and c.x >= 10 and not ignore2[c.y, c.x]


def test_no_error_means_no_click_and_ties_go_to_the_first_pixel_in_row_major_order():
    gt = square(16, 16, 4, 12, 4, 12)
    assert next_click(gt, gt) is None
    twins = square(20, 20, 11, 16, 2, 7) | square(20, 20, 2, 7, 12, 17)  # two equally deep misses
    c = next_click(np.zeros_like(twins), twins)
    assert (c.y, c.x, c.positive) == (4, 14, True)  # the centre of the upper one, first in row-major order


def test_initial_clicks_respect_the_mask_and_strategies():
    h = w = 64
    mask = square(h, w, 20, 40, 20, 40)
    instances = np.zeros((h, w), int)
    instances[2:10, 50:60] = 2
    seen_other = False
    for seed in range(40):
        clicks = sample_initial_clicks(mask, np.random.default_rng(seed), instances=instances)
        pos = [c for c in clicks if c.positive]
        neg = [c for c in clicks if not c.positive]
        assert 1 <= len(pos) <= 5 and len(neg) <= 5
        assert all(mask[c.y, c.x] for c in pos)
        assert all(not mask[c.y, c.x] for c in neg)
        assert len({(c.y, c.x) for c in clicks}) == len(clicks)
        seen_other |= any(instances[c.y, c.x] == 2 for c in neg)
    assert seen_other, "the 'other objects' strategy never fired"


def test_initial_clicks_on_empty_mask_fail_clearly():
    with pytest.raises(ValueError, match="empty mask"):
        sample_initial_clicks(np.zeros((8, 8), bool), np.random.default_rng(0))


def test_pixels_clicked_before_are_not_clicked_again_as_in_ritm():
    gt = square(20, 20, 5, 16, 3, 14)
    first = next_click(np.zeros_like(gt), gt)
    again = next_click(np.zeros_like(gt), gt, clicked=[first])
    assert again != first and again.positive and gt[again.y, again.x]  # the next deepest pixel
    dot = np.zeros((9, 9), bool)
    dot[4, 4] = True  # the only error left is a pixel clicked before: the user has nothing to click
    assert next_click(np.zeros_like(dot), dot) == Click(4, 4, True)
    assert next_click(np.zeros_like(dot), dot, clicked=[Click(4, 4, True)]) is None
