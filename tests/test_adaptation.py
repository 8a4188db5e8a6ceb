"""Test-time adaptation: the loss, the callbacks' weight handling, gradients, DDP."""
import json
import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from conftest import ROOT, synthetic
from torch.utils.data import DataLoader

from callbacks.adaptation import ImageAdaptation, SequenceAdaptation
from callbacks.benchmark import ClickRecorder
from datamodules.objects import EvalObjects
from datamodules.synthetic import SyntheticObjects
from modules.adaptation import adaptation_loss, correction_targets, mas_importance, mas_penalty, select_parameters
from modules.clicks import Click
from modules.errors import UserError
from modules.interactive import InteractiveSegmentationModule


def small_module() -> InteractiveSegmentationModule:
    torch.manual_seed(0)
    m = InteractiveSegmentationModule(aspp_channels=16, decoder_channels=16, eval_max_clicks=3)
    m.mas_importance = {n: torch.ones_like(p) for n, p in m.named_parameters()}
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


def test_correction_targets_and_loss_terms():
    clicks = torch.tensor([[[2.0, 3.0, 1.0], [5.0, 1.0, -1.0], [0.0, 0.0, 0.0]]])
    target, valid = correction_targets(clicks, (8, 8))
    assert valid.sum() == 2 and valid[0, 0, 2, 3] and valid[0, 0, 5, 1]
    assert target[0, 0, 2, 3] == 1 and target[0, 0, 5, 1] == 0 and target.sum() == 1
    logits = torch.full((1, 1, 8, 8), -20.0)
    logits[0, 0, 2, 3] = 20.0  # agrees with both corrections
    assert adaptation_loss(logits, clicks, None, lam=1.0) < 1e-6
    prev = torch.ones(1, 1, 8, 8)  # "everything foreground" disagrees with 63 pixels
    assert adaptation_loss(logits, clicks, prev, lam=0.5) > 5


def test_mas_penalty_zero_at_anchor_positive_away():
    m = small_module()
    params = select_parameters(m, "decoder")
    anchor = {n: p.detach().clone() for n, p in params.items()}
    importance = {n: torch.ones_like(p) for n, p in params.items()}
    assert mas_penalty(params, anchor, importance) == 0
    with torch.no_grad():
        next(iter(params.values())).add_(0.1)
    assert mas_penalty(params, anchor, importance) > 0


def test_mas_importance_is_normalised_and_covers_parameters():
    m = small_module()
    x = [{"image": torch.rand(1, 3, 32, 32), "clicks": torch.tensor([[[16.0, 16.0, 1.0]]])} for _ in range(2)]
    imp = mas_importance(m, lambda b: m(b["image"], b["clicks"]).sigmoid(), x)
    flat = torch.cat([t.flatten() for t in imp.values()])
    assert set(imp) == {n for n, _ in m.named_parameters()}
    assert abs(float(flat.mean()) - 1.0) < 1e-4 and float(flat.min()) >= 0


def test_select_parameters():
    m = small_module()
    assert not any(n.startswith("net.encoder.") for n in select_parameters(m, "decoder"))
    assert set(select_parameters(m, r"net\.head\.")) == {"net.head.weight", "net.head.bias"}
    with pytest.raises(ValueError, match="selects no parameter"):
        select_parameters(m, "nothing_matches_this")


def test_image_adaptation_turns_corrections_into_constraints():
    m = small_module()
    ia = ImageAdaptation(steps=10, lr=1e-2, lam=1.0, gamma=0.0)
    ia.setup(None, m, "test")
    ia.on_test_batch_start(None, m, None, 0)
    predictor = m.predictor(torch.rand(1, 3, 64, 64))
    predictor.hooks = [ia.on_click]
    clicks = [Click(20, 20, True), Click(40, 44, False), Click(10, 50, True)]
    prob = predictor(clicks)
    assert prob[20, 20] > 0.5 and prob[10, 50] > 0.5 and prob[40, 44] < 0.5


def test_first_click_keeps_the_prediction_before_any_click_when_lam_below_one():
    """Algorithm 1 predicts p before the first correction; with lam < 1 Eq. 4 keeps it."""
    m = small_module()
    image = torch.rand(1, 3, 64, 64)
    for lam, expect_previous in ((1.0, False), (0.5, True)):
        ia = ImageAdaptation(steps=1, lr=1e-3, lam=lam, gamma=0.0)
        ia.setup(None, m, "test")
        ia.on_test_batch_start(None, m, None, 0)
        predictor = m.predictor(image)
        with torch.no_grad():
            no_clicks = predictor.logits(predictor.net_clicks([])).sigmoid()
        predictor.on_first = None

        def spy(p, clicks):
            predictor.on_first = None if p.previous is None else p.previous.clone()

        predictor.hooks = [ia.on_click, spy]
        predictor([Click(20, 20, True)])
        assert (predictor.on_first is not None) == expect_previous
        if expect_previous:
            assert torch.allclose(predictor.on_first, no_clicks)
        ia.on_test_batch_end(None, m, None, None, 0)


def test_ia_resets_per_image_sa_carries_over():
    m = small_module()
    start = weights(m)
    run_test(m, [ImageAdaptation(steps=2, lr=1e-3)])
    assert same(start, weights(m)), "IA must leave the starting weights untouched between images"
    m2 = small_module()
    run_test(m2, [SequenceAdaptation(lr=1e-3)])
    assert not same(start, weights(m2)), "SA must change the weights"


class WeightSpy(pl.Callback):
    def __init__(self):
        self.at_start, self.at_end = [], []

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.at_start.append(weights(pl_module))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.at_end.append(weights(pl_module))


def test_ia_sa_starts_each_image_from_the_sa_weights():
    m = small_module()
    spy = WeightSpy()  # between IA and SA: sees IA's restore before SA's step
    run_test(m, [ImageAdaptation(steps=2, lr=1e-3, gamma=0.0), spy, SequenceAdaptation(lr=1e-3)], n=2)
    assert same(spy.at_end[0], spy.at_start[0]), "IA restores the image's starting weights"
    assert not same(spy.at_start[1], spy.at_start[0]), "SA's step moves the next image's start"
    assert same(spy.at_end[1], spy.at_start[1])


def test_only_the_chosen_subset_gets_gradients():
    m = small_module()
    encoder_before = {n: p.detach().clone() for n, p in m.named_parameters() if n.startswith("net.encoder.")}
    ia = ImageAdaptation(steps=2, lr=1e-2, parameters="decoder", cache="encoder")
    ia.setup(None, m, "test")
    ia.on_test_batch_start(None, m, None, 0)
    predictor = m.predictor(torch.rand(1, 3, 64, 64))
    predictor.hooks = [ia.on_click]
    predictor([Click(30, 30, True)])
    for n, p in m.named_parameters():
        if n.startswith("net.encoder."):
            assert p.grad is None and torch.equal(p, encoder_before[n])
    assert all(p.grad is not None for p in ia.params.values())


def test_missing_importance_is_a_clear_error():
    m = small_module()
    m.mas_importance = None
    with pytest.raises(UserError, match="MAS importance missing"):
        ImageAdaptation(gamma=1.0).setup(None, m, "test")
    ImageAdaptation(gamma=0.0).setup(None, small_module(), "test")  # no penalty: no importance needed


def test_cache_refuses_parameters_inside_the_cached_part():
    with pytest.raises(UserError, match="cache=encoder cannot adapt 'net.encoder"):
        ImageAdaptation(parameters="all", cache="encoder", gamma=0.0).setup(None, small_module(), "test")
    with pytest.raises(UserError, match="cache=decoder cannot adapt 'net.aspp"):
        ImageAdaptation(parameters="decoder", cache="decoder", gamma=0.0).setup(None, small_module(), "test")


def test_head_only_adaptation_on_cached_decoder_features():
    m = small_module()
    before = weights(m)
    ia = ImageAdaptation(steps=10, lr=0.1, gamma=0.0, parameters=r"net\.head\.", cache="decoder")
    ia.setup(None, m, "test")
    ia.on_test_batch_start(None, m, None, 0)
    predictor = m.predictor(torch.rand(1, 3, 64, 64))
    clicks = [Click(20, 20, True), Click(40, 44, False)]
    c = predictor.net_clicks(clicks)
    with torch.no_grad():
        loss_before = adaptation_loss(predictor.logits(c), c, None, lam=1.0)
    predictor.hooks = [ia.on_click]
    predictor(clicks)
    with torch.no_grad():
        loss_after = adaptation_loss(predictor.logits(c), c, None, lam=1.0)
    assert loss_after < loss_before
    after = weights(m)
    assert {n for n in before if not torch.equal(before[n], after[n])} == {"net.head.weight", "net.head.bias"}


def test_analytic_mas_gradient_equals_autograd():
    from modules.adaptation import add_mas_gradient

    m = small_module()
    params = select_parameters(m, r"net\.head\.")
    anchor = {n: p.detach().clone() + 0.05 for n, p in params.items()}
    importance = {n: torch.rand_like(p) for n, p in params.items()}
    (1.5 * mas_penalty(params, anchor, importance)).backward()
    autograd = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    add_mas_gradient(params, anchor, importance, gamma=1.5)
    for n, p in params.items():
        assert torch.allclose(p.grad, autograd[n], atol=1e-6)


def test_benchmark_runs_all_variants_side_by_side(tiny_ckpt_with_importance, tmp_path):
    from lightning_app.cli import main

    out = tmp_path / "bench"
    assert main(["benchmark", "--config", str(ROOT / "configs/benchmark.yaml"), "--ckpt", str(tiny_ckpt_with_importance),
                 "--out_dir", str(out), "--variants", "[fixed, ia, sa, ia_sa, ia_decoder, ia_head]", "--max_clicks", "3",
                 "--data.test", f"[{synthetic('fundus', 2)}]",
                 "--data.num_workers", "0"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["results"]["fundus"]) == ["fixed", "ia", "sa", "ia_sa", "ia_decoder", "ia_head"]
    assert (out / "iou_at_k_vs_images.png").is_file()
    fixed, ia = results["results"]["fundus"]["fixed"], results["results"]["fundus"]["ia"]
    assert ia["seconds_per_click"] > fixed["seconds_per_click"]  # IA's gradient steps are timed per click


@pytest.mark.parametrize("synchronize", [False, True])
def test_ddp_two_cpu_processes(tiny_ckpt_with_importance, tmp_path, synchronize):
    adapt = tmp_path / "adapt"
    adapt.mkdir()
    (adapt / "sa.yaml").write_text(
        "callbacks:\n  - class_path: callbacks.adaptation.SequenceAdaptation\n"
        f"    init_args: {{lr: 1.0e-3, synchronize: {str(synchronize).lower()}}}\n")
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
    rows = (out / "per_object_iou.csv").read_text().splitlines()[1:]
    assert sorted(int(r.split(",")[2].rsplit("/", 1)[1]) for r in rows) == [0, 1, 2, 3, 4]
