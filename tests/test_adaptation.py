"""Test-time adaptation: Eq. 2-4 and MAS, the Adapter driven through an InteractiveSession, the
Lightning callback, the variants, DDP."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import ROOT, synthetic
from torch import nn
from torch.utils.data import DataLoader

from callbacks.adaptation import TestTimeAdaptation, read_variant, variant_callback
from callbacks.benchmark import ClickRecorder
from datamodules.objects import EvalObjects
from datamodules.synthetic import SyntheticObjects
from modules.adaptation import (Adapter, ImageAdaptation, SequenceAdaptation, adaptation_loss, add_mas_gradient,
                                correction_targets, mas_importance, mas_penalty, select_parameters)
from modules.clicks import Click
from modules.errors import UserError
from modules.interactive import EvaluationProtocol, InteractiveSegmentationModule
from modules.session import ClickLabels, ZoomIn


def small_module(prev_mask: bool = False) -> InteractiveSegmentationModule:
    torch.manual_seed(0)
    m = InteractiveSegmentationModule(aspp_channels=16, decoder_channels=16, prev_mask=prev_mask)
    m.mas_importance = {n: torch.ones_like(p) for n, p in m.named_parameters()}
    m.protocol = EvaluationProtocol(max_clicks=3)
    return m.eval()


def run_test(module, callbacks, n=2):
    recorder = ClickRecorder()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, inference_mode=False, callbacks=[recorder, *callbacks])
    loader = DataLoader(EvalObjects(SyntheticObjects("fundus", n, 5, 64, 16)), batch_size=1)
    trainer.test(module, dataloaders=loader, verbose=False)
    return recorder


def weights(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def same(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def largest_change(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in a)


IMAGE = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
CLICKS = [Click(20, 20, True), Click(40, 44, False), Click(10, 50, True)]


def test_correction_targets_and_loss_terms():
    clicks = torch.tensor([[[2.0, 3.0, 1.0], [5.0, 1.0, -1.0], [0.0, 0.0, 0.0], [9.0, 4.0, -1.0], [3.0, -2.0, 1.0]]])
    target, valid = correction_targets(clicks, (8, 8))  # the last two lie outside (a zoom-in view): no label
    assert valid.sum() == 2 and valid[0, 0, 2, 3] and valid[0, 0, 5, 1]
    assert target[0, 0, 2, 3] == 1 and target[0, 0, 5, 1] == 0 and target.sum() == 1
    logits = torch.full((1, 1, 8, 8), -20.0)
    logits[0, 0, 2, 3] = 20.0  # agrees with both corrections
    assert adaptation_loss(logits, clicks, None, lam=1.0) < 1e-6
    prev = torch.ones(1, 1, 8, 8)  # "everything foreground" disagrees with 63 pixels
    assert adaptation_loss(logits, clicks, prev, lam=0.5) > 5


def test_mas_penalty_and_its_analytic_gradient():
    m = small_module()
    params = select_parameters(m, r"net\.head\.")
    anchor = {n: p.detach().clone() for n, p in params.items()}
    importance = {n: torch.rand_like(p) for n, p in params.items()}
    assert mas_penalty(params, anchor, importance) == 0
    anchor = {n: a + 0.05 for n, a in anchor.items()}
    (1.5 * mas_penalty(params, anchor, importance)).backward()
    autograd = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    add_mas_gradient(params, anchor, importance, gamma=1.5)
    for n, p in params.items():
        assert torch.allclose(p.grad, autograd[n], atol=1e-6)


def test_mas_importance_is_aljundis_on_a_linear_model():
    """For logits f = w.x, d||f||^2/dw = 2 (w.x) x: the importance is its mean absolute value."""
    lin = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
    xs = [torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.0, 1.0, -1.0]])]
    imp = mas_importance(lin, lambda x: lin(x).view(1, 1, 1, 1), xs)
    expected = (2 * 2.0 * xs[0].abs() + 2 * 2.5 * xs[1].abs()) / 2  # w.x = 2.0 and -2.5
    assert torch.allclose(imp["weight"], expected)


def test_select_parameters():
    m = small_module()
    encoder = {id(p) for p in m.net.encoder.parameters()}
    assert not any(id(p) in encoder for p in select_parameters(m, "decoder").values())
    assert set(select_parameters(m, r"net\.head\.")) == {"net.head.weight", "net.head.bias"}
    assert set(select_parameters(m, "head")) == {"net.head.weight", "net.head.bias"}
    norms = select_parameters(m, "norm")
    assert norms and all(p.dim() == 1 for p in norms.values())
    with pytest.raises(UserError, match="selects no parameter"):
        select_parameters(m, "nothing_matches_this")


def test_ia_turns_corrections_into_constraints():
    m = small_module()
    session = m.session(IMAGE)
    session.adapter = Adapter(m, ImageAdaptation(steps=50, lr=1e-2, gamma=0.0, until_respected=True))
    session.adapter.begin(session)
    prob = session.click(*CLICKS)
    assert prob[20, 20] > 0.5 and prob[10, 50] > 0.5 and prob[40, 44] < 0.5


def test_until_respected_stops_before_a_needless_step():
    m = small_module()
    start = weights(m)
    adapter = Adapter(m, ImageAdaptation(steps=50, lr=1e-2, gamma=0.0, until_respected=True))
    m.adapter = adapter
    session = m.session(IMAGE)
    session.click(*CLICKS)
    assert adapter.ia_steps > 0  # the random model does not respect the clicks at first
    with torch.no_grad():
        assert bool(((session.logits() > 0)[0, 0, [20, 10, 40], [20, 50, 44]] == torch.tensor([True, True, False])).all())
    steps = adapter.ia_steps
    session.click(Click(21, 21, True))  # next to a respected positive click: nothing to correct
    assert adapter.ia_steps == steps
    session.finish()
    assert same(start, weights(m))


def test_first_click_keeps_the_prediction_without_clicks_when_lam_below_one():
    """Algorithm 1 predicts p before the first correction; with lam < 1 Eq. 4 keeps it."""
    m = small_module()
    session = m.session(IMAGE)
    session.clicks = [CLICKS[0]]
    with torch.no_grad():
        expected = m(session.net_image, session.net_clicks([])).sigmoid()
    assert torch.equal(session.previous_probability(), expected)


def test_ia_resets_per_image_sa_carries_over():
    m = small_module()
    start = weights(m)
    run_test(m, [TestTimeAdaptation(image=ImageAdaptation(steps=2, lr=1e-3))])
    assert same(start, weights(m)), "IA must leave the starting weights untouched between images"
    m2 = small_module()
    run_test(m2, [TestTimeAdaptation(sequence=SequenceAdaptation(lr=1e-3), click_labels=ClickLabels())])
    assert not same(start, weights(m2)), "SA must change the weights"
    assert m2.adapter is None and m2.click_labels is None, "after the test the module predicts alone again"


def test_ia_sa_restores_the_image_start_before_the_sa_step():
    """IA moves the weights a lot (lr 1e-2) inside the image; after it only SA's one Adam step
    (at most lr 1e-4 per weight) remains."""
    m = small_module()
    start = weights(m)
    adapter = Adapter(m, ImageAdaptation(steps=5, lr=1e-2, gamma=0.0), SequenceAdaptation(lr=1e-4, gamma=0.0))
    m.adapter = adapter
    session = m.session(IMAGE)
    session.click(*CLICKS)
    assert largest_change(start, weights(m)) > 1e-3
    session.finish()
    after = weights(m)
    assert 0 < largest_change(start, after) <= 1.01e-4


def test_sa_states_replays_the_inputs_the_network_had():
    """``inputs: states``: the first click alone (no previous mask), then a later click state
    with the mask predicted before it; only the clicks until ``upto`` count."""
    m = small_module(prev_mask=True)
    adapter = Adapter(m, sequence=SequenceAdaptation(inputs="states", states=3, lr=1e-3, gamma=0.0))
    m.adapter = adapter
    session = m.session(IMAGE)
    for c in [*CLICKS, Click(30, 30, True)]:
        session.click(c)
    states = adapter._sa_states(session, 3)
    assert len(states) == 3 and states[0][2] is None and states[0][1].tolist() == [0]
    for (view, keep, after), i in zip(states[1:], (1, 2)):
        assert view == session.views[i] and len(keep) == i + 1 and torch.equal(session.probability_after(after), session.history[i - 1])
    start = weights(m)
    session.finish(upto=3)
    assert not same(start, weights(m)), "SA must change the weights"
    with pytest.raises(UserError, match="sequence.inputs='everything'"):
        SequenceAdaptation(inputs="everything")


def test_sa_with_sgd_steps_in_proportion_to_the_gradient():
    """``optimizer: sgd``: SA's step is ``-lr * grad`` of Eq. 4 on the image's clicks (Adam's
    would be about ``lr`` on every weight whatever the gradient's size)."""
    m = small_module()
    lr = 1e-2
    m.adapter = Adapter(m, sequence=SequenceAdaptation(lr=lr, gamma=0.0, guidance_ratio=1.0, optimizer="sgd"))
    session = m.session(IMAGE)
    session.click(*CLICKS)
    start = weights(m)
    with torch.enable_grad():
        clicks = session.net_clicks()
        previous = (session.probability_after(len(CLICKS)) > 0.5).float()
        m.zero_grad(set_to_none=True)
        adaptation_loss(session.logits(clicks=clicks, prev=False), clicks, previous, 0.5).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    session.finish()
    after = weights(m)
    assert max(float(g.abs().max()) for g in grads.values()) * lr > 1e-6, "the test needs a gradient"
    for n, g in grads.items():
        torch.testing.assert_close(after[n], start[n] - lr * g, rtol=1e-4, atol=1e-7)
    assert all(torch.equal(after[n], start[n]) for n in start if n not in grads)
    with pytest.raises(UserError, match="sequence.optimizer='rmsprop'"):
        SequenceAdaptation(optimizer="rmsprop")


def test_sa_replays_each_state_in_the_view_it_was_predicted_in():
    """With zoom-in the first clicks are predicted on the whole image and later ones on a crop:
    SA's step sees each replayed state as the network saw it, and the session's view is kept."""

    m = small_module(prev_mask=True)
    with torch.no_grad():
        m.net.head.bias.fill_(-20.0)  # an empty prediction: the crop is the positive clicks' box
    m.adapter = Adapter(m, sequence=SequenceAdaptation(inputs="states", states=3, lr=1e-3, gamma=0.0))
    session = m.session(IMAGE)
    session.zoom_in = ZoomIn(skip_clicks=1, min_crop_size=24, expansion_ratio=1.0)
    seen = []
    logits = session.logits
    session.logits = lambda **kw: seen.append((session.view, session.net_image.shape[-2:])) or logits(**kw)
    for c in CLICKS:
        session.click(c)
    assert session.views[0] == session.whole and session.view != session.whole
    current = session.view
    states = m.adapter._sa_states(session, 3)
    seen.clear()
    session.finish()
    assert [v for v, _ in seen] == [v for v, _, _ in states] and seen[0][0] == session.whole and session.view == current


def test_undo_gives_the_weights_of_the_remaining_clicks():
    m = small_module(prev_mask=True)
    start = weights(m)
    ia = ImageAdaptation(steps=3, lr=1e-3, gamma=0.0)
    m.adapter = Adapter(m, ia)
    one = m.session(IMAGE)
    p1 = one.click(CLICKS[0])
    w1 = weights(m)
    one.finish()
    assert same(start, weights(m))
    two = m.session(IMAGE)
    two.click(CLICKS[0])
    two.click(CLICKS[1])
    assert not same(w1, weights(m))
    back = two.undo()
    assert same(w1, weights(m)) and len(two.clicks) == 1
    assert (back == p1).all()


def test_deferred_ia_answers_first_and_adapts_after():
    m = small_module()
    fixed = m.session(IMAGE).click(CLICKS[0])
    m.adapter = Adapter(m, ImageAdaptation(steps=3, lr=1e-3, gamma=0.0))
    session = m.session(IMAGE, defer=True)
    start = weights(m)
    prob = session.click(CLICKS[0])
    assert (prob == fixed).all() and same(start, weights(m)) and session.pending  # answered before any step
    session.adapt()
    assert not same(start, weights(m)) and not session.pending


def test_a_blown_up_step_is_rolled_back_and_counted():
    m = small_module()
    start = weights(m)
    adapter = Adapter(m, ImageAdaptation(steps=2, lr=1e6, gamma=0.0))
    m.adapter = adapter
    session = m.session(IMAGE)
    prob = session.click(*CLICKS)
    assert torch.isfinite(torch.as_tensor(prob)).all()
    if adapter.rollbacks == 0:  # the weights stayed finite: the prediction must then be too
        assert not same(start, weights(m))
    session.finish()
    assert same(start, weights(m))


def test_missing_importance_and_cached_parameters_are_clear_errors():
    m = small_module()
    m.mas_importance = None
    with pytest.raises(UserError, match="MAS importance missing"):
        Adapter(m, ImageAdaptation(gamma=1.0), importance=None)
    Adapter(m, ImageAdaptation(gamma=0.0))  # no penalty: no importance needed
    with pytest.raises(UserError, match="cache=encoder cannot adapt 'net.encoder"):
        Adapter(m, ImageAdaptation(parameters="all", cache="encoder", gamma=0.0))
    with pytest.raises(UserError, match="cache=decoder cannot adapt 'net.aspp"):
        Adapter(m, ImageAdaptation(parameters="decoder", cache="decoder", gamma=0.0))
    with pytest.raises(UserError, match="image.lr=-1"):
        ImageAdaptation(lr=-1)


@pytest.mark.parametrize("parameters, cache, lr, may_change", [
    ("decoder", "encoder", 1e-2, lambda n: not n.startswith("net.encoder.")),
    ("head", "decoder", 1e-1, lambda n: n.startswith("net.head."))])
def test_ia_on_cached_features_changes_only_what_it_adapts(parameters, cache, lr, may_change):
    """``ia_decoder`` (decoder on cached encoder features) and ``ia_head`` (the 1x1 head on cached
    decoder features): the clicks' loss falls, and only the selected weights move."""
    m = small_module()
    before = weights(m)
    m.adapter = Adapter(m, ImageAdaptation(steps=3, lr=lr, gamma=0.0, parameters=parameters, cache=cache))
    session = m.session(IMAGE)
    c = session.net_clicks(CLICKS)
    with torch.no_grad():
        loss_before = adaptation_loss(m(session.net_image, c), c, None, lam=1.0)
    session.click(*CLICKS)
    with torch.no_grad():
        loss_after = adaptation_loss(m(session.net_image, c), c, None, lam=1.0)
    assert loss_after < loss_before
    changed = {n for n in before if not torch.equal(before[n], weights(m)[n])}
    assert changed and all(may_change(n) for n in changed), changed


def test_variants_compose_without_restating(tmp_path):
    adapt = ROOT / "configs" / "adapt"
    ia_sa = read_variant("ia_sa", adapt)
    assert ia_sa == {"image": read_variant("ia", adapt)["image"], "sequence": read_variant("sa", adapt)["sequence"]}
    paper = variant_callback("paper/ia_sa", adapt)
    assert (paper.image.steps, paper.image.lr, paper.sequence.lr, paper.sequence.gamma) == (10, 1e-6, 1e-6, 2.0)
    assert variant_callback("fixed", adapt).image is None
    for preset in sorted(adapt.rglob("*.yaml")):  # every shipped preset validates
        variant_callback(preset.relative_to(adapt).with_suffix("").as_posix(), adapt)
    for config in sorted((ROOT / "configs").glob("*.yaml")):  # and every shipped benchmark's variants
        for variant in yaml.safe_load(config.read_text()).get("variants", []):
            variant_callback(variant, adapt)
    assert variant_callback("sa_mas", adapt).sequence.gamma == 0.03 and variant_callback("sa", adapt).sequence.gamma == 0.0
    plain, zoom = variant_callback("ia_sa", adapt), variant_callback("zoom/ia_sa", adapt)  # the same adaptation, RITM's predictor
    assert (zoom.image, zoom.sequence) == (plain.image, plain.sequence) and plain.zoom_in is None is plain.tta
    assert zoom.zoom_in == ZoomIn(skip_clicks=3, expansion_ratio=2.0, min_crop_size=32, target_size=192) and zoom.tta.flip
    inline = variant_callback({"name": "x", "image": "ia", "sequence": {"lr": 3e-5}}, adapt)
    assert inline.image == paper.image.__class__(**read_variant("ia", adapt)["image"]) and inline.sequence.lr == 3e-5
    (tmp_path / "bad.yaml").write_text("image: {steps: 3, rate: 1}\n")
    with pytest.raises(UserError, match=r"unknown key\(s\) \['rate'\]"):
        variant_callback("bad", tmp_path)
    (tmp_path / "loop.yaml").write_text("image: loop\n")
    with pytest.raises(UserError, match="refers to itself"):
        variant_callback("loop", tmp_path)
    zoomed = variant_callback({"name": "ia_zoom", "image": "ia", "zoom_in": {"min_crop_size": 64}}, adapt)
    assert zoomed.zoom_in.min_crop_size == 64 and zoomed.image == inline.image
    with pytest.raises(UserError, match="zoom"):
        variant_callback({"name": "rw_zoom", "random_walker": "random_walker", "zoom_in": {}}, adapt)
    with pytest.raises(UserError, match=r"^random_walker.seed_radius=0: expected >= 1$"):
        variant_callback({"name": "rw", "random_walker": {"seed_radius": 0}}, adapt)


def test_ia_with_zoom_in_adapts_in_the_crop_and_undo_replays_it():
    m = small_module(prev_mask=True)
    m.adapter, m.zoom_in = Adapter(m, ImageAdaptation(steps=2, lr=1e-3, gamma=0.0)), ZoomIn(skip_clicks=1, min_crop_size=24)
    one = m.session(IMAGE)
    one.click(CLICKS[0])
    with torch.no_grad():  # a small predicted object, so that the next click zooms in
        one.history[-1] = torch.zeros_like(one.history[-1])
        one.history[-1][..., 16:28, 16:28] = 1.0
    one.click(CLICKS[1])
    assert one.view != one.whole
    w2 = weights(m)
    one.click(CLICKS[2])
    one.undo()  # the weights the first two clicks lead to, each replayed in its own view
    assert same(w2, weights(m)) and one.view == one.views[-1]


def test_benchmark_adaptation_changes_the_ious_and_paper_presets_run(tiny_ckpt_with_importance, tmp_path):
    from lightning_app.cli import main

    out = tmp_path / "bench"
    variants = "[fixed, ia_sa, ia_decoder, ia_head, paper/ia_sa, {name: ia_fast, image: {steps: 5, lr: 0.01}}]"
    assert main(["benchmark", "--config", str(ROOT / "configs/benchmark.yaml"), "--ckpt", str(tiny_ckpt_with_importance),
                 "--out_dir", str(out), "--variants", variants, "--max_clicks", "3",
                 "--data.test", f"[{synthetic('fundus', 2)}]", "--data.num_workers", "0", "--data.min_area", "64"]) == 0
    results = json.loads((out / "results.json").read_text())
    names = ["fixed", "ia_sa", "ia_decoder", "ia_head", "paper/ia_sa", "ia_fast"]
    assert list(results["results"]["fundus"]) == names
    assert (out / "iou_at_k_vs_images.png").is_file() and (out / "results.md").is_file()
    objects = results["objects"]["fundus"]
    assert objects["ia_fast"]["ious"] != objects["fixed"]["ious"], "strong IA must change some IoU"
    fixed, ia = results["results"]["fundus"]["fixed"], results["results"]["fundus"]["ia_fast"]
    assert ia["seconds_per_click"] > fixed["seconds_per_click"]  # IA's gradient steps are timed per click
    assert fixed["cpu_threads"] == torch.get_num_threads()  # what the weights of an adapting run depend on
    assert fixed["environment"]["cpu_threads"] == torch.get_num_threads() and fixed["environment"]["numpy"] == np.__version__


@pytest.mark.slow
@pytest.mark.parametrize("synchronize", [False, True])
def test_ddp_two_cpu_processes(tiny_ckpt_with_importance, tmp_path, synchronize):
    adapt = tmp_path / "adapt"
    adapt.mkdir()
    (adapt / "sa.yaml").write_text(f"sequence: {{lr: 1.0e-3, synchronize: {str(synchronize).lower()}}}\n")
    out = tmp_path / "bench"
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "lightning_app", "benchmark", "--ckpt", str(tiny_ckpt_with_importance),
                        "--out_dir", str(out), "--variants", "[sa]", "--adapt_dir", str(adapt), "--max_clicks", "4",
                        "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
                        "--data.test", f"[{synthetic('fundus', 5)}]",
                        "--data.num_workers", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["results"]["fundus"]["sa"]["n_objects"] == 5  # both ranks' shares, padding dropped
    names = results["objects"]["fundus"]["sa"]["names"]
    assert sorted(int(n.rsplit("/", 1)[1]) for n in names) == [0, 1, 2, 3, 4]
