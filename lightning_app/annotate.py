"""The annotation app's state, free of HTTP: a person's images, the model that learns from their
corrections, the current image's :class:`~modules.session.InteractiveSession`, and the COCO file
every accepted object is written to.

- Images: every image file inside one folder (sub-folders included; links that lead outside it
  are not listed), addressed by their index in that sorted list, never by a path from a request.
- Adaptation: ``fixed``, ``ia``, ``sa`` or ``ia_sa`` (the settings of ``configs/adapt/<mode>.yaml``).
  IA's steps for a click run after its mask is returned (``defer``), SA's step after an accept:
  both in the user's thinking time. SA's weights carry over from image to image.
- Output: ``out`` is a COCO instances file (RLE masks), rewritten atomically after every accept;
  beside it ``<out>.clicks.json`` holds every accepted object's clicks (an evolution stage's
  interactions). Restarting on the same ``out`` resumes where the person stopped.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as coco_mask

from callbacks.adaptation import TestTimeAdaptation, variant_callback
from datamodules.io import read_image
from datamodules.objects import image_to_tensor
from lightning_app.checkpoints import file_digest, load_module
from lightning_app.importance import load_importance
from modules.adaptation import Adapter
from modules.clicks import Click, clicks_to_rows
from modules.errors import UserError
from modules.io import atomic_write, atomic_write_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MODES = ("fixed", "ia", "sa", "ia_sa")
ADAPT_DIR = Path(__file__).resolve().parents[1] / "configs" / "adapt"


def list_images(folder: str | Path) -> list[Path]:
    """Image files inside ``folder`` (recursively, sorted), as paths relative to it; a file or link
    that resolves outside the folder is left out."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"images folder '{folder}' does not exist (expected a folder of images)")
    real = root.resolve()
    found = []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            try:
                p.resolve().relative_to(real)
            except ValueError:
                continue
            found.append(p.relative_to(root))
    if not found:
        raise UserError(f"images folder '{folder}' holds no image ({', '.join(IMAGE_SUFFIXES)})")
    return found


def rle_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts (column-major runs, starting with background)."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat.size and flat[0] else runs


def rle_mask(rle: dict) -> np.ndarray:
    """The mask of uncompressed COCO RLE ``{"size": [h, w], "counts": [...]}`` (``rle_counts``'s inverse)."""
    h, w = rle["size"]
    flat = np.zeros(h * w, bool)
    pos, value = 0, False
    for run in rle["counts"]:
        flat[pos:pos + run] = value
        pos, value = pos + run, not value
    return flat.reshape((w, h)).T


class CocoStore:
    """The accepted objects as a COCO instances file, written atomically after each change, and
    their clicks beside it; reopening the same file resumes."""

    def __init__(self, path: str | Path, images: list[Path], sizes: dict[int, tuple[int, int]]):
        self.path = Path(path)
        self.clicks_path = self.path.with_name(self.path.name + ".clicks.json")
        self.images, self.sizes = images, sizes
        self.annotations: list[dict] = []
        self.clicks: list[dict] = []
        if self.path.exists():
            try:
                coco = json.loads(self.path.read_text())
                self.annotations = list(coco["annotations"])
                names = {im["id"]: im["file_name"] for im in coco["images"]}
                self.sizes.update({im["id"]: (im["height"], im["width"]) for im in coco["images"]})
                self.clicks = json.loads(self.clicks_path.read_text())["objects"] if self.clicks_path.exists() else []
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"output '{self.path}' is not a COCO file this app wrote ({e}); choose another --out") from e
            listed = {i: str(p) for i, p in enumerate(images)}
            stale = [a for a in self.annotations if listed.get(a["image_id"]) != names.get(a["image_id"])]
            if stale:
                raise UserError(f"output '{self.path}' annotates '{names.get(stale[0]['image_id'])}' as image "
                                f"{stale[0]['image_id']}, which is not that image of this folder; choose another --out")

    def done(self) -> set[int]:
        return {a["image_id"] for a in self.annotations}

    def add(self, image_id: int, mask: np.ndarray, clicks: list[Click]) -> dict:
        rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        ann = {"id": len(self.annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
               "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
               "area": float(coco_mask.area(rle)), "bbox": [float(v) for v in coco_mask.toBbox(rle)]}
        self.annotations.append(ann)
        self.clicks.append({"annotation_id": ann["id"], "image": str(self.images[image_id]),
                            "clicks": clicks_to_rows(clicks)})
        self.write()
        return ann

    def coco(self) -> dict:
        used = sorted(self.done())
        images = [{"id": i, "file_name": str(self.images[i]), "height": self.sizes[i][0], "width": self.sizes[i][1]}
                  for i in used]
        return {"images": images, "annotations": self.annotations, "categories": [{"id": 1, "name": "object"}]}

    def write(self) -> None:
        # the clicks first: a kill in between leaves clicks without their mask, never a mask without its clicks
        atomic_write_text(self.clicks_path, json.dumps({"objects": self.clicks}) + "\n")
        atomic_write_text(self.path, json.dumps(self.coco()) + "\n")


class Annotator:
    """One person's annotation project; every public method is safe to call from several
    threads (one model, one lock).

    Args:
        ckpt: the interactive model's checkpoint (its ``.mas.pt`` is read when present).
        images: folder of the images to annotate.
        out: the COCO file to write (resumed when it exists).
        mode: the adaptation mode to start with (``fixed``, ``ia``, ``sa``, ``ia_sa``).
        adapt_dir: where the modes' settings are read (``<mode>.yaml``).
        presets: a sub-folder of ``adapt_dir`` whose ``<mode>.yaml`` the modes use instead (e.g.
            ``photo``: the real-photo settings ``make tune-real`` chose); empty: ``adapt_dir``'s own.
    """

    def __init__(self, ckpt: str, images: str, out: str, mode: str = "ia_sa", adapt_dir: str | Path = ADAPT_DIR,
                 presets: str = ""):
        self.lock = threading.RLock()
        self.root = Path(images).expanduser()
        self.images = list_images(self.root)
        self.ckpt = str(ckpt)
        importance = load_importance(ckpt, file_digest(ckpt)) if Path(ckpt).is_file() else None
        self.module = load_module(ckpt).eval()
        self.module.mas_importance = importance
        self.initial = {n: p.detach().clone() for n, p in self.module.state_dict().items()}
        self.adapters: dict[str, Adapter | None] = {}
        self.variants: dict[str, TestTimeAdaptation] = {}  # each mode's variant: adaptation settings and predictor
        for m in MODES:  # all built now, so that each MAS anchor is the checkpoint's weights
            cb = self.variants[m] = variant_callback(f"{presets}/{m}" if presets else m, adapt_dir)
            self.adapters[m] = None if (cb.image is None and cb.sequence is None) else \
                Adapter(self.module, cb.image, cb.sequence, importance)
        self.set_mode(mode)
        self.sizes: dict[int, tuple[int, int]] = {}
        self.store = CocoStore(out, self.images, self.sizes)
        self.current: int | None = None
        self.session = None
        self.finishing = None  # an accepted image whose IA reset and SA step are still to run
        self.latencies: dict[str, list[float]] = {m: [] for m in MODES}
        self.objects_this_run = 0

    # -- images --------------------------------------------------------------------------------
    def check_image(self, image_id: int) -> Path:
        if not 0 <= image_id < len(self.images):
            raise KeyError(f"image {image_id} does not exist (expected 0..{len(self.images) - 1})")
        return self.root / self.images[image_id]

    def read(self, image_id: int) -> np.ndarray:
        image = read_image(self.check_image(image_id))
        self.sizes[image_id] = image.shape[:2]
        return image

    def progress(self) -> dict:
        done = self.store.done()
        return {"done": len(done), "total": len(self.images)}

    def listing(self) -> list[dict]:
        done = self.store.done()
        return [{"id": i, "name": str(p), "done": i in done} for i, p in enumerate(self.images)]

    def next_image(self, after: int | None = None) -> int | None:
        """The first image not done after ``after`` (wrapping), ``None`` when all are done."""
        done = self.store.done()
        n = len(self.images)
        start = -1 if after is None else after
        for k in range(1, n + 1):
            i = (start + k) % n
            if i not in done:
                return i
        return None

    # -- the session -----------------------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        """Takes effect with the next image opened."""
        if mode not in MODES:
            raise ValueError(f"mode '{mode}' unknown: expected one of {list(MODES)}")
        with self.lock:
            self.mode = mode

    def open(self, image_id: int) -> dict:
        """Start on an image; an unaccepted image before it is abandoned (IA undone, SA does not
        learn from it)."""
        with self.lock:
            image = self.read(image_id)
            self._close(accepted=False)
            self.current = image_id
            self.session_mode = self.mode
            self.variants[self.mode].attach(self.module, self.adapters[self.mode])
            self.session = self.module.session(image_to_tensor(image)[None], defer=True)
            return self.state()

    def _close(self, accepted: bool) -> None:
        self.finish_pending()
        if self.session is not None:
            self.session.finish(upto=None if accepted else 0)
            self.session = None

    def finish_pending(self) -> None:
        """The accepted image's IA reset and SA step (run after the accept is answered; every
        later action runs it first if it has not run)."""
        with self.lock:
            if self.finishing is not None:
                session, self.finishing = self.finishing, None
                session.finish()

    def require_session(self):
        if self.session is None:
            raise LookupError("no image is open: open one first")
        return self.session

    def click(self, x: int, y: int, positive: bool) -> tuple[np.ndarray, float]:
        """The mask after a click, and the click -> mask seconds (waiting for a deferred step
        included)."""
        start = time.perf_counter()
        with self.lock:
            self.finish_pending()
            session = self.require_session()
            h, w = session.hw
            if not (0 <= x < w and 0 <= y < h):
                raise ValueError(f"click ({x}, {y}) is outside the image ({w}x{h})")
            mask = session.click(Click(int(y), int(x), bool(positive))) > 0.5
        seconds = time.perf_counter() - start
        self.latencies[self.session_mode].append(seconds)
        return mask, seconds

    def adapt(self) -> None:
        """The deferred adaptation of the latest click (run after the response is sent)."""
        with self.lock:
            if self.session is not None:
                self.session.adapt()

    def undo(self) -> np.ndarray | None:
        with self.lock:
            prob = self.require_session().undo()
            return None if prob is None else prob > 0.5

    def reset(self) -> None:
        with self.lock:
            session = self.require_session()
            while session.clicks:
                session.undo()

    def mask(self) -> np.ndarray | None:
        with self.lock:
            prob = self.require_session().probability
            return None if prob is None else prob > 0.5

    def accept(self) -> dict:
        """Write the current mask to the COCO file (atomically) and let SA learn from the image;
        the state then points at the next image not done."""
        with self.lock:
            session = self.require_session()
            if not session.clicks:
                raise ValueError("nothing to accept: click on the object first")
            mask = session.probability > 0.5
            if not mask.any():
                raise ValueError("the mask is empty: add a positive click on the object")
            ann = self.store.add(self.current, mask, session.clicks)
            self.objects_this_run += 1
            accepted = self.current
            self.finishing, self.session, self.current = session, None, None
            return {"annotation_id": ann["id"], "image_id": accepted, "next": self.next_image(accepted), **self.progress()}

    def reset_weights(self) -> None:
        """Back to the checkpoint's weights (what SA learnt so far is dropped)."""
        with self.lock:
            self._close(accepted=False)
            self.current = None
            self.module.load_state_dict(self.initial)

    def save_weights(self, path: str | Path) -> Path:
        """The adapted weights (what SA learnt from the accepted images; the open image's IA left
        out) as a checkpoint every command reads (``--ckpt``)."""
        with self.lock:
            self.finish_pending()
            state = dict(self.module.state_dict())
            adapter = None if self.session is None else self.session.adapter
            if adapter is not None and adapter.image is not None:  # the open image's IA is not part of what was learnt
                state.update(adapter.image_start)
            checkpoint = {"state_dict": state, "hyper_parameters": dict(self.module.hparams),
                          "pytorch-lightning_version": __import__("pytorch_lightning").__version__,
                          "adapted_from": self.ckpt, "objects_learnt": self.objects_this_run}
            return atomic_write(path, lambda f: torch.save(checkpoint, f), mode="wb")

    def state(self) -> dict:
        with self.lock:
            s = self.session
            return {"image": self.current, "mode": self.mode, "image_mode": getattr(self, "session_mode", self.mode),
                    "clicks": [] if s is None else [{"x": c.x, "y": c.y, "positive": c.positive} for c in s.clicks],
                    "size": None if s is None else {"height": s.hw[0], "width": s.hw[1]},
                    "pending": bool(s is not None and s.pending), **self.progress()}

    def latency(self) -> dict:
        """p50 / p95 click -> mask seconds per mode, over this run's clicks."""
        return {m: {"clicks": len(v), "p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95))}
                for m, v in self.latencies.items() if v}
