"""Procedural multi-domain images with instance masks, deterministic by seed.

No dataset can be downloaded here, so the default data is drawn. Each domain renders one
scene per ``(seed, index)``; the scene's instance map gives every object's mask. Domains:

- ``source``: photo-like cluttered scenes, varied shapes, colours and textures (training);
- ``fundus``: retinal-fundus-like, one optic-disc-like object with a soft boundary on a
  reddish textured background crossed by vessels (modelled on DRIONS-DB);
- ``rooftop``: aerial, polygonal gable roofs with a ridge, shadows, textured ground and
  trees (modelled on the Rooftop dataset);
- ``cells``: microscopy-like stained nuclei, the tuning domain, used only to choose
  hyperparameters.
"""
from __future__ import annotations

import inspect
import zlib
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from datamodules.objects import Sample
from modules.errors import UserError


@dataclass
class Scene:
    image: np.ndarray  # H, W, 3 uint8 RGB
    instances: np.ndarray  # H, W int32; 0 background, k > 0 object k
    targets: np.ndarray | None = None  # ids that may be targets (None: every object)
    classes: dict[int, int] | None = None  # object id -> class id (None: no classes)


SHAPE_CLASSES = {0: "ellipse", 1: "polygon", 2: "rectangle", 3: "blob"}
"""The source domain's object classes: its four shape kinds (paper B's known classes)."""


def _noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random ``cells x cells`` grid upsampled bicubically."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    out = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    lo, hi = out.min(), out.max()
    return (out - lo) / (hi - lo + 1e-6)


def _colour(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.integers(0, 180), rng.integers(60, 256), rng.integers(60, 256)]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _finish(img: np.ndarray, rng: np.random.Generator, blur: float, noise: float) -> np.ndarray:
    if blur > 0:
        img = cv2.GaussianBlur(img, (0, 0), blur)
    img = img + rng.normal(0, noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _near(mask: np.ndarray, px: int) -> np.ndarray:
    """``mask`` grown by ``px`` pixels."""
    return cv2.dilate(mask.astype(np.uint8), np.ones((2 * px + 1, 2 * px + 1), np.uint8)) > 0


def _random_polygon(rng: np.random.Generator, cy: float, cx: float, r: float, n: int, spikiness: float) -> np.ndarray:
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = r * (1 - spikiness * rng.random(n))
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    return np.round(pts).astype(np.int32)


def _shape_mask(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, int]:
    """A random shape's mask and its kind (a key of :data:`SHAPE_CLASSES`)."""
    m = np.zeros((h, w), np.uint8)
    side = min(h, w)
    r = rng.uniform(0.16, 0.36) * side
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    kind = rng.integers(0, 4)
    if kind == 0:  # ellipse
        axes = (int(r), int(r * rng.uniform(0.4, 1.0)))
        cv2.ellipse(m, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    elif kind == 1:  # polygon, convex-ish or star-like
        cv2.fillPoly(m, [_random_polygon(rng, cy, cx, r, int(rng.integers(3, 9)), rng.uniform(0, 0.6))], 1)
    elif kind == 2:  # rotated rectangle
        box = cv2.boxPoints(((cx, cy), (2 * r, 2 * r * rng.uniform(0.3, 1.0)), rng.uniform(0, 180)))
        cv2.fillPoly(m, [np.round(box).astype(np.int32)], 1)
    else:  # blob: thresholded smooth noise inside a disk
        blob = _noise(rng, h, w, 6)
        disk = np.zeros((h, w), np.uint8)
        cv2.circle(disk, (int(cx), int(cy)), int(r * 1.2), 1, -1)
        m = ((blob > 0.45) & (disk > 0)).astype(np.uint8)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(m)
        if n > 1:
            m = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    return m.astype(bool), int(kind)


def _texture(rng: np.random.Generator, h: int, w: int, base: np.ndarray) -> np.ndarray:
    kind = rng.integers(0, 4)
    t = np.ones((h, w, 1), np.float32)
    if kind == 1:  # stripes
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        a = rng.uniform(0, np.pi)
        period = rng.uniform(4, 14)
        t = (0.8 + 0.25 * np.sin((np.cos(a) * xx + np.sin(a) * yy) * 2 * np.pi / period))[..., None]
    elif kind == 2:  # shading gradient
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        a = rng.uniform(0, 2 * np.pi)
        g = np.cos(a) * xx / w + np.sin(a) * yy / h
        t = (0.65 + 0.5 * (g - g.min()) / (np.ptp(g) + 1e-6))[..., None]
    elif kind == 3:  # mottled
        t = (0.7 + 0.5 * _noise(rng, h, w, int(rng.integers(4, 12))))[..., None]
    img = base[None, None, :] * t
    if rng.random() < 0.3:  # a second colour patch inside the object
        patch = _noise(rng, h, w, 3) > 0.6
        img[patch] = 0.5 * img[patch] + 0.5 * _colour(rng)
    return img


def render_source(rng: np.random.Generator, size: int) -> Scene:
    h = w = size
    c1, c2 = _colour(rng) * 0.8, _colour(rng) * 0.8
    blend = _noise(rng, h, w, int(rng.integers(2, 6)))[..., None]
    img = c1 * blend + c2 * (1 - blend)
    img *= (0.8 + 0.4 * _noise(rng, h, w, 16))[..., None]
    instances = np.zeros((h, w), np.int32)
    drawn: dict[int, int] = {}
    kinds: dict[int, int] = {}
    for k in range(1, int(rng.integers(2, 5)) + 1):
        m, kind = _shape_mask(rng, h, w)
        if m.sum() < 30:
            continue
        if rng.random() < 0.4:  # soft drop shadow
            d = max(2, size // 40)
            shift = np.roll(np.roll(m, int(rng.integers(d, 3 * d)), 0), int(rng.integers(d, 3 * d)), 1) & ~m
            img[shift] *= 0.6
        under = img[m].mean(axis=0)
        colour = max((_colour(rng) for _ in range(4)), key=lambda c: np.abs(c - under).sum())  # stands out, as photos' objects mostly do
        img[m] = _texture(rng, h, w, colour)[m]
        instances[m] = k
        drawn[k] = int(m.sum())
        kinds[k] = kind
    # objects mostly hidden by later ones are ambiguous targets: they stay in the scene as clutter
    visible = {k: (instances == k).sum() / a for k, a in drawn.items()}
    targets = np.array([k for k, v in visible.items() if v >= 0.6], np.int32)
    return Scene(_finish(img, rng, blur=rng.uniform(0.3, 1.0), noise=rng.uniform(2, 8)), instances, targets, kinds)


def _vessels(rng: np.random.Generator, img: np.ndarray, start: tuple[float, float], size: int, n: int) -> None:
    for _ in range(n):
        y, x = start
        angle = rng.uniform(0, 2 * np.pi)
        width = float(rng.uniform(1.5, 3.5))
        pts = [(x, y)]
        for _ in range(int(rng.integers(15, 30))):
            angle += rng.normal(0, 0.25)
            step = size / 40
            x, y = x + step * np.cos(angle), y + step * np.sin(angle)
            pts.append((x, y))
        shade = rng.uniform(0.45, 0.7)
        poly = np.round(np.array(pts)).astype(np.int32)
        layer = np.zeros(img.shape[:2], np.uint8)
        cv2.polylines(layer, [poly], False, 1, max(1, int(round(width))))
        img[layer > 0] *= np.array([shade, shade * 0.8, shade * 0.8], np.float32)


def render_fundus(rng: np.random.Generator, size: int) -> Scene:
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r_fov = size * rng.uniform(0.46, 0.52)
    rr = np.hypot(yy - h / 2, xx - w / 2) / r_fov
    base = np.array([rng.uniform(170, 220), rng.uniform(55, 95), rng.uniform(15, 40)], np.float32)
    tex = 0.75 + 0.35 * _noise(rng, h, w, int(rng.integers(6, 14)))
    img = base[None, None] * tex[..., None] * np.clip(1.15 - 0.55 * rr**2, 0, 1)[..., None]
    # optic disc: bright, soft-edged ellipse with a brighter cup
    r = size * rng.uniform(0.17, 0.25)
    side = rng.choice([-1, 1])
    cy, cx = h / 2 + rng.uniform(-0.08, 0.08) * h, w / 2 + side * rng.uniform(0.04, 0.14) * w
    axes = (int(r * rng.uniform(0.85, 1.0)), int(r))
    disc = np.zeros((h, w), np.uint8)
    cv2.ellipse(disc, (int(cx), int(cy)), axes, float(rng.uniform(-20, 20)), 0, 360, 1, -1)
    soft = cv2.GaussianBlur(disc.astype(np.float32), (0, 0), r * rng.uniform(0.12, 0.25))
    disc_col = np.array([rng.uniform(225, 255), rng.uniform(170, 220), rng.uniform(100, 150)], np.float32)
    img = img * (1 - soft[..., None]) + disc_col * soft[..., None]
    cup = np.zeros((h, w), np.float32)
    cv2.ellipse(cup, (int(cx), int(cy)), (max(1, axes[0] // 2), max(1, axes[1] // 2)), 0, 0, 360, 1.0, -1)
    cup = cv2.GaussianBlur(cup, (0, 0), r * 0.2)
    img = img * (1 - 0.5 * cup[..., None]) + 255 * 0.5 * cup[..., None]
    _vessels(rng, img, (cy, cx), size, int(rng.integers(4, 8)))
    macula = np.exp(-(((yy - cy) ** 2 + (xx - (cx - side * 0.3 * w)) ** 2) / (2 * (0.08 * size) ** 2)))
    img *= (1 - 0.35 * macula)[..., None]
    img[rr > 1] = 0
    return Scene(_finish(img, rng, blur=rng.uniform(0.5, 1.2), noise=rng.uniform(2, 5)), disc.astype(np.int32))


def _roof_polygon(rng: np.random.Generator, cy: float, cx: float, length: float, width: float, angle: float) -> np.ndarray:
    return cv2.boxPoints(((cx, cy), (length, width), angle))


ROOF_COLOURS = np.array([[150, 150, 155], [160, 80, 60], [110, 85, 70], [60, 60, 65], [120, 110, 85], [95, 105, 80]],
                        np.float32)
"""Tiles, slate, tar, and the mossy or dusty shades that sit close to the ground's own colours."""


def render_rooftop(rng: np.random.Generator, size: int, facet_light: float = 0.9, tile_lines: float = 0.3) -> Scene:
    """Aerial tiles: ground, a road, then a terrace of 1-3 attached buildings (each roof its own
    object; neighbours share a wall and differ only in shade), gable or hip roofs whose facets
    the sun lights differently, in colours close to the ground's, shadows, and trees that may
    hide roof edges.

    Style (the same scenes either way, only shaded differently): ``facet_light`` is how much
    brighter the facet facing the sun is than the mean (0.9: +-90 %), ``tile_lines`` the depth
    of the tile rows' stripes (0.3: 30 %). Until 2026-11-24 the defaults were 0.3 and 0.08, under
    which rooftop was no domain gap (the source model's NoC@80 1.12-1.30x the source's on
    validation objects); 0.9 and 0.3 are the smaller of two styles measured there that give
    at least 1.5x with every model (1.66-1.91x; README, "Embedded data")."""
    h = w = size
    g1 = np.array([rng.uniform(70, 110), rng.uniform(90, 130), rng.uniform(50, 80)], np.float32)
    g2 = np.array([rng.uniform(120, 160), rng.uniform(110, 140), rng.uniform(80, 110)], np.float32)
    blend = _noise(rng, h, w, int(rng.integers(3, 8)))[..., None]
    img = g1 * blend + g2 * (1 - blend)
    img *= (0.85 + 0.3 * _noise(rng, h, w, 32))[..., None]
    if rng.random() < 0.6:  # a road
        road = np.zeros((h, w), np.uint8)
        y0, y1 = rng.uniform(0, h, 2)
        cv2.line(road, (0, int(y0)), (w, int(y1)), 1, int(rng.integers(6, 14)))
        img[road > 0] = rng.uniform(90, 130)
    instances = np.zeros((h, w), np.int32)
    sun = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 180)
    a = np.deg2rad(angle)
    axis = np.array([np.cos(a), np.sin(a)])  # along the terrace (x, y)
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    # seen from above, roofing takes on the colour of the dust and moss around it: low contrast
    mix = rng.uniform(0.25, 0.7)
    base = mix * ROOF_COLOURS[int(rng.integers(len(ROOF_COLOURS)))] * rng.uniform(0.8, 1.2) \
        + (1 - mix) * img.reshape(-1, 3).mean(axis=0)
    count = int(rng.integers(1, 4))
    lengths = size * rng.uniform(0.22, 0.42, count)
    width = size * rng.uniform(0.22, 0.34)
    offset = -lengths.sum() / 2
    for k in range(1, count + 1):
        length = lengths[k - 1]
        centre = np.array([cx, cy]) + axis * (offset + length / 2)
        offset += length
        roof = np.zeros((h, w), np.uint8)
        cv2.fillPoly(roof, [np.round(_roof_polygon(rng, centre[1], centre[0], length, width * rng.uniform(0.9, 1.1),
                                                   angle)).astype(np.int32)], 1)
        roof_b = roof.astype(bool) & (instances == 0)
        if roof_b.sum() < 40:
            continue
        d = size * 0.06
        shadow = np.roll(np.roll(roof_b, int(d * np.sin(sun)), 0), int(d * np.cos(sun)), 1) & ~roof_b & (instances == 0)
        img[shadow] *= 0.45
        colour = base * rng.uniform(0.85, 1.15, 3)  # neighbours: the same roofing, another shade
        along = (xx - centre[0]) * np.cos(a) + (yy - centre[1]) * np.sin(a)
        across = -(xx - centre[0]) * np.sin(a) + (yy - centre[1]) * np.cos(a)
        if rng.random() < 0.5:  # gable: two facets either side of the ridge
            facet = np.where(across > 0, 0, 2)
        else:  # hip: four facets, the end ones meeting the ridge
            end = np.abs(along) - (length - width) / 2 > np.abs(across)
            facet = np.where(end, np.where(along > 0, 1, 3), np.where(across > 0, 0, 2))
        normals = a + np.array([np.pi / 2, 0.0, -np.pi / 2, np.pi])  # each facet's downhill direction
        light = (1.0 + facet_light * np.cos(normals - sun)).astype(np.float32)
        tiles = (1.0 - tile_lines) + tile_lines * np.sin(np.where(facet % 2 == 0, across, along) * 2 * np.pi / rng.uniform(2.5, 4.0))
        img[roof_b] = (colour[None, None] * (light[facet] * tiles)[..., None])[roof_b]
        instances[roof_b] = k
    for _ in range(int(rng.integers(2, 8))):  # trees, over roof edges too
        ty, tx = rng.uniform(0, h), rng.uniform(0, w)
        tree = np.zeros((h, w), np.uint8)
        cv2.circle(tree, (int(tx), int(ty)), int(size * rng.uniform(0.025, 0.06)), 1, -1)
        tree_b = tree.astype(bool)
        img[tree_b] = np.array([40, 70, 35], np.float32) * rng.uniform(0.7, 1.2)
        instances[tree_b] = 0
    return Scene(_finish(img, rng, blur=rng.uniform(0.4, 0.9), noise=rng.uniform(3, 7)), instances)


def render_cells(rng: np.random.Generator, size: int) -> Scene:
    h = w = size
    bg = np.array([rng.uniform(220, 245), rng.uniform(180, 215), rng.uniform(210, 235)], np.float32)
    img = bg[None, None] * (0.9 + 0.15 * _noise(rng, h, w, 10))[..., None]
    instances = np.zeros((h, w), np.int32)
    for k in range(1, int(rng.integers(2, 7)) + 1):
        m = np.zeros((h, w), np.uint8)
        r = size * rng.uniform(0.1, 0.2)
        c = (int(rng.uniform(0.1, 0.9) * w), int(rng.uniform(0.1, 0.9) * h))
        cv2.ellipse(m, c, (int(r), int(r * rng.uniform(0.6, 1.0))), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        m_b = m.astype(bool)
        if m_b.sum() < 20 or (m_b & _near(instances > 0, 1)).any():  # nuclei touch at most
            continue
        stain = np.array([rng.uniform(70, 130), rng.uniform(40, 80), rng.uniform(120, 170)], np.float32)
        img[m_b] = (stain[None, None] * (0.7 + 0.5 * _noise(rng, h, w, 12))[..., None])[m_b]
        instances[m_b] = k
    return Scene(_finish(img, rng, blur=rng.uniform(0.6, 1.2), noise=rng.uniform(3, 6)), instances)


DOMAINS: dict[str, Callable[..., Scene]] = {  # (rng, size, **style) -> Scene
    "source": render_source,
    "fundus": render_fundus,
    "rooftop": render_rooftop,
    "cells": render_cells,
}


def resolve_style(domain: str, style: dict | None) -> dict:
    """The renderer keywords of ``domain`` with ``style`` over their defaults: the whole style a
    scene is drawn with (``{}`` for a domain without any). Unknown keys are a clear error."""
    params = {k: p.default for k, p in inspect.signature(DOMAINS[domain]).parameters.items() if k not in ("rng", "size")}
    style = {} if style is None else style
    if not isinstance(style, dict):
        raise UserError(f"style={style!r} for domain '{domain}': expected a mapping of {list(params)} to values")
    for key in style:
        if key not in params:
            raise UserError(f"style key '{key}' unknown for domain '{domain}': expected one of {list(params)}")
    return params | style


def render(domain: str, seed: int, index: int, size: int = 128, style: dict | None = None) -> Scene:
    """Render scene ``index`` of ``domain``; the same arguments always give the same scene.
    ``style``: keyword arguments of the domain's renderer (e.g. rooftop's ``facet_light``)."""
    if domain not in DOMAINS:
        raise KeyError(domain)
    rng = np.random.default_rng([seed, index, zlib.crc32(domain.encode())])
    return DOMAINS[domain](rng, size, **(style or {}))


class SyntheticObjects:
    """One object per scene of a procedural domain, ``length`` scenes, deterministic.

    Scenes are drawn lazily in ``get_sample``; the object is chosen by seed among those of at
    least ``min_area`` pixels (scenes without one are redrawn under a shifted index).
    """

    def __init__(self, domain: str, length: int, seed: int, size: int = 128, min_area: int = 64,
                 style: dict | None = None):
        if domain not in DOMAINS:
            raise UserError(f"unknown domain '{domain}': expected one of {sorted(DOMAINS)}")
        self.style = resolve_style(domain, style)
        if length < 1:
            raise UserError(f"length={length} for domain '{domain}': expected at least 1")
        self.domain, self.length, self.seed, self.size, self.min_area = domain, length, seed, size, min_area
        self.name = domain
        self.class_names = SHAPE_CLASSES if domain == "source" else {}

    def __len__(self) -> int:
        return self.length

    def get_image(self, index: int) -> np.ndarray:
        """The image of object ``index`` alone (what an annotation tool shows the user)."""
        return self._draw(index).image  # drawn, not read: there is no mask file to avoid

    def class_of(self, index: int) -> int:
        return self._draw(index).class_id

    def get_sample(self, index: int) -> Sample:
        return self._draw(index)

    def _draw(self, index: int) -> Sample:
        for attempt in range(100):
            scene = render(self.domain, self.seed, index + attempt * 10_000_019, self.size, self.style)
            ids, areas = np.unique(scene.instances[scene.instances > 0], return_counts=True)
            ids = ids[areas >= self.min_area]
            if scene.targets is not None:
                ids = ids[np.isin(ids, scene.targets)]
            if len(ids):
                break
        else:
            raise UserError(f"domain '{self.domain}' (size {self.size}) drew no object of at least min_area={self.min_area} px "
                            "in 100 scenes: expected a smaller min_area or a larger size")
        pick = np.random.default_rng([self.seed, index]).choice(ids)
        mask = scene.instances == pick
        others = np.where(mask, 0, scene.instances)
        class_id = -1 if scene.classes is None else scene.classes[int(pick)]
        return Sample(scene.image, mask, np.zeros_like(mask), others, f"{self.domain}/{self.seed}/{index}", class_id)
