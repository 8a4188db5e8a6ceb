"""``images`` and ``app-benchmark``: a folder of images to annotate, and the annotation app's
click -> mask latency per adaptation mode, measured through its HTTP API.

The simulated user clicks where the benchmark's user would (the largest error), looks at each
mask for ``think_seconds`` (the app adapts meanwhile), and accepts after ``clicks`` clicks.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from datamodules.registry import build_source
from lightning_app.annotate import MODES, Annotator, rle_mask
from modules.errors import UserError
from modules.io import atomic_write_text
from modules.simulate import next_click


def export_images(data: dict[str, Any], out_dir: str, count: int = 20) -> Path:
    """Write the images of a data entry's first ``count`` objects as PNG files (e.g. the embedded
    target domains, to annotate in the app).

    Args:
        data: a data-config entry, e.g. ``{dataset: synthetic, domain: fundus, length: 20, seed: 7}``.
        out_dir: the folder to write ``<name>_<k>.png`` into.
        count: how many images.
    """
    source = build_source(data, "data", 0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = min(count, len(source))
    for k in range(n):
        path = out / f"{source.name}_{k:03d}.png"
        if not path.exists():
            cv2.imwrite(str(path), cv2.cvtColor(source.get_image(k), cv2.COLOR_RGB2BGR))
    print(f"{n} images of {source.name} in {out}")
    return out


def app_benchmark(ckpt: str, data: dict[str, Any] = {"dataset": "synthetic", "domain": "fundus", "length": 10, "seed": 7},  # noqa: B006
                  modes: list[str] = list(MODES), clicks: int = 6, think_seconds: float = 0.3,  # noqa: B006
                  presets: str = "", out: str = "runs/app_benchmark/latency.json") -> dict:
    """Click -> mask latency of the annotation app per adaptation mode (p50, p95), through its API.

    Args:
        ckpt: the model's checkpoint.
        data: the objects to annotate (their masks guide the simulated user only).
        modes: adaptation modes to measure.
        clicks: clicks per image before accepting.
        think_seconds: the user's time between seeing a mask and the next click (the app's
            deferred adaptation runs in it).
        presets: the modes' settings from ``configs/adapt/<presets>/`` (e.g. ``photo``), as the
            app's ``--presets``.
        out: where the results go (JSON).
    """
    import httpx

    from lightning_app.app import create_app, serving

    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise UserError(f"modes: {unknown} unknown (expected some of {list(MODES)})")
    source = build_source(data, "data", 0)
    results: dict[str, Any] = {"checkpoint": ckpt, "data": data, "clicks_per_image": clicks, "think_seconds": think_seconds,
                               "presets": presets, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_images(data, str(Path(tmp) / "images"), count=len(source))  # sorted names: image k is object k
        for mode in modes:
            annotator = Annotator(ckpt, str(folder), str(Path(tmp) / f"{mode}.json"), mode=mode, presets=presets)
            server, wall = [], []
            with serving(create_app(annotator)) as url, httpx.Client(base_url=url, timeout=60) as client:
                for k in range(len(source)):
                    sample = source.get_sample(k)
                    client.post("/api/open", json={"image": k})
                    pred, made = np.zeros_like(sample.mask), []
                    for _ in range(clicks):
                        c = next_click(pred, sample.mask, sample.ignore, made)
                        if c is None:
                            break
                        made.append(c)
                        start = time.perf_counter()
                        r = client.post("/api/click", json={"x": c.x, "y": c.y, "positive": c.positive}).json()
                        wall.append(time.perf_counter() - start)
                        server.append(r["latency_ms"] / 1000)
                        pred = rle_mask(r["mask"])
                        time.sleep(think_seconds)
                    if pred.any():
                        client.post("/api/accept")
                        time.sleep(think_seconds)
            results["modes"][mode] = {"clicks": len(server), "p50": float(np.percentile(server, 50)),
                                      "p95": float(np.percentile(server, 95)), "http_p50": float(np.percentile(wall, 50)),
                                      "http_p95": float(np.percentile(wall, 95))}
            print(f"{mode}: click -> mask p50 {1000 * results['modes'][mode]['p50']:.1f} ms, "
                  f"p95 {1000 * results['modes'][mode]['p95']:.1f} ms ({len(server)} clicks)", flush=True)
    if "fixed" in results["modes"]:
        base = results["modes"]["fixed"]["p50"]
        for r in results["modes"].values():
            r["p50_vs_fixed"], r["p95_vs_fixed_p50"] = r["p50"] / base, r["p95"] / base
    atomic_write_text(out, json.dumps(results, indent=1) + "\n")
    print(f"results: {out}")
    return results
