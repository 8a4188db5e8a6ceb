"""The annotation app: its JSON API end to end (FastAPI's test client), resume, bad requests,
and a real headless browser clicking on the page."""
import json
import os
import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask

from lightning_app.annotate import Annotator, rle_counts, rle_mask


def write_images(folder: Path, n: int = 3, size: int = 64) -> list[Path]:
    """A few scenes of the embedded target domain, as PNG files."""
    from datamodules.synthetic import SyntheticObjects

    folder.mkdir(parents=True, exist_ok=True)
    source = SyntheticObjects("fundus", n, 7, size, 16)
    paths = []
    for i in range(n):
        p = folder / f"img_{i}.png"
        cv2.imwrite(str(p), cv2.cvtColor(source.get_image(i), cv2.COLOR_RGB2BGR))
        paths.append(p)
    return paths


def make_annotator(ckpt, images, out, **kwargs) -> Annotator:
    """An annotator whose tiny, barely trained model is biased to foreground, so that every mask
    has something to accept (these tests are about the app, not the model)."""
    import torch

    a = Annotator(str(ckpt), str(images), str(out), **kwargs)
    with torch.no_grad():
        a.module.net.head.bias.fill_(4.0)
    a.initial = {n: p.detach().clone() for n, p in a.module.state_dict().items()}
    return a


@pytest.fixture()
def client(tiny_ckpt_with_importance, tmp_path):
    from fastapi.testclient import TestClient

    from lightning_app.app import create_app

    write_images(tmp_path / "images")
    annotator = make_annotator(tiny_ckpt_with_importance, tmp_path / "images", tmp_path / "out" / "coco.json")
    with TestClient(create_app(annotator)) as c:
        c.tmp = tmp_path
        c.ckpt = tiny_ckpt_with_importance
        yield c


def test_rle_counts_round_trip():
    m = np.zeros((5, 7), bool)
    m[1:4, 2:6] = True
    m[0, 0] = True
    assert (rle_mask({"size": [5, 7], "counts": rle_counts(m)}) == m).all()
    assert rle_counts(np.ones((2, 2), bool)) == [0, 4]


def test_a_full_session_writes_coco_that_pycocotools_reads_back(client):
    listing = client.get("/api/images").json()
    assert [im["name"] for im in listing["images"]] == ["img_0.png", "img_1.png", "img_2.png"]
    assert (listing["done"], listing["total"]) == (0, 3)
    assert client.post("/api/open", json={"image": 1}).json()["image"] == 1
    r1 = client.post("/api/click", json={"x": 32, "y": 32, "positive": True}).json()
    r2 = client.post("/api/click", json={"x": 5, "y": 5, "positive": False}).json()
    assert r2["clicks"] == 2 and r2["latency_ms"] > 0
    back = client.post("/api/undo").json()
    assert back["clicks"] == 1 and (rle_mask(back["mask"]) == rle_mask(r1["mask"])).all()
    r3 = client.post("/api/click", json={"x": 40, "y": 30, "positive": True}).json()
    png = cv2.imdecode(np.frombuffer(client.get("/api/mask.png").content, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert ((png > 0) == rle_mask(r3["mask"])).all()
    shown = rle_mask(r3["mask"])
    assert shown.any()
    done = client.post("/api/accept").json()
    assert done["image_id"] == 1 and done["next"] == 2 and done["done"] == 1
    coco_file = client.tmp / "out" / "coco.json"
    coco = json.loads(coco_file.read_text())
    assert coco == client.get("/api/export").json()
    ann = coco["annotations"][0]
    assert coco["images"] == [{"id": 1, "file_name": "img_1.png", "height": 64, "width": 64}]
    rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
    assert (coco_mask.decode(rle).astype(bool) == shown).all()
    from pycocotools.coco import COCO

    assert len(COCO(str(coco_file)).getAnnIds(imgIds=[1])) == 1
    clicks = json.loads((client.tmp / "out" / "coco.json.clicks.json").read_text())["objects"]
    assert clicks == [{"annotation_id": 1, "image": "img_1.png", "clicks": [[32, 32, 1], [30, 40, 1]]}]


def test_restarting_on_the_same_output_resumes(client):
    from fastapi.testclient import TestClient

    from lightning_app.app import create_app

    client.post("/api/open", json={"image": 0})
    for x, y in [(32, 32), (30, 34), (34, 30)]:
        mask = rle_mask(client.post("/api/click", json={"x": x, "y": y, "positive": True}).json()["mask"])
    assert mask.any()
    client.post("/api/accept")
    again = Annotator(str(client.ckpt), str(client.tmp / "images"), str(client.tmp / "out" / "coco.json"))
    with TestClient(create_app(again)) as c2:
        listing = c2.get("/api/images").json()
        assert listing["done"] == 1 and listing["images"][0]["done"]
        assert len(c2.get("/api/export").json()["annotations"]) == 1
    assert again.next_image() == 1


def test_mode_weights_and_latency(client, tmp_path):
    assert client.post("/api/mode", json={"mode": "fixed"}).json()["mode"] == "fixed"
    client.post("/api/open", json={"image": 0})
    client.post("/api/click", json={"x": 30, "y": 30, "positive": True})
    assert client.get("/api/latency").json()["fixed"]["clicks"] == 1
    assert client.post("/api/mode", json={"mode": "ia_sa"}).status_code == 200
    client.post("/api/open", json={"image": 2})
    client.post("/api/click", json={"x": 30, "y": 30, "positive": True})  # IA adapts (no SA step: not accepted)
    path = client.post("/api/weights", json={"path": str(tmp_path / "adapted.ckpt")}).json()["path"]
    from lightning_app.checkpoints import load_module

    saved = load_module(path)  # the CLI reads it like any checkpoint
    a = client.app.state.annotator
    assert all(torch.equal(saved.state_dict()[k], a.initial[k]) for k in a.initial)  # the open image's IA left out


def test_photo_presets_predict_with_their_test_time_augmentation(tiny_ckpt_with_importance, tmp_path):
    from modules.errors import UserError
    from modules.session import TestTimeAugmentation, ZoomIn

    write_images(tmp_path / "images", n=1)
    a = Annotator(str(tiny_ckpt_with_importance), str(tmp_path / "images"), str(tmp_path / "coco.json"), mode="sa",
                  presets="photo")
    a.open(0)
    a.click(30, 30, True)
    assert a.session.tta == TestTimeAugmentation(flip=True) and a.session.adapter.sequence.lr == 1e-4
    assert a.session.zoom_in == ZoomIn(skip_clicks=5, expansion_ratio=2.0, target_size=256)
    plain = Annotator(str(tiny_ckpt_with_importance), str(tmp_path / "images"), str(tmp_path / "plain.json"), mode="sa")
    plain.open(0)
    assert plain.session.tta is None
    with pytest.raises(UserError, match="unknown variant 'nope/fixed'"):
        Annotator(str(tiny_ckpt_with_importance), str(tmp_path / "images"), str(tmp_path / "x.json"), presets="nope")


@pytest.mark.parametrize("method,path,body,status,message", [
    ("post", "/api/click", {"x": 3, "y": 3, "positive": True}, 409, "no image is open"),
    ("post", "/api/open", {"image": 99}, 404, "image 99 does not exist"),
    ("get", "/api/images/99/file", None, 404, "image 99 does not exist"),
    ("get", "/api/images/..%2F..%2Fetc%2Fpasswd/file", None, 404, None),
    ("get", "/static/..%2F..%2Fannotate.py", None, 404, None),
    ("post", "/api/open", {"image": "zero"}, 422, None),
    ("post", "/api/mode", {"mode": "magic"}, 400, "mode 'magic' unknown"),
    ("post", "/api/accept", None, 409, "no image is open"),
])
def test_bad_requests_get_a_clear_4xx(client, method, path, body, status, message):
    r = getattr(client, method)(path, json=body) if body is not None else getattr(client, method)(path)
    assert r.status_code == status, r.text
    if message:
        assert message in r.json()["detail"]


def test_bad_clicks_and_oversized_requests(client):
    client.post("/api/open", json={"image": 0})
    for body in [{"x": 64, "y": 3}, {"x": -1, "y": 3}, {"x": 3, "y": 1000}]:
        r = client.post("/api/click", json=body)
        assert r.status_code == 400 and "outside the image (64x64)" in r.json()["detail"]
    for body in [{"x": "a", "y": 3}, {"x": 3}, {"x": 1, "y": 1, "positive": True, "extra": 1}]:
        assert client.post("/api/click", json=body).status_code == 422
    r = client.post("/api/click", content=b"{" + b" " * 20000 + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    assert client.post("/api/accept").status_code == 400  # nothing clicked yet


def test_only_files_inside_the_folder_are_served(tmp_path, tiny_ckpt_with_importance):
    folder = tmp_path / "images"
    write_images(folder, n=1)
    outside = tmp_path / "secret.png"
    shutil.copy(folder / "img_0.png", outside)
    os.symlink(outside, folder / "link_out.png")
    (folder / "sub").mkdir()
    shutil.copy(folder / "img_0.png", folder / "sub" / "inner.png")
    a = Annotator(str(tiny_ckpt_with_importance), str(folder), str(tmp_path / "coco.json"))
    assert [str(p) for p in a.images] == ["img_0.png", "sub/inner.png"]


def test_concurrent_clicks_share_one_model_safely(client):
    client.post("/api/open", json={"image": 0})
    errors = []

    def worker(k):
        r = client.post("/api/click", json={"x": 10 + k, "y": 20, "positive": bool(k % 2)})
        if r.status_code != 200:
            errors.append(r.text)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(client.get("/api/state").json()["clicks"]) == 6


def chromium():
    """A headless Chromium through Selenium; under CI a missing browser fails instead of skipping."""
    driver_path, browser = shutil.which("chromedriver"), shutil.which("chromium")
    if not (driver_path and browser):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are missing (apt-get install chromium chromium-driver)")
        pytest.skip("no chromium/chromedriver on this machine")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,800"]:
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=opts)


def test_a_real_browser_clicks_undoes_and_accepts(tiny_ckpt_with_importance, tmp_path):
    from lightning_app.app import create_app, serving

    write_images(tmp_path / "images", n=2, size=96)
    out = tmp_path / "coco.json"
    annotator = make_annotator(tiny_ckpt_with_importance, tmp_path / "images", out, mode="ia_sa")
    with serving(create_app(annotator)) as url:
        drive_the_page(url, annotator, out, tmp_path)


def drive_the_page(url, annotator, out, tmp_path):
    """Click, undo and accept in the page at ``url`` (served from ``annotator``) in a real browser."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium()
    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.execute_script("return document.getElementById('canvas').width") == 96)
        canvas = driver.find_element(By.ID, "canvas")
        before = driver.execute_script("return Array.from(document.getElementById('canvas').getContext('2d')"
                                       ".getImageData(0, 0, 96, 96).data).join(',')")
        size = canvas.size

        def click_at(fx, fy, right=False):
            chain = ActionChains(driver).move_to_element_with_offset(canvas, int((fx - 0.5) * size["width"]),
                                                                     int((fy - 0.5) * size["height"]))
            (chain.context_click() if right else chain.click()).perform()

        for k, (fx, fy) in enumerate([(0.5, 0.5), (0.55, 0.45), (0.45, 0.55)], start=1):
            click_at(fx, fy)
            wait.until(lambda d, k=k: d.find_element(By.ID, "canvas").get_attribute("data-clicks") == str(k))
        click_at(0.1, 0.1, right=True)
        wait.until(lambda d: d.find_element(By.ID, "canvas").get_attribute("data-clicks") == "4")
        after = driver.execute_script("return Array.from(document.getElementById('canvas').getContext('2d')"
                                      ".getImageData(0, 0, 96, 96).data).join(',')")
        assert after != before  # clicks (and the mask) are drawn
        assert driver.find_element(By.ID, "latency").text.endswith("ms")
        driver.find_element(By.ID, "undo").click()
        wait.until(lambda d: d.find_element(By.ID, "canvas").get_attribute("data-clicks") == "3")
        assert len(annotator.state()["clicks"]) == 3
        assert annotator.mask().any()
        driver.find_element(By.ID, "accept").click()
        wait.until(lambda d: "1 / 2 done" in d.find_element(By.ID, "progress").text)
        coco = json.loads(out.read_text())
        assert len(coco["annotations"]) == 1 and coco["annotations"][0]["image_id"] == 0
        assert len(json.loads(Path(str(out) + ".clicks.json").read_text())["objects"][0]["clicks"]) == 3
        driver.save_screenshot(str(tmp_path / "page.png"))
    finally:
        driver.quit()


def test_a_day_of_annotation_becomes_an_evolution_stage(client):
    """The app's COCO file and clicks are a stage's data and interactions (``make evolve`` with a
    catalog entry that points at them)."""
    from datamodules.evolution import record_interactions
    from datamodules.registry import build_source

    for image, points in ((2, [(30, 30)]), (0, [(32, 32), (20, 25)])):  # accepted out of image order
        client.post("/api/open", json={"image": image})
        for x, y in points:
            client.post("/api/click", json={"x": x, "y": y, "positive": True})
        assert client.post("/api/accept").status_code == 200
    out = client.tmp / "out"
    stage = build_source({"dataset": "coco", "root": str(client.tmp / "images"), "annotations": str(out / "coco.json"),
                          "images": "."}, "catalog.mine.train", 0)
    assert len(stage) == 2
    clicks = record_interactions(stage, client.tmp / "interactions.json", out / "coco.json.clicks.json")
    assert [[(c.y, c.x) for c in cs] for cs in clicks] == [[(32, 32), (25, 20)], [(30, 30)]]  # in the dataset's order
    assert (stage.get_sample(0).mask.sum(), stage.get_sample(1).mask.sum()) != (0, 0)


def test_app_benchmark_times_a_real_server(tiny_ckpt_with_importance, tmp_path):
    """``make app-benchmark`` clicks through HTTP on a uvicorn server: the round trip a browser
    sees (which does not wait for the background IA step) and the server's own time per click."""
    from lightning_app.app_benchmark import app_benchmark

    out = tmp_path / "latency.json"
    r = app_benchmark(str(tiny_ckpt_with_importance), {"dataset": "synthetic", "domain": "fundus", "length": 2, "seed": 7},
                      modes=["fixed", "ia"], clicks=2, think_seconds=0.0, presets="photo", out=str(out))
    assert json.loads(out.read_text()) == r and r["presets"] == "photo"
    for mode in ("fixed", "ia"):
        m = r["modes"][mode]
        assert m["clicks"] == 4 and 0 < m["p50"] <= m["p95"] and m["http_p50"] >= m["p50"]
    assert r["modes"]["fixed"]["p50_vs_fixed"] == 1.0
