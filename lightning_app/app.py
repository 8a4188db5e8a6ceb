"""``app``: the annotation app, a local web server (FastAPI + uvicorn) and one page.

    python -m lightning_app app --ckpt CKPT --images DIR --out annotations.json [--mode ia_sa]

The page (``lightning_app/static/``, no build step, nothing fetched from the internet) and any
other tool use the same JSON API, described by ``/openapi.json`` and listed on ``/api``.
All state lives in :class:`lightning_app.annotate.Annotator`; this module only maps HTTP to it.
"""
from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from fastapi import BackgroundTasks, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from lightning_app.annotate import MODES, Annotator, rle_counts
from modules.errors import UserError

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 16 * 1024  # bytes: every request of this API is a few numbers


class ClickIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: int = Field(description="column of the clicked pixel, 0 = left edge of the image")
    y: int = Field(description="row of the clicked pixel, 0 = top edge of the image")
    positive: bool = Field(True, description="true: this pixel belongs to the object; false: it does not")


class OpenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: int = Field(description="index of the image in GET /api/images")


class ModeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: str = Field(description=f"one of {list(MODES)}; takes effect with the next image opened")


class WeightsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str | None = Field(None, description="where to write the checkpoint (default: beside the output file)")


def mask_json(mask: np.ndarray | None) -> dict | None:
    """A mask as uncompressed COCO RLE: ``{"size": [h, w], "counts": [...]}`` (column-major runs,
    background first)."""
    return None if mask is None else {"size": list(mask.shape), "counts": rle_counts(mask)}


def create_app(annotator: Annotator) -> FastAPI:
    app = FastAPI(title="Interactive segmentation that learns from your corrections",
                  description="Annotate your images by clicking; the model adapts to your corrections as you work. "
                              "Masks are exported as COCO RLE.",
                  docs_url=None, redoc_url=None)  # those pages load scripts from a CDN; /api lists the API instead
    app.state.annotator = annotator
    a = annotator

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return JSONResponse({"detail": f"request body too large (at most {MAX_BODY} bytes)"}, status_code=413)
        if length is None and request.method in ("POST", "PUT", "PATCH"):
            body = await request.body()
            if len(body) > MAX_BODY:
                return JSONResponse({"detail": f"request body too large (at most {MAX_BODY} bytes)"}, status_code=413)
        return await call_next(request)

    def fail(e: Exception) -> HTTPException:
        status = 404 if isinstance(e, KeyError) else 409 if isinstance(e, LookupError) else 400
        return HTTPException(status, str(e.args[0]) if e.args else str(e))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return (STATIC / "index.html").read_text()

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api", response_class=HTMLResponse, summary="This API, listed from /openapi.json")
    def api_page():
        return (STATIC / "api.html").read_text()

    @app.get("/api/images", summary="The images to annotate and the progress")
    def images():
        return {"images": a.listing(), **a.progress()}

    @app.get("/api/images/{image_id}/file", summary="An image's file")
    def image_file(image_id: int):
        try:
            return FileResponse(a.check_image(image_id))
        except KeyError as e:
            raise fail(e) from e

    @app.get("/api/state", summary="The open image, its clicks, the mode and the progress")
    def state():
        return a.state()

    @app.post("/api/open", summary="Open an image (an image left unaccepted is abandoned)")
    def open_image(body: OpenIn):
        try:
            return a.open(body.image)
        except (KeyError, UserError) as e:
            raise fail(e) from e

    @app.post("/api/click", summary="Add a click; returns the new mask (image adaptation runs after the answer)")
    def click(body: ClickIn, background: BackgroundTasks):
        try:
            mask, seconds = a.click(body.x, body.y, body.positive)
        except (ValueError, LookupError) as e:
            raise fail(e) from e
        background.add_task(a.adapt)
        return {"mask": mask_json(mask), "latency_ms": 1000 * seconds, "clicks": len(a.state()["clicks"])}

    @app.post("/api/undo", summary="Take the last click back; returns the mask before it")
    def undo():
        try:
            return {"mask": mask_json(a.undo()), "clicks": len(a.state()["clicks"])}
        except LookupError as e:
            raise fail(e) from e

    @app.post("/api/reset", summary="Take every click of the open image back")
    def reset():
        try:
            a.reset()
        except LookupError as e:
            raise fail(e) from e
        return a.state()

    @app.get("/api/mask", summary="The current mask as uncompressed COCO RLE")
    def mask():
        try:
            return {"mask": mask_json(a.mask())}
        except LookupError as e:
            raise fail(e) from e

    @app.get("/api/mask.png", summary="The current mask as a PNG (255 = object)", response_class=Response)
    def mask_png():
        import cv2

        try:
            m = a.mask()
        except LookupError as e:
            raise fail(e) from e
        if m is None:
            raise HTTPException(404, "no mask yet: click on the object first")
        ok, png = cv2.imencode(".png", m.astype(np.uint8) * 255)
        return Response(png.tobytes(), media_type="image/png")

    @app.post("/api/accept", summary="Save the mask to the COCO file; sequence adaptation learns from the image")
    def accept(background: BackgroundTasks):
        try:
            done = a.accept()
        except (ValueError, LookupError) as e:
            raise fail(e) from e
        background.add_task(a.finish_pending)
        return done

    @app.post("/api/mode", summary=f"Choose the adaptation: {', '.join(MODES)}")
    def mode(body: ModeIn):
        try:
            a.set_mode(body.mode)
        except ValueError as e:
            raise fail(e) from e
        return a.state()

    @app.post("/api/weights", summary="Save the adapted weights as a checkpoint the CLI loads (--ckpt)")
    def weights(body: WeightsIn):
        try:
            path = a.save_weights(body.path or str(a.store.path.with_suffix("")) + ".adapted.ckpt")
        except (ValueError, OSError) as e:
            raise fail(e) from e
        return {"path": str(path)}

    @app.post("/api/weights/reset", summary="Back to the checkpoint's weights")
    def weights_reset():
        a.reset_weights()
        return a.state()

    @app.get("/api/export", summary="The COCO instances file written so far")
    def export():
        return a.store.coco()

    @app.get("/api/latency", summary="Click -> mask seconds per mode (p50, p95) over this run")
    def latency():
        return a.latency()

    return app


@contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free port in a background thread (as ``make app`` does in
    the foreground) and yield its base URL; the server stops when the block ends. A client then
    gets each response as soon as it is sent, before the background tasks run (Starlette's
    ``TestClient`` waits for them)."""
    import uvicorn

    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the app's server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def serve_app(ckpt: str, images: str, out: str, mode: str = "ia_sa", presets: str = "", host: str = "127.0.0.1",
              port: int = 8000) -> None:
    """Annotate the images of a folder in the browser; the model learns from your corrections.

    Args:
        ckpt: the interactive model's checkpoint (``make train-init`` writes one).
        images: folder of images to annotate (sub-folders included).
        out: the COCO instances file to write; an existing one is resumed.
        mode: adaptation to start with: fixed, ia, sa or ia_sa (changeable on the page).
        presets: the modes' settings from ``configs/adapt/<presets>/`` instead of ``configs/adapt/``
            (``photo``: those chosen for real photos, with test-time augmentation).
        host: address to listen on (127.0.0.1: this machine only).
        port: port to listen on.
    """
    import uvicorn

    if mode not in MODES:
        raise UserError(f"mode='{mode}': expected one of {list(MODES)}")
    annotator = Annotator(ckpt, images, out, mode, presets=presets)
    print(f"annotating {len(annotator.images)} images of {images} -> {out} "
          f"({annotator.progress()['done']} done); open http://{host}:{port}/", flush=True)
    uvicorn.run(create_app(annotator), host=host, port=port, log_level="warning")
