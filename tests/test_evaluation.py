import numpy as np

from modules.evaluation import evaluate_object


class Painter:
    """A session stand-in: paints a disk of ``radius`` around every click (or returns ``fixed``)."""

    def __init__(self, radius=5, fixed=None):
        self.radius, self.fixed, self.clicks, self.seconds = radius, fixed, [], []

    def click(self, *clicks):
        self.clicks.extend(clicks)
        self.seconds.append(0.001)
        if self.fixed is not None:
            return self.fixed
        yy, xx = np.mgrid[0:32, 0:32]
        prob = np.zeros((32, 32))
        for c in self.clicks:
            prob[(yy - c.y) ** 2 + (xx - c.x) ** 2 <= self.radius**2] = 1.0 if c.positive else 0.0
        return prob


def test_oracle_reaches_iou_one_and_carries_forward():
    gt = np.zeros((32, 32), bool)
    gt[8:24, 8:24] = True
    r = evaluate_object(Painter(fixed=gt.astype(float)), gt, max_clicks=5)
    assert r.ious.tolist() == [1.0] * 5
    assert len(r.clicks) == 1 and len(r.seconds) == 1  # no error left: no more clicks
    assert r.user_clicks == 1 and r.last_mask.all() == gt.all()


def test_clicks_improve_a_disk_painter():
    gt = np.zeros((32, 32), bool)
    gt[4:28, 4:28] = True
    r = evaluate_object(Painter(5), gt, max_clicks=20, target_iou=0.8)
    assert r.ious.shape == (20,)
    assert r.ious[-1] > r.ious[0]
    first = r.clicks[0]
    assert first.positive and 15 <= first.y <= 16 and 15 <= first.x <= 16  # the square's centre
    assert r.ious[0] == 81 / 576  # a radius-5 disk covers 81 pixels of the 24 x 24 square
    assert r.ious[-1] > 0.8
    assert len(r.seconds) == len(r.clicks) == 20
    assert r.user_clicks == int(np.argmax(r.ious >= 0.8)) + 1 < 20  # where Algorithm 1's user stops
