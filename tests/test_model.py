import numpy as np
import pytest
import torch

from modules.deeplab import DeepLabV3Plus
from modules.errors import UserError
from modules.interactive import InteractiveSegmentationModule, poly_lr_factor
from modules.session import network_size


@pytest.mark.parametrize(
    "backbone,output_stride,decoder_stride",
    [("resnet10t", 16, 4), ("resnet10t", 8, 4), ("resnet10t", 16, 2), ("mobilenetv3_small_050", 16, 4)],
)
def test_deeplab_on_several_backbones(backbone, output_stride, decoder_stride):
    net = DeepLabV3Plus(backbone, in_chans=6, output_stride=output_stride, aspp_channels=16, decoder_channels=16,
                        guide_channels=3, decoder_stride=decoder_stride).eval()
    x = torch.randn(2, 6, 64, 96)
    with torch.no_grad():
        feats = net.encode(x)
        out = net(x)
    assert out.shape == (2, 1, 64, 96)
    # decoder input channels come from the backbone's feature_info, strides 4 and OS
    assert [feats[k].shape[1] for k in ("low", "deep")] == net.encoder.feature_info.channels()[-2:]
    assert feats["low"].shape[-1] == 96 // 4 and feats["deep"].shape[-1] == 96 // output_stride
    assert feats["guide4"].shape[1:] == (3, 16, 24)  # the click maps and previous mask reach the decoder
    assert net.decode_features(feats).shape[-2:] == ((32, 48) if decoder_stride == 2 else (16, 24))


def test_channels_last_network_gives_the_same_logits_and_trains():
    torch.manual_seed(0)
    plain = DeepLabV3Plus("resnet10t", in_chans=6, aspp_channels=16, decoder_channels=16, guide_channels=3)
    fast = DeepLabV3Plus("resnet10t", in_chans=6, aspp_channels=16, decoder_channels=16, guide_channels=3, channels_last=True)
    fast.load_state_dict(plain.state_dict())  # a checkpoint of either layout loads into the other
    assert fast.encoder.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 6, 64, 64)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), fast.eval()(x), atol=1e-4)
    fast.train()(x).mean().backward()
    assert all(p.grad is not None for p in fast.head.parameters())


def test_unknown_backbone_and_stride_are_user_errors():
    with pytest.raises(UserError, match="unknown backbone 'resnet_nope'"):
        DeepLabV3Plus("resnet_nope")
    with pytest.raises(UserError, match="output_stride=32"):
        DeepLabV3Plus("resnet10t", output_stride=32)


@pytest.mark.parametrize("prev_mask", [False, True])
def test_session_returns_original_resolution_and_feeds_the_previous_mask(prev_mask):
    from modules.clicks import Click

    m = InteractiveSegmentationModule(aspp_channels=16, decoder_channels=16, eval_max_side=64, prev_mask=prev_mask).eval()
    assert m.net.encoder.feature_info.channels() and next(m.net.encoder.parameters()).shape[1] == (6 if prev_mask else 5)
    session = m.session(torch.rand(1, 3, 90, 130))
    prob = session.click(Click(45, 60, True))
    assert prob.shape == (90, 130) and 0 <= prob.min() and prob.max() <= 1 and session.net_hw == (32, 64)
    assert session._prev_input() is None  # the first click sees no previous mask, as in training
    session.click(Click(10, 10, False))
    assert session._prev_input() is session.history[0]
    assert (session.undo() == session.probability).all() and len(session.clicks) == 1


def test_network_size_and_poly_schedule():
    assert network_size((128, 128), 512) == (128, 128)
    assert network_size((480, 640), 320) == (256, 320)
    assert network_size((10, 10), 512) == (32, 32)
    assert poly_lr_factor(0, 100, 0.9) == 1.0 and poly_lr_factor(100, 100, 0.9) == 0.0
    assert 0 < poly_lr_factor(50, 100, 0.9) < 1
    # a linear warm-up over the first 10 steps, then the same decay
    assert [poly_lr_factor(s, 100, 1.0, 10) for s in (0, 4, 9)] == pytest.approx([0.1, 0.48, 0.91])


def test_object_roi_grows_the_object_box_inside_the_image():
    import numpy as np

    from modules.clicks import Click
    from modules.session import box_iou, object_roi

    mask = np.zeros((100, 200), bool)
    mask[40:60, 90:110] = True  # 20 x 20 object
    assert object_roi(mask, [], 1.5, 10) == (35, 65, 85, 115)
    assert object_roi(mask, [], 1.0, 50) == (25, 75, 75, 125)  # at least min_crop_size a side
    assert object_roi(mask, [Click(90, 100, True), Click(0, 0, False)], 1.0, 1)[:2] == (40, 91)  # positive clicks count
    assert object_roi(mask, [], 1.0, 300) == (0, 100, 0, 200)  # never outside the image
    assert object_roi(np.zeros((10, 10), bool), [], 1.4, 4) == (0, 10, 0, 10)  # nothing predicted: the whole image
    assert object_roi(mask, [], 1.0, 30)[2:] == (85, 115)
    assert box_iou((0, 10, 0, 10), (0, 10, 5, 15)) == pytest.approx(50 / 150)


def test_zoom_in_session_crops_around_the_object_and_pastes_back():
    from modules.clicks import Click
    from modules.session import ZoomIn

    m = InteractiveSegmentationModule(aspp_channels=16, decoder_channels=16, eval_max_side=64, prev_mask=True).eval()
    image = torch.rand(1, 3, 120, 160)
    plain = m.session(image)
    session = m.session(image)
    session.zoom_in = ZoomIn(skip_clicks=1, min_crop_size=40)
    for s in (plain, session):
        s.click(Click(60, 80, True))
    assert session.view == session.whole and session.net_hw == plain.net_hw  # the first click sees the whole image
    with torch.no_grad():  # a prediction that covers a small box: the crop follows it
        session.history[-1] = torch.zeros_like(session.history[-1])
        session.history[-1][..., 10:22, 16:32] = 1.0
    prob = session.click(Click(30, 50, False))
    y0, y1, x0, x1 = session.view
    assert session.view != session.whole and y1 - y0 >= 40 and x1 - x0 >= 40
    assert max(session.net_hw) == 64 and session.net_hw[0] % 32 == 0  # the crop at the network's full size
    assert prob.shape == (120, 160) and (prob[:y0] == 0).all() and (prob[:, x1:] == 0).all()  # background outside
    prev = session._prev_input()  # the previous mask, seen in the crop
    assert prev.shape[-2:] == session.net_hw and prev.max() > 0.5
    c = session.net_clicks()[0]  # clicks in the crop's network coordinates
    assert c[1, 0] == pytest.approx((30 - y0 + 0.5) * session.net_hw[0] / (y1 - y0) - 0.5)
    back = session.undo()
    assert session.view == session.whole and back.shape == (120, 160) and len(session.clicks) == 1
    with pytest.raises(UserError, match="zoom_in"):
        ZoomIn(expansion_ratio=0.5)


def test_clicked_pixels_take_their_labels_on_the_shown_mask_only():
    from modules.clicks import Click, label_clicked_pixels
    from modules.session import ClickLabels

    prob = np.full((6, 7), 0.3)
    assert label_clicked_pixels(prob, [Click(2, 3, True)], 0) is prob  # radius 0: the network's output
    out = label_clicked_pixels(prob, [Click(2, 3, True), Click(2, 4, False), Click(0, 0, True)], 1)
    assert out[2, 3] == 0 and out[2, 4] == 0 and out[1, 3] == 1 and out[2, 2] == 1  # a later click wins
    assert out[1, 2] == 0.3 and out[0, 0] == 1 and out[1, 0] == 1 and prob[2, 3] == 0.3  # a disk, a copy
    torch.manual_seed(0)
    m = InteractiveSegmentationModule(aspp_channels=16, decoder_channels=16, eval_max_side=64, prev_mask=True).eval()
    image = torch.rand(1, 3, 40, 50)
    plain, labelled = m.session(image), m.session(image)
    labelled.click_labels = ClickLabels(radius=1)
    for c in (Click(20, 25, True), Click(5, 5, False)):
        a, b = plain.click(c), labelled.click(c)
    assert b[20, 25] == 1 and b[21, 25] == 1 and b[5, 5] == 0 and b[5, 6] == 0
    far = np.ones_like(a, bool)
    far[18:23, 23:28] = far[3:8, 3:8] = False
    assert np.array_equal(a[far], b[far])  # elsewhere the network's probability
    assert torch.equal(plain.history[-1], labelled.history[-1])  # the network's own prediction stays its next input
    back, plain_back = labelled.undo(), plain.undo()
    assert back[20, 25] == 1 and back[5, 5] == plain_back[5, 5] != 0  # the undone click's label goes with it
    assert np.array_equal(back[far], plain_back[far]) and len(labelled.clicks) == 1
    with pytest.raises(UserError, match="click_labels: radius"):
        ClickLabels(radius=-1)


def test_tta_averages_the_mirrored_and_rescaled_predictions():
    import torch.nn.functional as F

    from modules.clicks import Click, encode_clicks, scale_clicks
    from modules.session import TestTimeAugmentation, flip_clicks, network_size

    clicks = torch.tensor([[[3.0, 5.0, 1.0], [10.0, 60.0, -1.0]]])
    assert torch.equal(encode_clicks(flip_clicks(clicks, 64), (16, 64)), encode_clicks(clicks, (16, 64)).flip(-1))
    torch.manual_seed(0)
    m = InteractiveSegmentationModule(aspp_channels=16, decoder_channels=16, eval_max_side=64, prev_mask=True).eval()
    image = torch.rand(1, 3, 48, 64)
    plain, mirrored = m.session(image), m.session(image)
    mirrored.tta = TestTimeAugmentation(flip=True, scales=[32])
    for s in (plain, mirrored):
        s.click(Click(20, 10, True))
        s.click(Click(30, 50, False))
    hw, small_hw = mirrored.net_hw, network_size(mirrored.net_hw, 32, upscale=True)
    assert hw == (64, 64) and small_hw == (32, 32)
    with torch.no_grad():  # the second click by hand: its previous mask is each session's own first prediction
        x, c, prev = mirrored.net_image, mirrored.net_clicks(), mirrored.history[0]
        small, small_c = F.interpolate(x, size=small_hw, mode="bilinear"), scale_clicks(c, hw, small_hw)
        small_prev = F.interpolate(prev, size=small_hw, mode="bilinear")
        outs = [m(x, c, prev), m(small, small_c, small_prev), m(x.flip(-1), flip_clicks(c, 64), prev.flip(-1)).flip(-1),
                m(small.flip(-1), flip_clicks(small_c, 32), small_prev.flip(-1)).flip(-1)]
        expected = torch.stack([F.interpolate(o, size=hw, mode="bilinear") for o in outs]).mean(0)
    assert torch.allclose(mirrored.history[-1], expected.sigmoid(), atol=1e-6)
    assert not torch.allclose(plain.history[-1], mirrored.history[-1], atol=1e-3)  # it does change the prediction
    for bad in ([8], 224):
        with pytest.raises(UserError, match="tta"):
            TestTimeAugmentation(scales=bad)


def test_first_click_share_gives_the_benchmarks_first_click_state():
    import numpy as np

    from modules.clicks import clicks_to_tensor
    from modules.simulate import next_click

    mask = torch.zeros(3, 1, 32, 32)
    mask[:, :, 4:20, 6:30] = 1
    batch = {"mask": mask, "ignore": torch.zeros_like(mask, dtype=torch.bool)}
    clicks = torch.rand(3, 8, 3) * 30
    clicks[..., 2] = 1
    prev = torch.rand(3, 1, 32, 32)
    every = InteractiveSegmentationModule(aspp_channels=16, decoder_channels=16, first_click_share=1.0)
    out, out_prev = every.first_clicks(batch, clicks, prev, np.random.default_rng(0))
    first = clicks_to_tensor([next_click(np.zeros((32, 32), bool), mask[0, 0].bool().numpy())], 8)
    assert (out == first).all() and (out_prev == 0).all() and first[0, 2] == 1  # one positive click, no prev
    none = InteractiveSegmentationModule(aspp_channels=16, decoder_channels=16)
    rng = np.random.default_rng(0)
    same, same_prev = none.first_clicks(batch, clicks, prev, rng)
    assert same is clicks and same_prev is prev and rng.random() == np.random.default_rng(0).random()  # no draw
    with pytest.raises(UserError, match=r"model.first_click_share=1.5: expected a share in \[0, 1\]"):
        InteractiveSegmentationModule(first_click_share=1.5)


def test_normalized_focal_loss_is_bce_at_gamma_0_and_shifts_weight_to_hard_pixels():
    from modules.losses import masked_bce, normalized_focal_loss

    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    logits = torch.where(target.bool(), 4.0, -4.0)  # all pixels right and confident
    logits[:, :, 0, 0] = 3.0  # one hard pixel per image: confidently wrong
    valid = torch.ones_like(target, dtype=torch.bool)
    valid[1, :, 7] = False
    per_image_bce = torch.stack([masked_bce(logits[i:i + 1], target[i:i + 1], valid[i:i + 1]) for i in range(2)]).mean()
    assert normalized_focal_loss(logits, target, valid, gamma=0.0) == pytest.approx(per_image_bce.item())
    x = logits.clone().requires_grad_(True)
    nfl = normalized_focal_loss(x, target, valid)
    nfl.backward()
    # the loss is about the hard pixel's own BCE (its focal factor dominates the normaliser) ...
    hard_bce = torch.nn.functional.softplus(torch.tensor(3.0)).item()
    assert hard_bce * 0.9 < nfl.item() <= hard_bce
    # ... and the easy pixels carry almost none of the gradient, which BCE spreads over them
    easy = torch.ones_like(x, dtype=torch.bool)
    easy[:, :, 0, 0] = False
    assert x.grad[easy].abs().sum() < 1e-3 * x.grad[~easy].abs().sum()
    with pytest.raises(UserError, match=r"model.focal_gamma=-1: expected a number >= 0"):
        InteractiveSegmentationModule(focal_gamma=-1)
    assert InteractiveSegmentationModule(aspp_channels=16, decoder_channels=16, loss="nfl").mask_loss(
        logits, target, valid, torch.zeros(2, 1, 3)) == pytest.approx(normalized_focal_loss(logits, target, valid).item())
