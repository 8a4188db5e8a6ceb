"""Paper B: three-click protocol, IPT (Eq. 1-6), feature-alignment losses (Eq. 7-11), and the
evolution sequence end to end (clicks only, table, resume after a kill)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, synthetic, tiny_fit_args
from torch import nn

from datamodules.evolution import MaskFree, PairedObjects, record_interactions
from datamodules.synthetic import SyntheticObjects
from modules.evaluation import evaluate_object
from modules.evolution import expand_classifier, feature_alignment_loss, known_class, max_squares_loss, replay_weight
from modules.ipt import (centre_points, edge_mask, mean_confidence, prototype, prototype_confidence,
                         refine_pseudo_mask, vote)
from modules.metrics import iou
from modules.simulate import three_click_protocol


# -- the three-click protocol ---------------------------------------------------------------
def test_three_clicks_are_box_corners_and_an_interior_point():
    mask = np.zeros((40, 50), bool)
    mask[10:20, 15:35] = True
    pos, neg1, neg2 = three_click_protocol(mask, margin=3)
    assert pos.positive and mask[pos.y, pos.x] and 13 <= pos.y <= 16  # the interior-most row band
    assert (neg1.y, neg1.x, neg1.positive) == (7, 12, False) and (neg2.y, neg2.x, neg2.positive) == (22, 37, False)
    edge = np.zeros((40, 50), bool)
    edge[0:5, 45:50] = True  # corners outside the image are clipped onto it
    _, a, b = three_click_protocol(edge)
    assert (a.y, a.x) == (0, 42) and (b.y, b.x) == (7, 49)
    rng = np.random.default_rng(0)
    for _ in range(20):
        p, *_ = three_click_protocol(mask, rng, jitter=4)
        assert mask[p.y, p.x]


def test_evaluation_gives_the_three_clicks_first():
    gt = np.zeros((32, 32), bool)
    gt[8:24, 8:24] = True
    seen = []

    def predict(clicks):
        seen.append(len(clicks))
        return gt.astype(float) * (0.7 if len(clicks) < 4 else 1.0)

    r = evaluate_object(predict, gt, max_clicks=5, initial=three_click_protocol(gt))
    assert seen[0] == 3 and list(r.ious[:2]) == [0.0, 0.0] and r.ious[2] == 1.0 and len(r.ious) == 5


# -- IPT, Eq. 1-6 ------------------------------------------------------------------------------
def two_cluster_features(obj: np.ndarray) -> torch.Tensor:
    """2-channel features: (1, 0) on the object, (0, 1) elsewhere."""
    f = np.stack([obj, ~obj]).astype(np.float32)
    return torch.from_numpy(f)


def test_prototype_is_the_weighted_mean_and_confidence_separates_clusters():
    obj = np.zeros((12, 12), bool)
    obj[3:9, 3:9] = True
    f = two_cluster_features(obj)
    q = torch.from_numpy(obj.astype(np.float32))
    assert torch.allclose(prototype(f, q), torch.tensor([1.0, 0.0]))
    assert torch.allclose(prototype(f, torch.full((12, 12), 0.5)), torch.tensor([36 / 144, 108 / 144]))
    p = prototype_confidence(f, q)
    assert p[obj].min() > 0.85 and p[~obj].max() < 0.15  # exp(-0) / (exp(-0) + exp(-2))
    assert mean_confidence(p, obj) == pytest.approx(float(p[obj].mean()))


def test_edge_mask_is_the_band_the_erosion_removes():
    mask = np.zeros((40, 40), bool)
    mask[5:35, 5:35] = True
    edge = edge_mask(mask, kernel=5, iterations=3)  # 3 x 2 px eroded from every side
    assert edge[5:11, 20].all() and not edge[11:29, 20].any() and edge.sum() == 30 * 30 - 18 * 18
    small = np.zeros((40, 40), bool)
    small[10:14, 10:14] = True
    assert (edge_mask(small) == small).all()  # eroded away entirely: all edge


def test_centre_points_and_vote():
    mask = np.zeros((30, 30), bool)
    mask[5:25, 5:25] = True
    q = centre_points(mask, (15, 15), np.random.default_rng(0), points=3, radius=4)
    ys, xs = np.nonzero(q)
    assert len(ys) == 4 and q[15, 15] == 1 and mask[ys, xs].all() and (((ys - 15) ** 2 + (xs - 15) ** 2) <= 16).all()
    a, b, c = (np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool), np.array([0, 0, 1, 0], bool))
    assert list(vote(a, b, c)) == [True, False, True, False]


def test_ipt_removes_a_spurious_blob_and_restores_a_missed_part():
    obj = np.zeros((48, 48), bool)
    obj[10:38, 10:38] = True
    features = two_cluster_features(obj)
    coarse = obj.copy()
    coarse[10:38, 30:38] = False  # a missed strip of the object
    coarse[40:46, 20:30] = True  # a spurious blob on the background
    binary = np.where(coarse, 0.9, 0.1)
    out = refine_pseudo_mask(features, coarse, binary, (24, 20), np.random.default_rng(0))
    assert iou(out["mask"], obj) > iou(coarse, obj) + 0.1
    assert not out["mask"][40:46, 20:30].any() and out["mask"][10:38, 30:38].all()
    empty = refine_pseudo_mask(features, np.zeros_like(obj), binary, (24, 20), np.random.default_rng(0))
    assert not empty["mask"].any()


# -- feature alignment, Eq. 7-11 ---------------------------------------------------------------
def test_feature_alignment_loss():
    mask = torch.zeros(1, 8, 8)
    mask[0, 2:6, 2:6] = 1
    fa = torch.zeros(1, 4, 8, 8)
    fa[:, 0] = 1.0
    binary = torch.full((1, 8, 8), 0.5)
    same = feature_alignment_loss(fa, mask, fa.clone(), mask, binary, torch.tensor([True]))
    assert same.item() == pytest.approx(0.0, abs=1e-7)
    fb = fa.clone().requires_grad_(True)
    with torch.no_grad():
        fb[:, 1, 2:4] = 1.0  # part of B's object differs from A's prototype
    unknown = feature_alignment_loss(fa, mask, fb, mask, binary, torch.tensor([False]))
    known = feature_alignment_loss(fa, mask, fb, mask, binary, torch.tensor([True]))
    assert 0 < unknown.item() < known.item()  # Eq. 8 is Eq. 7 without the pixel term
    sure = feature_alignment_loss(fa, mask, fb, mask, torch.full((1, 8, 8), 1.0), torch.tensor([True]))
    assert sure.item() < known.item()  # 1 / M'_b: uncertain pixels weigh more
    known.backward()
    assert fb.grad is not None and fb.grad.abs().sum() > 0
    empty = feature_alignment_loss(fa, torch.zeros(1, 8, 8), fb, mask, binary, torch.tensor([True]))
    assert empty.item() == 0.0


def test_max_squares_and_replay_weight_and_classifier():
    p = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    ms = max_squares_loss(p, torch.tensor([False, False]))
    assert ms.item() == pytest.approx((-1.0 - 0.5) / 2)
    assert max_squares_loss(p, torch.tensor([True, True])).item() == pytest.approx(ms.item() / 2)
    assert [replay_weight(x) for x in (0.0, 0.5, 1.0, 2.0)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    old = nn.Linear(6, 4)
    new = expand_classifier(old)
    assert new.out_features == 5 and torch.equal(new.weight[:4], old.weight) and torch.equal(new.bias[:4], old.bias)
    logits = torch.tensor([[5.0, 0, 0, 0, 0], [0, 0, 0, 0, 5.0], [0.1, 0, 0, 0, 0]])
    assert known_class(logits, 4, 0.5).tolist() == [0, -1, -1]


def test_pairs_take_an_earlier_object_of_the_judged_class():
    class Fake:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return {"i": i}

    pairs = PairedObjects(Fake(3), [2, -1, 7], Fake(6), [0, 2, 2, -1, 1, 0])
    for _ in range(20):
        same, anyone, missing = pairs[0], pairs[1], pairs[2]
        assert same["a"]["i"] in (1, 2) and same["b"]["pair_class"] == 2
        assert anyone["b"]["pair_class"] == -1
        assert missing["b"]["pair_class"] == -1  # no earlier object of class 7: a class-agnostic pair


# -- the sequence end to end -------------------------------------------------------------------
class GuardedObjects(SyntheticObjects):
    """A stage dataset whose masks must never be read."""

    def get_sample(self, index):
        raise AssertionError("the evolution stage read a ground-truth mask")


@pytest.fixture(scope="module")
def evolve_init_ckpt(tmp_path_factory):
    from lightning_app.cli import main

    root = tmp_path_factory.mktemp("evolve_init")
    assert main(tiny_fit_args(root, steps=4, config="configs/evolve/init.yaml")) == 0
    return root / "checkpoints" / "last.ckpt"


def evolve_args(ckpt, out, stages="[fundus, rooftop]", epochs=2):
    entry = lambda d, n, seed: synthetic(d, n, seed)  # noqa: E731
    catalog = {d: {"train": entry(d, 12, 5), "test": entry(d, 3, 2)} for d in ("fundus", "rooftop")}
    catalog_yaml = "{" + ", ".join(f"{d}: {{train: {v['train']}, test: {v['test']}}}" for d, v in catalog.items()) + "}"
    return ["evolve", "--config", str(ROOT / "configs/evolve.yaml"), "--init_ckpt", str(ckpt), "--out_dir", str(out),
            "--stages", stages, "--catalog", catalog_yaml, "--source_replay", entry("source", 12, 0),
            "--source_test", entry("source", 3, 2), "--epochs", str(epochs), "--batch_size", "4", "--num_workers", "0",
            "--crop_size", "64", "--min_area", "16", "--max_clicks", "5"]


def test_heads_and_three_click_training(evolve_init_ckpt):
    from lightning_app.checkpoints import load_module

    m = load_module(evolve_init_ckpt)
    assert m.hparams.click_protocol == "three_click" and m.hparams.num_classes == 4
    out = m.outputs(torch.rand(2, 3, 64, 64), torch.tensor([[[30.0, 30, 1], [2, 2, -1], [60, 60, -1]]] * 2))
    assert out["classes"].shape == (2, 4) and out["binary"].shape == (2, 1, 4, 4) and out["logits"].shape == (2, 1, 64, 64)
    assert SyntheticObjects("source", 5, 0, size=64).get_sample(0).class_id in (0, 1, 2, 3)
    assert SyntheticObjects("fundus", 5, 0, size=64).get_sample(0).class_id == -1


def test_a_stage_never_reads_its_datasets_masks(evolve_init_ckpt, tmp_path, monkeypatch):
    from datamodules import registry
    from lightning_app.cli import main

    monkeypatch.setitem(registry.DATASETS, "guarded", GuardedObjects)
    assert not hasattr(MaskFree(GuardedObjects("fundus", 4, 5)), "get_sample")
    # the users clicked before the stage (the one read of the masks, by the simulated user)
    record_interactions(SyntheticObjects("fundus", 12, 5, size=64, min_area=16), tmp_path / "stage1_fundus" / "interactions.json")
    args = evolve_args(evolve_init_ckpt, tmp_path, stages="[fundus]", epochs=1)
    i = args.index("--catalog")
    args[i + 1] = ("{fundus: {train: {dataset: guarded, domain: fundus, length: 12, seed: 5, size: 64}, "
                   f"test: {synthetic('fundus', 3, 2)}}}}}")
    assert main(args + ["--measure_pseudo_masks", "false"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["table"]) == {"init", "+fundus"}


def test_evolution_sequence_table_and_resume_after_kill(evolve_init_ckpt, tmp_path):
    out = tmp_path / "evolve"
    args = [sys.executable, "-m", "lightning_app", *evolve_args(evolve_init_ckpt, out, epochs=8)]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = out / "stage2_rooftop" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not second.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert second.exists(), "the sequence never reached stage 2's first checkpoint"
    first_model = out / "stage1_fundus" / "model.ckpt"
    stamp = first_model.stat().st_mtime_ns
    epoch_at_kill = torch.load(second, map_location="cpu", weights_only=False)["epoch"]
    assert not (out / "stage2_rooftop" / "model.ckpt").exists() and epoch_at_kill < 7

    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout and first_model.stat().st_mtime_ns == stamp  # stage 1 not redone
    results = json.loads((out / "results.json").read_text())
    assert list(results["table"]) == ["init", "+fundus", "+rooftop"]
    assert set(results["table"]["init"]) == {"source", "fundus", "rooftop"}
    assert set(results["table"]["+fundus"]) == {"source", "fundus"}
    cell = results["table"]["+rooftop"]["rooftop"]
    assert 0 <= cell["miou_3click"] <= 1 and 3 <= cell["noc"]["85"] <= 5
    for name in ("fundus", "rooftop"):
        q = results["pseudo_masks"][name]
        assert 0 <= q["coarse_miou"] <= 1 and 0 <= q["ipt_miou"] <= 1 and q["n_objects"] == 12
    csv_rows = (out / "table.csv").read_text().splitlines()
    assert csv_rows[0] == "model,dataset,miou_3click,noc@85,noc@90" and len(csv_rows) == 1 + 3 + 2 + 3
    assert (out / "table.png").stat().st_size > 0
    final = torch.load(out / "stage2_rooftop" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["epoch"] == 7  # the resumed stage finished its epochs

    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resuming" not in again.stdout  # a complete sequence is not redone
    assert json.loads((out / "results.json").read_text())["table"] == results["table"]


def test_evolve_bad_input(evolve_init_ckpt, tmp_path):
    from lightning_app.cli import main

    assert main(evolve_args(evolve_init_ckpt, tmp_path, stages="[mars]")) == 2
    plain = tmp_path / "plain"
    assert main(tiny_fit_args(plain, steps=1)) == 0
    assert main(evolve_args(plain / "checkpoints" / "last.ckpt", tmp_path, stages="[fundus]")) == 2
