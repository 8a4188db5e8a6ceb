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
from modules.evolution import (expand_classifier, feature_alignment_loss, feature_alignment_terms, known_class,
                               max_squares_known, max_squares_loss, max_squares_unknown, replay_weight)
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

    class Session:
        clicks, seconds = [], []

        def click(self, *clicks):
            seen.append(len(clicks))
            self.clicks = self.clicks + list(clicks)
            return gt.astype(float)

    r = evaluate_object(Session(), gt, max_clicks=5, initial=three_click_protocol(gt))
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
    coarse_only = refine_pseudo_mask(features, coarse, binary, (24, 20), np.random.default_rng(0), components=())
    assert (coarse_only["mask"] == coarse).all()  # Table 3's first row: nothing refines
    summed = refine_pseudo_mask(features, coarse, binary, (24, 20), np.random.default_rng(0), vote_maps=False,
                                coarse_probability=np.where(coarse, 0.55, 0.45))
    assert summed["mask"][10:38, 30:38].mean() > 0.5  # a hesitant coarse mask is swayed by the prototypes


def test_click_window_spans_the_clicks_with_context():
    from modules.ipt import click_window

    assert click_window([(10, 20), (30, 60)], (100, 100), context=0.25) == (4, 37, 9, 72)  # end exclusive
    assert click_window([(0, 0), (99, 99)], (100, 100)) == (0, 100, 0, 100)


# -- feature alignment, Eq. 7-11 ---------------------------------------------------------------
def test_feature_alignment_terms_and_loss():
    mask = torch.zeros(1, 8, 8)
    mask[0, 2:6, 2:6] = 1
    fa = torch.zeros(1, 4, 8, 8)
    fa[:, 0] = 1.0
    binary = torch.full((1, 8, 8), 0.5)
    g, p, present = feature_alignment_terms(fa, mask, fa.clone(), mask, binary)
    assert g.item() == pytest.approx(0.0, abs=1e-7) and p.item() == pytest.approx(0.0, abs=1e-7) and present.item()
    fb = fa.clone().requires_grad_(True)
    with torch.no_grad():
        fb[:, 1, 2:4] = 1.0  # 8 of B's 16 object pixels differ from A's prototype by (0, 1, 0, 0)
    b_binary = torch.full((1, 8, 8), 0.5, requires_grad=True)
    g, p, present = feature_alignment_terms(fa, mask, fb, mask, b_binary)
    assert g.item() == pytest.approx(0.25)  # squared Euclidean: ||(0, 0.5, 0, 0)||^2
    assert p.item() == pytest.approx(8 / 16 * 1.0 / 0.5)  # mean over the mask of ||F - c_a||^2 / M'_b
    known = feature_alignment_loss(g, p, present, torch.tensor([True]))
    unknown = feature_alignment_loss(g, p, present, torch.tensor([False]))
    assert unknown.item() == pytest.approx(g.item()) and known.item() == pytest.approx(g.item() + p.item())
    both = feature_alignment_loss(g, p, present, torch.tensor([False]), unknown_terms=("global", "pixel"))
    assert both.item() == pytest.approx(known.item())  # Table 5's first row
    known.backward()
    assert fb.grad.abs().sum() > 0 and b_binary.grad is None  # M'_b only weighs the pixels
    g0, p0, present0 = feature_alignment_terms(fa, torch.zeros(1, 8, 8), fb, mask, binary)
    assert feature_alignment_loss(g0, p0, present0, torch.tensor([True])).item() == 0.0


def test_max_squares_and_replay_weight_and_classifier():
    p = torch.tensor([[[0.0, 1.0]], [[0.5, 0.5]]])  # (N, h, w)
    assert max_squares_unknown(p).tolist() == pytest.approx([-1.0, -0.5])  # Eq. 10
    sure, unsure = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]])
    assert max_squares_known(p[:1], sure).item() == pytest.approx(-0.5)  # Eq. 9: sure pixels of a sure class
    assert max_squares_known(p[:1], unsure).item() > max_squares_known(p[:1], sure).item()  # class doubt costs
    mixed = max_squares_loss(p, torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([True, False]))
    assert mixed.item() == pytest.approx((-0.5 - 0.5) / 2)
    assert [replay_weight(x) for x in (0.0, 0.5, 1.0, 2.0)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    old = nn.Linear(6, 4)
    new = expand_classifier(old)
    assert new.out_features == 5 and torch.equal(new.weight[:4], old.weight) and torch.equal(new.bias[:4], old.bias)
    again = expand_classifier(old)  # the "unknown" row is drawn from its own seed, not the global generator
    assert torch.equal(new.weight, again.weight) and torch.equal(new.bias, again.bias)
    assert 0 < new.weight[4].abs().max() <= 6 ** -0.5 and not torch.equal(new.weight[4], expand_classifier(old, seed=1).weight[4])
    logits = torch.tensor([[5.0, 0, 0, 0, 0], [0, 0, 0, 0, 5.0], [0.1, 0, 0, 0, 0]])
    assert known_class(logits, 4, 0.5).tolist() == [0, -1, -1]


def test_pairs_take_an_earlier_object_of_the_judged_class():
    class Classes:
        def __init__(self, classes):
            self.classes = classes

        def class_of(self, i):
            return self.classes[i]

    class Fake:
        def __init__(self, classes):
            self.source = Classes(classes)

        def __len__(self):
            return len(self.source.classes)

        def __getitem__(self, i):
            return {"i": i}

    pairs = PairedObjects(Fake([0, 0, 0]), [2, -1, 7], Fake([0, 2, 2, -1, 1, 0]))
    for _ in range(20):
        same, anyone, missing = pairs[0], pairs[1], pairs[2]
        assert same["a"]["i"] in (1, 2) and same["b"]["pair_class"] == 2
        assert anyone["b"]["pair_class"] == -1
        assert missing["b"]["pair_class"] == -1  # no earlier object of class 7: a class-agnostic pair
        assert "c" not in same  # no earlier stage: the pair alone
    # earlier stages (here of 1 and 9 objects) are replayed equally often, whatever their size
    staged = PairedObjects(Fake([0]), [-1], Fake([0, 1]), stages=[Fake([5]), Fake([5] * 9), Fake([])])
    np.random.seed(0)
    drawn = [staged[0]["c"]["i"] for _ in range(400)]
    assert 150 < drawn.count(0) < 250 and set(drawn) <= set(range(9))  # index 0 of either stage: ~1/2 + 1/18


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
            "--source_test", entry("source", 3, 2), "--training.epochs", str(epochs), "--training.batch_size", "2", "--num_workers", "0",
            "--training.crop_size", "64", "--min_area", "16", "--max_clicks", "5"]


def test_a_stage_made_from_other_data_is_refused_or_started_again(tmp_path):
    from lightning_app.evolve import Stage
    from modules.errors import UserError

    roof = {"dataset": "synthetic", "domain": "rooftop", "length": 4, "seed": 5}
    stage = lambda entry: Stage(tmp_path / "stage1_rooftop", "rooftop", {"data": {"train": entry}})  # noqa: E731
    assert stage(roof).claim(fresh=False)  # a new stage starts from nothing
    assert not stage(roof).claim(fresh=False)  # the same settings: its work is kept
    with pytest.raises(UserError, match="made with other settings"):
        stage({**roof, "style": {"facet_light": 0.3}}).claim(fresh=False)
    assert stage({**roof, "style": {"facet_light": 0.3}}).claim(fresh=True)  # moved aside, started again
    assert len(list(tmp_path.glob("stage1_rooftop.superseded-*"))) == 1


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
    assert main(args + ["--measure_pseudo_masks", "false", "--training.freeze_norm", "true"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["table"]) == {"init", "+fundus"}
    # freeze_norm: the stage trained the weights but kept the initial model's normalisation statistics
    init, evolved = (torch.load(p, map_location="cpu", weights_only=False)["state_dict"]
                     for p in (evolve_init_ckpt, tmp_path / "stage1_fundus" / "model.ckpt"))
    stats = [k for k in init if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(init[k], evolved[k]) for k in stats)
    assert any(not torch.equal(init[k], evolved[k]) for k in init if k.endswith("weight") and init[k].dim() == 4)


def test_a_stage_is_reproducible(evolve_init_ckpt, tmp_path):
    """The same config and seed give the same evolved weights and the same table (Eq. 7-10 on,
    whatever the default config says)."""
    from lightning_app.cli import main

    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert main(evolve_args(evolve_init_ckpt, out, stages="[rooftop]", epochs=1) + ["--training.warmup", "0.5", "--training.feature_alignment", "true"]) == 0
    a, b = (torch.load(out / "stage1_rooftop" / "model.ckpt", map_location="cpu", weights_only=False)["state_dict"]
            for out in runs)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    tables = [json.loads((out / "results.json").read_text())["table"] for out in runs]
    assert tables[0] == tables[1]


@pytest.mark.slow
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
        assert 0 <= q["coarse"]["miou"] <= 1 and 0 <= q["refined"]["miou"] <= 1 and q["n_objects"] == 12
    csv_rows = (out / "table.csv").read_text().splitlines()
    assert csv_rows[0].startswith("model,dataset,miou_3click,ci95_low") and len(csv_rows) == 1 + 3 + 2 + 3
    assert "+rooftop" in (out / "table.md").read_text()
    assert (out / "table.png").stat().st_size > 0
    final = torch.load(out / "stage2_rooftop" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["epoch"] == 7  # the resumed stage finished its epochs

    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resuming" not in again.stdout  # a complete sequence is not redone
    assert json.loads((out / "results.json").read_text())["table"] == results["table"]


def test_pseudo_masks_of_a_dataset_and_table3_rows(evolve_init_ckpt):
    from dataclasses import replace

    from datamodules.objects import image_to_tensor
    from lightning_app.checkpoints import load_module
    from modules.pseudo import TABLE3, PseudoLabelling, pseudo_mask_miou, pseudo_masks, table3_options

    model = load_module(evolve_init_ckpt)
    source = SyntheticObjects("fundus", 3, 5, size=64, min_area=16)
    samples = [source.get_sample(i) for i in range(len(source))]
    clicks = [three_click_protocol(s.mask) for s in samples]
    runs = [pseudo_masks(model, (image_to_tensor(s.image) for s in samples), clicks, 4, PseudoLabelling(), seed=0)
            for _ in range(2)]
    coarse, refined, verdicts = runs[0]
    assert len(coarse) == len(refined) == len(verdicts) == 3 and coarse[0].shape == samples[0].mask.shape
    assert all(np.array_equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))  # each object's points from [seed, i]

    rows = table3_options(PseudoLabelling(window=False))
    assert list(rows) == list(TABLE3) and not rows["coarse"].ipt and rows["global+merged, vote"].ipt
    assert rows["global"].components == ("global",) and not rows["global"].vote
    assert rows["coarse"].window and not rows["coarse, whole image"].window  # the paper's rows in the window
    assert rows["global+merged, vote, whole image"] == replace(PseudoLabelling(), window=False)

    truths = [(s.mask, s.ignore) for s in samples]
    q = pseudo_mask_miou({"truth": [s.mask for s in samples], "empty": [np.zeros_like(s.mask) for s in samples],
                          "coarse": coarse}, truths)
    assert q["n_objects"] == 3 and q["truth"]["miou"] == 1.0 and q["empty"]["miou"] == 0.0
    assert q["coarse"]["miou"] == pytest.approx(np.mean([iou(c, s.mask, s.ignore) for c, s in zip(coarse, samples)]))


@pytest.mark.parametrize("row,pseudo_ipt,alignment,terms", [
    ("st", False, False, ["global"]), ("st_ipt", True, False, ["global"]), ("st_fa", False, True, ["global"]),
    ("st_ipt_fa", True, True, ["global"]), ("table5_pixel", True, True, ["pixel"]),
    ("table5_global_pixel", True, True, ["global", "pixel"]), ("upper", True, False, ["global"])])
def test_ablation_configs_change_only_their_rows_keys(row, pseudo_ipt, alignment, terms):
    """Each ``configs/evolve/<row>.yaml`` layered on ``configs/evolve.yaml`` sets its Table 3-5
    keys and keeps every other one of the stage (the groups merge key by key)."""
    from lightning_app.cli import function_parser

    parser = function_parser("evolve")
    base = parser.parse_args(["--config", str(ROOT / "configs/evolve.yaml")])
    cfg = parser.parse_args(["--config", str(ROOT / "configs/evolve.yaml"), "--config", str(ROOT / f"configs/evolve/{row}.yaml")])
    assert cfg.pseudo.ipt is pseudo_ipt and cfg.training.feature_alignment is alignment
    assert list(cfg.training.unknown_terms) == terms and cfg.out_dir == f"runs/evolve_ablation/{row}"
    assert cfg.training.replay_final_weight == base.training.replay_final_weight == 3.0
    assert cfg.pseudo.window == base.pseudo.window and cfg.training.lr == base.training.lr
    assert cfg.supervision == ("ground_truth" if row == "upper" else "clicks")


def test_evolve_bad_input(evolve_init_ckpt, tmp_path, capsys):
    from lightning_app.cli import main

    assert main(evolve_args(evolve_init_ckpt, tmp_path, stages="[mars]")) == 2
    for option, message in ((["--pseudo.m", "1.5"], "pseudo.m=1.5: expected a value in (0, 1]"),
                            (["--pseudo.components", "[global, corner]"], "pseudo.components: unknown ['corner']"),
                            (["--training.epochs", "0"], "training.epochs=0: expected >= 1")):
        capsys.readouterr()
        assert main(evolve_args(evolve_init_ckpt, tmp_path, stages="[fundus]") + option) == 2
        assert message in capsys.readouterr().err
    plain = tmp_path / "plain"
    assert main(tiny_fit_args(plain, steps=1)) == 0
    assert main(evolve_args(plain / "checkpoints" / "last.ckpt", tmp_path, stages="[fundus]")) == 2


# -- the user's headline command on fixtures in the official layouts ---------------------------
def scene(rng: np.random.Generator, h: int = 48, w: int = 64, n: int = 2) -> tuple[np.ndarray, list[np.ndarray]]:
    """An image with ``n`` rectangles of their own colours, and their masks."""
    image = rng.integers(40, 90, (h, w, 3)).astype(np.uint8)
    masks = []
    for k in range(n):
        y, x = int(rng.integers(2, h - 20)), int(rng.integers(2 + k * w // 2, max(3 + k * w // 2, (k + 1) * w // 2 - 18)))
        m = np.zeros((h, w), bool)
        m[y:y + 16, x:x + 14] = True
        image[m] = rng.integers(150, 255, 3)
        masks.append(m)
    return image, masks


def write_headline_fixtures(root) -> dict[str, str]:
    """VOC 2012 + SBD (the initial data), Cityscapes and COCO (the stages), a few images each."""
    import cv2
    import scipy.io
    from PIL import Image
    from pycocotools import mask as coco_mask

    rng = np.random.default_rng(0)
    voc, sbd, cs, coco = root / "VOC2012", root / "SBD", root / "cityscapes", root / "coco"
    for split, names in (("train", [f"2008_{i:06d}" for i in range(6)]), ("val", [f"2009_{i:06d}" for i in range(3)])):
        (voc / "ImageSets/Segmentation").mkdir(parents=True, exist_ok=True)
        (voc / f"ImageSets/Segmentation/{split}.txt").write_text("\n".join(names) + "\n")
        for name in names:
            image, masks = scene(rng)
            for folder in ("JPEGImages",):
                (voc / folder).mkdir(exist_ok=True)
            cv2.imwrite(str(voc / "JPEGImages" / f"{name}.jpg"), image)
            inst = np.zeros(image.shape[:2], np.uint8)
            cls = np.zeros(image.shape[:2], np.uint8)
            for k, m in enumerate(masks, start=1):
                inst[m], cls[m] = k, 15 if k == 1 else 12
            for folder, values in (("SegmentationObject", inst), ("SegmentationClass", cls)):
                (voc / folder).mkdir(exist_ok=True)
                im = Image.fromarray(values, mode="P")
                im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
                im.save(voc / folder / f"{name}.png")
    (sbd / "img").mkdir(parents=True)
    (sbd / "inst").mkdir()
    (sbd / "train.txt").write_text("\n".join(f"2010_{i:06d}" for i in range(4)) + "\n")
    for i in range(4):
        image, masks = scene(rng)
        cv2.imwrite(str(sbd / "img" / f"2010_{i:06d}.jpg"), image)
        seg = np.zeros(image.shape[:2], np.uint8)
        for k, m in enumerate(masks, start=1):
            seg[m] = k
        scipy.io.savemat(sbd / "inst" / f"2010_{i:06d}.mat",
                         {"GTinst": {"Segmentation": seg, "Categories": np.array([[7], [3]]), "Boundaries": np.zeros(2)}})
    for split, count in (("train", 6), ("val", 3)):
        for i in range(count):
            image, masks = scene(rng)
            ids = np.full(image.shape[:2], 7, np.uint16)
            for k, m in enumerate(masks):
                ids[m] = 26000 + k
            stem = f"aachen_{i:06d}_000019"
            (cs / f"gtFine/{split}/aachen").mkdir(parents=True, exist_ok=True)
            (cs / f"leftImg8bit/{split}/aachen").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(cs / f"gtFine/{split}/aachen/{stem}_gtFine_instanceIds.png"), ids)
            cv2.imwrite(str(cs / f"leftImg8bit/{split}/aachen/{stem}_leftImg8bit.png"), image)
        doc = {"images": [], "annotations": [], "categories": [{"id": 60, "name": "donut"}, {"id": 1, "name": "person"}]}
        (coco / f"{split}2017").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, masks = scene(rng)
            cv2.imwrite(str(coco / f"{split}2017" / f"{i + 1:012d}.jpg"), image)
            doc["images"].append({"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "height": 48, "width": 64})
            for k, m in enumerate(masks):
                rle = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
                doc["annotations"].append({"id": 100 * (i + 1) + k, "image_id": i + 1, "category_id": [60, 1][k],
                                           "iscrowd": 0, "area": float(m.sum()),
                                           "bbox": [float(v) for v in coco_mask.toBbox(rle)],
                                           "segmentation": {"size": [48, 64], "counts": rle["counts"].decode()}})
        (coco / "annotations").mkdir(exist_ok=True)
        (coco / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
    return {"VOC_ROOT": str(voc), "SBD_ROOT": str(sbd), "CITYSCAPES_ROOT": str(cs), "COCO_ROOT": str(coco)}


@pytest.mark.slow
def test_evolve_cityscapes_then_coco_from_a_voc_model_resumes_after_a_kill(tmp_path):
    """`make evolve STAGES=cityscapes,coco` with the VOC+SBD initial model config, end to end."""
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT), **write_headline_fixtures(tmp_path / "data"))
    small = ["--data.crop_size", "64", "--data.train_max_side", "64", "--data.min_area", "16", "--data.num_workers", "0",
             "--data.batch_size", "2", "--model.eval_max_side", "64", "--model.aspp_channels", "16",
             "--model.decoder_channels", "16"]
    init = tmp_path / "init"
    fit = subprocess.run([sys.executable, "-m", "lightning_app", "fit", "--config", "configs/evolve/init.yaml", "--config",
                          "configs/evolve/init_voc.yaml", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
                          "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
                          "--trainer.default_root_dir", str(init), *small],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert fit.returncode == 0, fit.stderr[-2000:]
    ckpt = torch.load(init / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ckpt["state_dict"]["net.head.bias"].fill_(4.0)  # 3 steps predict nothing: bias to foreground so pseudo masks exist
    torch.save(ckpt, init / "checkpoints" / "last.ckpt")
    out = tmp_path / "evolve"
    args = [sys.executable, "-m", "lightning_app", "evolve", "--config", "configs/evolve.yaml",
            "--init_ckpt", str(init / "checkpoints" / "last.ckpt"), "--out_dir", str(out), "--stages", "[cityscapes, coco]",
            "--source_replay", "{dataset: voc, split: train}", "--source_test", "{dataset: voc, split: val}",
            "--training.epochs", "6", "--training.batch_size", "2", "--training.crop_size", "64", "--training.train_max_side", "64", "--min_area", "16",
            "--num_workers", "0", "--max_clicks", "4"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    epoch = out / "stage1_cityscapes" / "checkpoints" / "epoch=1.ckpt"
    deadline = time.time() + 400
    while not epoch.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert epoch.exists(), f"the first stage never reached its second epoch: {err[-1500:]}"
    assert not (out / "stage1_cityscapes" / "model.ckpt").exists()
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stage 'cityscapes': resuming from" in r.stdout
    results = json.loads((out / "results.json").read_text())
    assert list(results["table"]) == ["init", "+cityscapes", "+coco"]
    assert set(results["table"]["+coco"]) == {"source", "cityscapes", "coco"}
    assert results["pseudo_masks"]["coco"]["n_objects"] == 12
    changed = subprocess.run(args[:-2] + ["--max_clicks", "4", "--training.epochs", "7"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert changed.returncode == 2 and "belongs to another initial model or method" in changed.stderr
