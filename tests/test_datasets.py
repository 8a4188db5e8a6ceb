"""Every on-disk format on a fixture written here in its official layout, plus the
registry's selection keys, sharding and the one-line errors."""
import json

import cv2
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from torch.utils.data import DataLoader

from datamodules.datamodule import InteractiveDataModule
from datamodules.datasets.bsds import annotation_rotation
from datamodules.registry import build_source
from datamodules.streaming import ObjectStream, object_at, stream_numbers
from modules.errors import UserError

H, W = 24, 32


def write_image(path, h=H, w=W):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    assert cv2.imwrite(str(path), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def write_palette_png(path, values):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(values.astype(np.uint8), mode="P")
    im.putpalette(list(np.random.default_rng(1).integers(0, 255, 768)))
    im.save(path)


def instance_map():
    """Two objects, a void band (255) around object 1, background 0."""
    inst = np.zeros((H, W), np.uint8)
    inst[2:10, 2:12] = 255
    inst[3:9, 3:11] = 1
    inst[12:22, 15:30] = 2
    return inst


def sample_by_key(source, suffix):
    (i,) = [i for i in range(len(source)) if source.get_sample(i).name.endswith(suffix)]
    return source.get_sample(i)


def test_voc(tmp_path):
    inst = instance_map()
    cls = np.where(inst == 1, 15, np.where(inst == 2, 12, np.where(inst == 255, 255, 0)))
    write_image(tmp_path / "JPEGImages/2007_000001.jpg")
    write_palette_png(tmp_path / "SegmentationObject/2007_000001.png", inst)
    write_palette_png(tmp_path / "SegmentationClass/2007_000001.png", cls)
    (tmp_path / "ImageSets/Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets/Segmentation/train.txt").write_text("2007_000001\n")
    voc = build_source({"dataset": "voc", "root": str(tmp_path)}, "t", 0)
    assert len(voc) == 2 and [voc.class_of(i) for i in range(2)] == [15, 12]
    person = sample_by_key(voc, "/1")
    assert person.mask.sum() == 48 and person.class_id == 15
    assert person.ignore.sum() == 80 - 48 and not (person.ignore & person.mask).any()
    assert (person.instances == 2).sum() == 150 and person.instances[person.mask].max() == 0
    dogs = build_source({"dataset": "voc", "root": str(tmp_path), "classes": ["dog"]}, "t", 0)
    assert len(dogs) == 1 and dogs.get_sample(0).class_id == 12


def test_sbd(tmp_path):
    inst = np.where(instance_map() == 255, 0, instance_map())
    write_image(tmp_path / "img/2008_000002.jpg")
    (tmp_path / "inst").mkdir()
    scipy.io.savemat(tmp_path / "inst/2008_000002.mat",
                     {"GTinst": {"Segmentation": inst, "Categories": np.array([[7], [3]]), "Boundaries": np.zeros(2)}})
    (tmp_path / "val.txt").write_text("2008_000002\n")
    sbd = build_source({"dataset": "sbd", "root": str(tmp_path), "split": "val"}, "t", 0)
    assert len(sbd) == 2 and sorted(sbd.class_of(i) for i in range(2)) == [3, 7]
    car = sample_by_key(sbd, "/1")
    assert car.class_id == 7 and car.mask.sum() == 48 and not car.ignore.any()


def test_voc_plus_sbd_train_together(tmp_path):
    test_voc(tmp_path / "voc")
    test_sbd(tmp_path / "sbd")
    (tmp_path / "sbd/train.txt").write_text("2008_000002\n")
    dm = InteractiveDataModule(train=[{"dataset": "voc", "root": str(tmp_path / "voc")},
                                      {"dataset": "sbd", "root": str(tmp_path / "sbd")}], crop_size=16, min_area=10,
                               num_workers=0)
    assert len(dm.train_source) == 4 and dm.train_source.name == "voc+sbd"
    assert sorted(dm.train_source.class_of(i) for i in range(4)) == [3, 7, 12, 15]


def write_coco(root):
    write_image(root / "val2017/000000000001.jpg")
    rle = coco_mask.encode(np.asfortranarray((instance_map() == 2).astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    crowd = np.zeros((H, W), np.uint8)
    crowd[14:20, 0:10] = 1
    crowd_rle = coco_mask.encode(np.asfortranarray(crowd))
    crowd_rle["counts"] = crowd_rle["counts"].decode()
    doc = {
        "images": [{"id": 1, "file_name": "000000000001.jpg", "height": H, "width": W}],
        "categories": [{"id": 60, "name": "donut"}, {"id": 1, "name": "person"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 60, "iscrowd": 0, "area": 48.0, "bbox": [3, 3, 8, 6],
             "segmentation": [[3, 3, 11, 3, 11, 9, 3, 9]]},
            {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 150.0, "bbox": [15, 12, 15, 10],
             "segmentation": rle},
            {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 1, "area": 60.0, "bbox": [0, 14, 10, 6],
             "segmentation": crowd_rle},
        ],
    }
    (root / "annotations").mkdir(parents=True)
    (root / "annotations/instances_val2017.json").write_text(json.dumps(doc))


def test_coco_polygons_rle_and_crowd(tmp_path):
    write_coco(tmp_path)
    coco = build_source({"dataset": "coco", "root": str(tmp_path), "split": "val"}, "t", 0)
    assert len(coco) == 2  # the crowd region is no object
    donut, person = coco.get_sample(0), coco.get_sample(1)
    assert donut.class_id == 60 and 40 <= donut.mask.sum() <= 70  # polygon rasterised by pycocotools
    assert person.class_id == 1 and person.mask.sum() == 150  # RLE exact
    assert person.ignore[14:20, 0:10].all() and person.ignore.sum() == 60  # crowd -> ignore
    assert (person.instances > 0).sum() == donut.mask.sum()
    only = build_source({"dataset": "coco", "root": str(tmp_path), "split": "val", "classes": ["donut"]}, "t", 0)
    assert len(only) == 1 and only.get_sample(0).class_id == 60
    with pytest.raises(UserError, match="unknown class 'zebra'"):
        build_source({"dataset": "coco", "root": str(tmp_path), "split": "val", "classes": ["zebra"]}, "t", 0)
    with pytest.raises(UserError, match="instances_train2017.json' does not exist"):
        build_source({"dataset": "coco", "root": str(tmp_path), "split": "train"}, "t", 0)


def test_cityscapes(tmp_path):
    ids = np.full((H, W), 7, np.uint16)  # road
    ids[:2] = 0  # unlabelled
    ids[3:9, 3:11] = 26000
    ids[12:22, 15:30] = 24001
    ids[12:20, 0:8] = 26  # a crowd of cars without instance ids
    gt = tmp_path / "gtFine/val/lindau/lindau_000000_000019_gtFine_instanceIds.png"
    gt.parent.mkdir(parents=True)
    assert cv2.imwrite(str(gt), ids)
    write_image(tmp_path / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png")
    cs = build_source({"dataset": "cityscapes", "root": str(tmp_path), "split": "val"}, "t", 0)
    assert len(cs) == 2 and sorted(cs.class_of(i) for i in range(2)) == [24, 26]
    car = sample_by_key(cs, "/26000")
    assert car.mask.sum() == 48 and car.ignore.sum() == 2 * W + 64
    assert (car.instances == 24001).sum() == 150


def test_drions(tmp_path):
    write_image(tmp_path / "images/image_001.jpg")
    (tmp_path / "experts_anotation").mkdir()
    (tmp_path / "experts_anotation/anotExpert1_001.txt").write_text("4 , 4\n20 , 4\n20 , 16\n4 , 16\n")
    drions = build_source({"dataset": "drions", "root": str(tmp_path)}, "t", 0)
    s = drions.get_sample(0)
    assert len(drions) == 1 and s.mask[4:17, 4:21].all() and s.mask.sum() == 13 * 17
    (tmp_path / "experts_anotation/anotExpert1_001.txt").write_text("4 ; 4\n")
    with pytest.raises(UserError, match=r"anotExpert1_001.txt' line 1: '4 ; 4' \(expected 'x , y'\)"):
        build_source({"dataset": "drions", "root": str(tmp_path)}, "t", 0)


def test_rooftop(tmp_path):
    write_image(tmp_path / "images/tile1.png")
    (tmp_path / "polygons").mkdir()
    (tmp_path / "polygons/tile1.json").write_text(json.dumps(
        {"polygons": [[[2, 2], [10, 2], [10, 8], [2, 8]], [[14, 10], [28, 10], [28, 20], [14, 20]]]}))
    roofs = build_source({"dataset": "rooftop", "root": str(tmp_path)}, "t", 0)
    a, b = roofs.get_sample(0), roofs.get_sample(1)
    assert len(roofs) == 2 and a.mask.sum() == 9 * 7 and b.mask.sum() == 15 * 11
    assert (a.instances > 0).sum() == b.mask.sum()


def davis_palette() -> list[int]:
    """DAVIS's palette: index 0 black, index 1 dark red (128, 0, 0), ..."""
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
    return palette + [0] * (768 - len(palette))


@pytest.mark.parametrize("dataset,images,masks", [("davis", "img", "gt"), ("coco_mval", "img", "gt")])
def test_davis_like_palette_masks_are_read_by_index(tmp_path, dataset, images, masks):
    """RITM's DAVIS stores palette PNGs: index 1 is shown dark red, whose first channel is 0;
    every object must still be read (issue: 344 of 345 lost)."""
    (tmp_path / masks).mkdir()
    for k, name in enumerate(["bear", "boat", "camel"]):
        write_image(tmp_path / images / f"{name}.jpg")
        im = Image.fromarray((instance_map() == (2 if k else 1)).astype(np.uint8), mode="P")
        im.putpalette(davis_palette())
        im.save(tmp_path / masks / f"{name}.png")
    source = build_source({"dataset": dataset, "root": str(tmp_path)}, "t", 0)
    assert len(source) == 3 and source.skipped == 0
    assert [int(source.get_sample(i).mask.sum()) for i in range(3)] == [48, 150, 150]
    assert not source.get_sample(0).ignore.any()


def test_mask_values_by_mode(tmp_path):
    from datamodules.io import read_mask

    values = np.array([[0, 1], [2, 300]], np.uint16)
    Image.fromarray(values).save(tmp_path / "ids16.png")  # 16-bit, as Cityscapes' instance ids
    assert read_mask(tmp_path / "ids16.png").tolist() == [[0, 1], [2, 300]]
    gray_rgb = np.repeat(np.array([[0, 255], [128, 0]], np.uint8)[..., None], 3, axis=2)
    Image.fromarray(gray_rgb).save(tmp_path / "gray_rgb.png")
    assert read_mask(tmp_path / "gray_rgb.png").tolist() == [[0, 255], [128, 0]]
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 1] = (0, 0, 128)  # a coloured object: its largest channel
    Image.fromarray(colour).save(tmp_path / "colour.png")
    assert read_mask(tmp_path / "colour.png").tolist() == [[0, 128], [0, 0]]
    Image.fromarray(np.array([[0, 128], [255, 0]], np.uint8)).save(tmp_path / "band.bmp")
    assert read_mask(tmp_path / "band.bmp").tolist() == [[0, 128], [255, 0]]
    (tmp_path / "junk.png").write_bytes(b"junk")
    with pytest.raises(UserError, match="junk.png' cannot be decoded"):
        read_mask(tmp_path / "junk.png")


def test_a_dataset_losing_most_objects_says_so(tmp_path):
    (tmp_path / "gt").mkdir()
    for name, size in [("a", 2), ("b", 2), ("c", 12)]:
        write_image(tmp_path / "img" / f"{name}.jpg")
        m = np.zeros((H, W), np.uint8)
        m[:size, :size] = 7
        assert cv2.imwrite(str(tmp_path / "gt" / f"{name}.png"), m)
    with pytest.raises(UserError, match=r"davis loses 2 of 3 objects to min_area=64 px, e.g. '.*gt/a.png' "
                                        r"\(4 px; values in the file: \[0, 7\]\)"):
        build_source({"dataset": "davis", "root": str(tmp_path)}, "t")
    assert len(build_source({"dataset": "davis", "root": str(tmp_path), "min_area": 64}, "t")) == 1  # on purpose
    assert len(build_source({"dataset": "davis", "root": str(tmp_path)}, "t", min_area=64)) == 1


def test_grabcut_ignore_band_and_berkeley_several_masks(tmp_path):
    write_image(tmp_path / "gc/data_GT/flower.jpg")
    band = np.zeros((H, W), np.uint8)
    band[4:20, 4:20] = 128
    band[6:18, 6:18] = 255
    (tmp_path / "gc/boundary_GT").mkdir()
    assert cv2.imwrite(str(tmp_path / "gc/boundary_GT/flower.bmp"), band)
    s = build_source({"dataset": "grabcut", "root": str(tmp_path / "gc")}, "t", 0).get_sample(0)
    assert s.mask.sum() == 144 and s.ignore.sum() == 256 - 144

    write_image(tmp_path / "bk/images/239007.jpg")
    (tmp_path / "bk/masks").mkdir()
    for suffix, k in (("a", 1), ("b", 2)):
        rgb = np.repeat(((instance_map() == k) * 255).astype(np.uint8)[..., None], 3, axis=2)
        assert cv2.imwrite(str(tmp_path / f"bk/masks/239007{suffix}.png"), rgb)
    bk = build_source({"dataset": "berkeley", "root": str(tmp_path / "bk")}, "t", 0)
    assert len(bk) == 2 and [bk.get_sample(i).mask.sum() for i in range(2)] == [48, 150]
    assert bk.get_sample(0).name == "berkeley/239007/239007a"


def write_bsds(root, rotate=False):
    a = np.ones((H, W), np.uint16)
    a[:, W // 4:] = 2  # off-centre, so that only one quarter turn fits a rotated photo
    b = np.ones((H, W), np.uint16)
    b[H // 3:] = 2
    b[-4:, -4:] = 3  # 16 px: below a min_area of 20
    image = np.zeros((H, W, 3), np.uint8)
    image[:, W // 4:] = 200  # the edge annotator a draws
    image[H // 3:] += 50
    if rotate:  # a copy that stores the photo turned clockwise, the annotation not
        image = np.ascontiguousarray(np.rot90(image, 3))
    (root / "images/train").mkdir(parents=True)
    assert cv2.imwrite(str(root / "images/train/12003.jpg"), image)
    gt = np.empty((1, 2), dtype=object)
    gt[0, 0] = {"Segmentation": a, "Boundaries": np.zeros((H, W), np.uint8)}
    gt[0, 1] = {"Segmentation": b, "Boundaries": np.zeros((H, W), np.uint8)}
    (root / "groundTruth/train").mkdir(parents=True)
    scipy.io.savemat(root / "groundTruth/train/12003.mat", {"groundTruth": gt})


def test_bsds_regions_of_every_annotator(tmp_path):
    write_bsds(tmp_path)
    bsds = build_source({"dataset": "bsds", "root": str(tmp_path), "splits": ["train"]}, "t", min_area=20)
    assert len(bsds) == 4 and bsds.skipped == 1
    s = bsds.get_sample(0)
    assert s.mask.sum() == H * W // 4 and (s.instances > 0).sum() == H * W * 3 // 4 and s.class_id == -1
    one = build_source({"dataset": "bsds", "root": str(tmp_path), "splits": ["train"], "annotators": [1]}, "t", 0)
    assert len(one) == 3


def test_bsds_annotation_turned_to_a_rotated_photo(tmp_path):
    write_bsds(tmp_path, rotate=True)
    bsds = build_source({"dataset": "bsds", "root": str(tmp_path), "splits": ["train"]}, "t", 0)
    s = bsds.get_sample(0)
    assert s.image.shape[:2] == s.mask.shape == (W, H)
    assert np.array_equal(s.mask, np.rot90(np.arange(W)[None].repeat(H, 0) < W // 4, 3))
    regions = np.ones((4, 6), np.int32)
    assert annotation_rotation(regions, np.zeros((5, 6, 3), np.uint8)) == -1


def test_selection_order_limit_and_min_area(tmp_path):
    write_bsds(tmp_path)
    entry = {"dataset": "bsds", "root": str(tmp_path), "splits": ["train"]}
    full = build_source(entry, "t", 0)
    names = [full.get_sample(i).name for i in range(len(full))]
    a = build_source({**entry, "shuffle": 3, "limit": 3, "name": "seq"}, "t", 0)
    b = build_source({**entry, "shuffle": 3, "limit": 3}, "t", 0)
    assert a.name == "seq" and len(a) == 3
    assert [a.get_sample(i).name for i in range(3)] == [b.get_sample(i).name for i in range(3)]
    assert sorted(a.get_sample(i).name for i in range(3)) != sorted(names[:3]) or len(names) == 3
    assert len(build_source(entry, "t", min_area=H * W // 3)) == 3


def test_bad_entries_and_files_give_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"data.test\[0\]: dataset 'kitti' is unknown"):
        build_source({"dataset": "kitti"}, "data.test[0]", 0)
    with pytest.raises(UserError, match=r"unknown key\(s\) \['colour'\] for dataset 'grabcut'"):
        build_source({"dataset": "grabcut", "root": str(tmp_path), "colour": 1}, "t", 0)
    monkeypatch.delenv("GRABCUT_ROOT", raising=False)
    with pytest.raises(UserError, match="set 't.root' or the environment variable GRABCUT_ROOT"):
        build_source("grabcut", "t", 0)
    with pytest.raises(UserError, match="grabcut root '.*nowhere' does not exist"):
        build_source({"dataset": "grabcut", "root": str(tmp_path / "nowhere")}, "t", 0)
    monkeypatch.setenv("GRABCUT_ROOT", str(tmp_path / "env_root"))
    with pytest.raises(UserError, match="env_root' does not exist"):
        build_source("grabcut", "t", 0)
    # a mask of another size than its image
    write_image(tmp_path / "d/img/cat.jpg")
    (tmp_path / "d/gt").mkdir()
    assert cv2.imwrite(str(tmp_path / "d/gt/cat.png"), np.full((H + 1, W), 255, np.uint8))
    davis = build_source({"dataset": "davis", "root": str(tmp_path / "d")}, "t", 0)
    with pytest.raises(UserError, match=r"gt/cat.png' is 32x25 but image '.*cat.jpg' is 32x24"):
        davis.get_sample(0)
    # an unreadable image
    (tmp_path / "d/img/cat.jpg").write_bytes(b"junk")
    with pytest.raises(UserError, match="cat.jpg' cannot be decoded"):
        davis.get_sample(0)
    # an unreadable annotation
    (tmp_path / "s/inst").mkdir(parents=True)
    (tmp_path / "s/inst/x.mat").write_bytes(b"junk")
    (tmp_path / "s/train.txt").write_text("x\n")
    with pytest.raises(UserError, match="SBD annotation '.*x.mat' cannot be read"):
        build_source({"dataset": "sbd", "root": str(tmp_path / "s")}, "t", 0)


@pytest.mark.parametrize("n", [12, 13])
def test_stream_reads_every_object_once_per_epoch(n):
    epoch0 = [object_at(k, n, seed=0) for k in range(n)]
    epoch1 = [object_at(k, n, seed=0) for k in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n)) and epoch0 != epoch1
    # 2 ranks x 2 workers, batches of 3: together they read consecutive sample numbers
    numbers = []
    for rank in range(2):
        for worker in range(2):
            it = stream_numbers(0, 3, rank, 2, worker, 2)
            numbers += [next(it) for _ in range(3 * 4)]  # 4 batches each
    assert sorted(numbers) == list(range(48))


class Numbers:
    """A dataset whose samples say which object and which randomness they were drawn with."""

    def __len__(self):
        return 10

    def sample(self, index, seed):
        return torch.tensor([index, seed[1]])


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_does_not_depend_on_workers_and_resumes_exactly(workers):
    def batches(start, count, workers):
        loader = DataLoader(ObjectStream(Numbers(), batch_size=4, seed=1, start_batch=start, rank=0, world_size=1),
                            batch_size=4, num_workers=workers)
        it = iter(loader)
        return [next(it).tolist() for _ in range(count)]

    straight = batches(0, 6, 0)
    assert [row[1] for b in straight for row in b] == list(range(24))  # sample numbers in order
    assert batches(0, 6, workers) == straight
    assert batches(3, 3, workers) == straight[3:]  # a run resumed at step 3


def test_real_formats_through_the_cli(tmp_path, tiny_ckpt):
    """A fast_dev_run on BSDS regions and a benchmark on a GrabCut-layout folder, via the CLI."""
    from conftest import ROOT, TINY_DATA

    from lightning_app.cli import main

    write_bsds(tmp_path / "bsds")
    bsds = f"[{{dataset: bsds, root: {tmp_path / 'bsds'}, splits: [train]}}]"
    assert main(["fit", "--config", str(ROOT / "configs/train_init.yaml"), "--config", str(ROOT / "configs/debug/fdr.yaml"),
                 *TINY_DATA, "--data.train", bsds, "--data.val", bsds, "--data.crop_size", "16",
                 "--data.train_max_side", "32"]) == 0
    test_grabcut_ignore_band_and_berkeley_several_masks(tmp_path)
    out = tmp_path / "bench"
    assert main(["benchmark", "--ckpt", str(tiny_ckpt), "--out_dir", str(out), "--max_clicks", "2",
                 "--data.test", f"[{{dataset: grabcut, root: {tmp_path / 'gc'}}}]", "--data.num_workers", "0"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["results"]["grabcut"]["fixed"]["n_objects"] == 1
    assert main(["benchmark", "--ckpt", str(tiny_ckpt), "--out_dir", str(out),
                 "--data.test", f"[{{dataset: grabcut, root: {tmp_path / 'missing'}}}]"]) == 2


@pytest.mark.parametrize("config,objects", [("sequence_coco.yaml", 2), ("sequence_coco_donuts.yaml", 1)])
def test_sequence_configs_select_what_they_say(tmp_path, monkeypatch, config, objects):
    from conftest import ROOT

    from lightning_app.cli import function_parser

    write_coco(tmp_path)
    monkeypatch.setenv("COCO_ROOT", str(tmp_path))
    parser = function_parser("benchmark")
    data = parser.instantiate_classes(parser.parse_args(["--config", str(ROOT / "configs" / config), "--ckpt", "unused.ckpt", "--data.min_area", "0"])).data
    (sequence,) = data.test_sources
    assert len(sequence) == objects and sequence.name.startswith("coco_")
