"""The prediction service: an ASGI app (Starlette) over one model, with dynamic batching and a web page.

Routes:
    GET  /         the web page (serve/static/index.html): drop an image, see the top-5 and the attention map.
    GET  /health   {"status", "requests", "batches", "largest_batch", "failed_batches", "queued", "max_batch"}.
    GET  /model    name, classes, input size, preprocessing, config, limits.
    POST /predict  an image as the raw body or as a multipart file field; `?topk=N` (default 5) and
                   `?attention=1` for the attention rollout over the token grid. Returns {"labels", "probs"}
                   (best first, as `vitkit predict`), and with attention {"attention": {"grid", "map", "region"}}.

Errors are JSON {"error": why, "status": code}: 400 a malformed request, 413 an upload over the byte or pixel
limit, 415 a file that is not a readable image, 503 a full queue. None of them stops the service.
"""

from __future__ import annotations

import asyncio
import io
import logging
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..analysis import attention_rollout
from ..data.images import UnreadableImage, decode
from ..evaluate import autocast, class_scores, inference_model
from ..models import VisionTransformer
from ..predict import class_names
from ..preprocess import crop_box
from .batching import DynamicBatcher, Overloaded

log = logging.getLogger("vitkit.serve")


@dataclass
class Limits:
    """What one request may send.

    Attributes:
        max_upload_bytes: request body size (an upload over it gets 413 before it is decoded).
        max_pixels: width x height the image header may claim (413 beyond, read from the header only).
        max_topk: largest `?topk=` accepted (capped by the number of classes).
    """

    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 40_000_000
    max_topk: int = 100


@dataclass
class Job:
    image: torch.Tensor  # (C, H, W), the model's input
    attention: bool


@dataclass
class Answer:
    probs: torch.Tensor  # (num_classes,) softmax
    rollout: np.ndarray | None  # (gh, gw), when asked


class RequestError(Exception):
    """A problem with one request, answered as JSON with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def run_jobs(
    model: VisionTransformer, fast: VisionTransformer, jobs: list[Job], precision: str = "fp32", flip: bool = False
) -> list[Answer]:
    """One forward pass of `fast` for the whole batch (two with `flip`); the rollout pass of `model` only for the
    images that asked for it. `fast` runs `model` at `precision` (`vitkit.evaluate.inference_model`); precision and
    flip as `vitkit predict` takes them."""
    images = torch.stack([job.image for job in jobs])
    with torch.no_grad(), autocast("cpu", precision):
        probs = class_scores(fast, images, flip).softmax(dim=-1)
    wanted = [i for i, job in enumerate(jobs) if job.attention]
    rollouts: dict[int, np.ndarray] = {}
    if wanted:  # in fp32 whatever the precision: an analysis, asked for now and then
        maps = attention_rollout(model, images[wanted])  # (len(wanted), gh, gw)
        rollouts = dict(zip(wanted, maps, strict=True))
    return [Answer(probs[i], rollouts.get(i)) for i in range(len(jobs))]


def create_app(
    model: VisionTransformer,
    max_batch: int = 8,
    max_wait_ms: float = 5.0,
    max_queue: int = 256,
    limits: Limits | None = None,
    name: str | None = None,
    precision: str = "fp32",
    flip: bool = False,
) -> Starlette:
    """The service for `model` (put in eval mode); the batch worker runs while the app does (its lifespan).

    Args:
        model: any VisionTransformer with a classification head.
        max_batch: most requests per forward pass; 1 turns dynamic batching off.
        max_wait_ms: how long the first request of a batch waits for company.
        max_queue: most requests waiting for the model; more get 503.
        limits: upload limits (defaults: 10 MiB, 40 megapixels).
        name: what /model calls the model (default: its config name).
        precision: "fp32", "bf16" (autocast: faster on CPUs with bf16 units) or "int8" (an int8 copy of the
            blocks' dense layers, `vitkit.models.quantize`; the attention rollout stays fp32).
        flip: average each image's probabilities with its mirror image's (`vitkit.evaluate.class_scores`).
    """
    if model.cfg.num_classes == 0:
        raise ValueError("the model has no classification head (num_classes=0); nothing to serve")
    autocast("cpu", precision)  # an unknown precision fails here, before the service starts
    fast = inference_model(model.eval(), "cpu", precision)  # the model itself but for int8; both in eval mode
    limits = limits or Limits()
    names = class_names(model)
    channels = 1 if model.cfg.in_chans == 1 else 3
    batcher: DynamicBatcher[Job, Answer] = DynamicBatcher(
        lambda jobs: run_jobs(model, fast, jobs, precision, flip), max_batch, max_wait_ms, max_queue
    )
    page = resources.files("vitkit.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    info = {
        "name": name or model.cfg.name or "vitkit model",
        "num_classes": model.cfg.num_classes,
        "classes": names,
        "img_size": list(model.cfg.img_size),
        "preprocess": model.preprocess.to_dict(),
        "config": model.cfg.to_dict(),
        "limits": {"max_upload_bytes": limits.max_upload_bytes, "max_pixels": limits.max_pixels},
        "batching": {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "max_queue": max_queue},
        "precision": precision,
        "flip": flip,
    }

    def prepare(data: bytes) -> tuple[torch.Tensor, list[float]]:
        """Upload bytes -> the model's input, and where it lies in the upright image (left, top, width, height
        as fractions). Runs in a worker thread: decoding a large photo takes milliseconds."""
        size = _header_size(data)
        if size is not None and size[0] * size[1] > limits.max_pixels:
            w, h = size
            raise RequestError(413, f"image of {w}x{h} = {w * h} pixels is over the limit of {limits.max_pixels}")
        try:
            image = decode(data, "upload", channels, max_pixels=limits.max_pixels)
        except UnreadableImage as e:
            raise RequestError(415, f"not a readable image: {e.reason}") from None
        (rw, rh), (left, top, right, bottom) = crop_box(model.preprocess, image.size)
        region = [left / rw, top / rh, (right - left) / rw, (bottom - top) / rh]
        return model.preprocess(image), region

    async def predict(request: Request) -> Response:
        topk = _int_param(request, "topk", 5, 1, min(limits.max_topk, len(names)))
        attention = request.query_params.get("attention", "0").lower() in ("1", "true", "yes")
        data = await _read_upload(request, limits.max_upload_bytes)
        image, region = await run_in_threadpool(prepare, data)
        try:
            future = batcher.submit(Job(image, attention))
        except Overloaded as e:
            raise RequestError(503, str(e)) from None
        answer: Answer = await asyncio.wrap_future(future)
        top = answer.probs.topk(topk)
        body: dict[str, Any] = {"labels": [names[i] for i in top.indices.tolist()], "probs": top.values.tolist()}
        if attention:
            assert answer.rollout is not None
            body["attention"] = {"grid": list(answer.rollout.shape), "map": answer.rollout.tolist(), "region": region}
        return JSONResponse(body)

    async def health(request: Request) -> Response:
        status = "ok" if batcher.alive else "stopped"
        stats = {"status": status, **batcher.stats.to_dict(), "queued": batcher.queued, "max_batch": max_batch}
        return JSONResponse(stats, status_code=200 if batcher.alive else 503)

    async def model_info(request: Request) -> Response:
        return JSONResponse(info)

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop)

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/model", model_info, methods=["GET"]),
        Route("/predict", _answering_errors(predict), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    app.state.batcher = batcher
    return app


def _answering_errors(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except RequestError as e:
            return _error(e.status, e.message)
        except HTTPException:
            raise  # starlette's own (e.g. 400 for a malformed multipart body), answered by `_http_error`
        except Exception:  # a bug or a failed batch: answer 500 and keep serving
            log.exception("POST /predict failed")
            return _error(500, "internal error while predicting; see the server log")

    return wrapped


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, str(exc.detail))


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def _int_param(request: Request, key: str, default: int, least: int, most: int) -> int:
    raw = request.query_params.get(key)
    if raw is None:
        return min(default, most)
    try:
        value = int(raw)
    except ValueError:
        raise RequestError(400, f"?{key}={raw!r}: expected an integer from {least} to {most}") from None
    if not least <= value <= most:
        raise RequestError(400, f"?{key}={value}: expected an integer from {least} to {most}")
    return value


async def _read_upload(request: Request, limit: int) -> bytes:
    """The image bytes: the one file field of a multipart form, or the raw body; at most `limit` bytes."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:  # refused before reading a byte of it
        raise RequestError(413, f"upload of {int(length)} bytes is over the limit of {limit} bytes")
    capped = Request(request.scope, _capped_receive(request, limit))
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with capped.form(max_files=1, max_fields=16) as form:
            files = [v for v in form.values() if isinstance(v, UploadFile)]
            if not files:
                raise RequestError(400, "multipart upload without a file; send the image as a file field")
            data = await files[0].read()
    else:
        data = b"".join([chunk async for chunk in capped.stream()])
    if not data:
        raise RequestError(400, "empty upload; send an image as the request body or as a multipart file field")
    return data


def _capped_receive(request: Request, limit: int) -> Callable[[], Awaitable[dict]]:
    """The request's ASGI receive, raising 413 once the body passes `limit` bytes (chunked uploads have no
    Content-Length to check up front)."""
    received = 0

    async def receive() -> dict:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise RequestError(413, f"upload is over the limit of {limit} bytes")
        return message

    return receive


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image header, without decoding pixels; None when Pillow cannot tell (decode
    then says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"image is over Pillow's decompression-bomb limit: {e}") from None
    except Exception:
        return None
