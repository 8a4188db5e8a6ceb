import torch

from modules.clicks import Click, clicks_in_view, clicks_to_rows, clicks_to_tensor, encode_clicks, rows_to_clicks, scale_clicks


def test_roundtrip_and_padding():
    clicks = [Click(3, 4, True), Click(10, 1, False)]
    t = clicks_to_tensor(clicks, capacity=5)
    assert t.shape == (5, 3)
    assert t[2:].abs().sum() == 0
    assert rows_to_clicks(t.tolist()) == clicks  # padding rows dropped
    assert rows_to_clicks(clicks_to_rows(clicks)) == clicks


def test_disk_encoding_exact_pixels():
    t = clicks_to_tensor([Click(8, 8, True), Click(2, 12, False)])
    maps = encode_clicks(t, (16, 16), radius=3, mode="disk")
    assert maps.shape == (1, 2, 16, 16)
    pos, neg = maps[0, 0], maps[0, 1]
    # a radius-3 disk holds the lattice points with dy^2 + dx^2 <= 9: 29 of them
    assert int(pos.sum()) == 29 and pos[8, 8] == 1 and pos[8, 11] == 1 and pos[8, 12] == 0 and pos[10, 10] == 1
    assert neg[2, 12] == 1 and neg[8, 8] == 0
    assert set(torch.unique(maps).tolist()) == {0.0, 1.0}


def test_padding_rows_encode_nothing():
    t = clicks_to_tensor([Click(5, 5, True)], capacity=4)
    maps = encode_clicks(t[None], (12, 12), radius=2)
    assert maps[0, 1].sum() == 0
    assert maps[0, 0].sum() == encode_clicks(clicks_to_tensor([Click(5, 5, True)]), (12, 12), 2)[0, 0].sum()


def test_gaussian_encoding_peak_and_decay():
    t = clicks_to_tensor([Click(10, 10, False)])
    maps = encode_clicks(t, (21, 21), radius=10, mode="gaussian")
    neg = maps[0, 1]
    assert neg[10, 10] == 1.0
    assert abs(float(neg[10, 20]) - float(torch.exp(torch.tensor(-0.5)))) < 1e-6  # one sigma away
    assert maps[0, 0].sum() == 0


def test_unknown_encoding_rejected():
    import pytest

    with pytest.raises(ValueError, match="click encoding 'box'"):
        encode_clicks(clicks_to_tensor([Click(0, 0, True)]), (4, 4), mode="box")  # type: ignore[arg-type]


def test_scale_clicks_keeps_pixel_centres():
    t = torch.tensor([[0.0, 0.0, 1.0], [99.0, 49.0, -1.0]])
    s = scale_clicks(t, (100, 50), (200, 100))
    assert torch.allclose(s[:, :2], torch.tensor([[0.5, 0.5], [198.5, 98.5]]))
    assert torch.equal(s[:, 2], t[:, 2])


def test_clicks_in_view_are_relative_to_the_crop_and_its_network_size():
    s = clicks_in_view([Click(20, 30, True), Click(69, 79, False)], (20, 70, 30, 80), (100, 100))
    assert s.shape == (1, 2, 3)
    assert torch.allclose(s[0, :, :2], torch.tensor([[0.5, 0.5], [98.5, 98.5]]))
    assert s[0, :, 2].tolist() == [1.0, -1.0]
