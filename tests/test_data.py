import numpy as np
import pytest

from datamodules.datamodule import InteractiveDataModule
from datamodules.io import read_image, read_mask
from datamodules.objects import EvalObjects, Sample, TrainObjects
from datamodules.synthetic import DOMAINS, SyntheticObjects, render, resolve_style
from modules.errors import UserError


def test_rendering_is_deterministic_and_domains_differ():
    for d in DOMAINS:
        a, b = render(d, 0, 7, 64), render(d, 0, 7, 64)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.instances, b.instances)
        assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
        assert not np.array_equal(render(d, 0, 8, 64).image, a.image)
    means = {d: np.mean([render(d, 1, i, 64).image.reshape(-1, 3).mean(0) for i in range(8)], 0) for d in DOMAINS}
    assert means["fundus"][0] > means["fundus"][2] + 40  # reddish
    assert np.linalg.norm(means["fundus"] - means["rooftop"]) > 30


def test_a_style_reshades_the_same_scenes_and_unknown_keys_are_errors():
    lit = render("rooftop", 0, 7, 64)
    same = render("rooftop", 0, 7, 64, {"facet_light": 0.9, "tile_lines": 0.3})  # the defaults
    plain = render("rooftop", 0, 7, 64, {"facet_light": 0.3, "tile_lines": 0.08})  # the render before 2026-11-24
    assert np.array_equal(lit.image, same.image)
    assert np.array_equal(plain.instances, lit.instances) and not np.array_equal(plain.image, lit.image)
    roofs = plain.instances > 0
    assert lit.image[roofs].std() > plain.image[roofs].std()  # facets and tile rows further apart
    ds = SyntheticObjects("rooftop", 2, seed=0, size=64, style={"facet_light": 0.3})
    assert not np.array_equal(ds.get_image(0), SyntheticObjects("rooftop", 2, seed=0, size=64).get_image(0))
    assert ds.style == {"facet_light": 0.3, "tile_lines": 0.3}  # the whole style it draws with
    assert resolve_style("source", None) == {}
    with pytest.raises(UserError, match="style key 'shine' unknown for domain 'rooftop'"):
        SyntheticObjects("rooftop", 2, seed=0, style={"shine": 1.0})
    with pytest.raises(UserError, match="expected a mapping"):
        SyntheticObjects("rooftop", 2, seed=0, style="lit")


def test_synthetic_objects_have_a_real_target():
    ds = SyntheticObjects("rooftop", 10, seed=3, size=64, min_area=30)
    for i in range(len(ds)):
        s = ds.get_sample(i)
        assert s.mask.sum() >= 30 and not s.ignore.any()
        assert not (s.instances[s.mask] > 0).any(), "the target must not count as another object"
    with pytest.raises(UserError, match="unknown domain 'mars'"):
        SyntheticObjects("mars", 3, 0)


def test_the_benchmarks_min_area_keeps_large_objects_and_replaces_only_small_ones():
    small, large = SyntheticObjects("source", 8, seed=2), SyntheticObjects("source", 8, seed=2, min_area=1250)
    kept = 0
    for i in range(8):
        a, b = small.get_sample(i), large.get_sample(i)
        assert b.mask.sum() >= 1250
        kept += np.array_equal(a.mask, b.mask) and np.array_equal(a.image, b.image)
        if a.mask.sum() < 1250:
            assert not np.array_equal(a.mask, b.mask)  # replaced (in the same scene or a later one)
    assert 0 < kept < 8  # most large objects stay (the seed's choice among a scene's objects may change)
    with pytest.raises(UserError, match=r"drew no object of at least min_area=1250 px"):
        SyntheticObjects("fundus", 1, seed=2, size=32, min_area=1250).get_sample(0)


def test_train_view_keeps_clicks_consistent_with_mask():
    ds = TrainObjects(SyntheticObjects("source", 20, 0, 64, 30), crop=48, click_capacity=12)
    for i in range(20):
        item = ds[i]
        assert item["image"].shape == (3, 48, 48) and item["mask"].shape == (1, 48, 48)
        mask = item["mask"][0].bool()
        for y, x, lab in item["clicks"].tolist():
            if lab > 0:
                assert mask[int(y), int(x)]
            elif lab < 0:
                assert not mask[int(y), int(x)]


def test_eval_view_rejects_empty_masks():
    class Empty:
        name = "empty"

        def __len__(self):
            return 1

        def get_sample(self, index):
            z = np.zeros((8, 8), bool)
            return Sample(np.zeros((8, 8, 3), np.uint8), z, z, None, "empty/0")

    with pytest.raises(ValueError, match="empty/0: empty object mask"):
        EvalObjects(Empty())[0]


def test_datamodule_splits_are_disjoint_and_named():
    entries = [{"dataset": "synthetic", "domain": d, "length": 3, "seed": 2, "size": 64} for d in ("source", "fundus")]
    dm = InteractiveDataModule(test=entries, num_workers=0)
    names = [ds.name for ds in dm.test_datasets()]
    assert names == ["source", "fundus"]
    test_img = dm.test_datasets()[0][0]["image"]
    train_img = SyntheticObjects("source", 3, dm.hparams.train[0]["seed"], 64).get_sample(0).image
    assert not np.allclose(test_img.numpy().transpose(1, 2, 0) * 255, train_img)


def test_unreadable_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match="broken.jpg' cannot be decoded"):
        read_image(bad)
    with pytest.raises(UserError, match="missing.png' does not exist"):
        read_mask(tmp_path / "missing.png")
    import cv2

    cv2.imwrite(str(tmp_path / "m.png"), np.full((4, 5), 255, np.uint8))
    assert read_mask(tmp_path / "m.png").shape == (4, 5)


def test_tiny_objects_survive_augmentation():
    class Tiny:
        name = "tiny"

        def __len__(self):
            return 1

        def get_sample(self, index):
            m = np.zeros((64, 64), bool)
            m[0:3, 0:3] = True  # in a corner: most crops lose it
            return Sample(np.zeros((64, 64, 3), np.uint8), m, np.zeros_like(m), None, "tiny/0")

    ds = TrainObjects(Tiny(), crop=32)
    for _ in range(10):
        item = ds[0]
        assert item["mask"].sum() > 0 and (item["clicks"][:, 2] > 0).any()
