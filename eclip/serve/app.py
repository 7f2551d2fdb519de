"""The HTTP routes of `eclip serve` (Starlette). Every answer is JSON except the page and thumbnails;
every refusal is {"error": "..."} with a 4xx code, and the server goes on serving.

    POST /match     multipart: image (1..MAX_IMAGES files), caption (1..MAX_CAPTIONS), threshold
    GET  /search    ?q=CAPTION&k=N: gallery images, best first, with thumbnail URLs
    POST /search    multipart: image (one file), k, target=images|texts
    GET  /image/ID  a JPEG thumbnail of gallery image row ID (only files the gallery names)
    GET  /health    model identity, gallery size, version, batching counts (no token needed)
    GET  /          the page (package data: eclip/serve/page/)
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from eclip.data.images import ImageError, load_image
from eclip.match import gallery_result, pairs_result, search_store
from eclip.serve.batching import Batcher
from eclip.serve.guards import AccessLog, BodyLimit, HostCheck, TokenAuth, UploadTooLarge, write_line
from eclip.serve.pixels import REDUCE, PixelBudget, planned_pixels

MAX_IMAGES = 16              # image files in one request
MAX_CAPTIONS = 256           # captions in one request
MAX_CAPTION_CHARS = 1000     # CLIP reads 77 tokens; a longer caption is a mistake or an attack
MAX_TOP_K = 100
DEFAULT_TOP_K = 5
THUMBNAIL_SIZE = 256
THUMBNAIL_CACHE = 512        # thumbnails kept in memory (~15 kB each)
PAGE_FILES = {"page.js": "text/javascript", "page.css": "text/css"}


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServerState:
    """What the routes share: the batcher (the only way to the model), the gallery, the limits."""
    batcher: Batcher
    store: object = None                 # eclip.embedstore.EmbeddingStore, or None
    search_method: str = "auto"
    model_info: dict = field(default_factory=dict)
    decode_slots: int = max(2, os.cpu_count() or 2)
    pixels: PixelBudget = field(default_factory=lambda: PixelBudget(50_000_000))   # decoded pixels held at once
    thumbnails: OrderedDict = field(default_factory=OrderedDict)


def build_app(state: ServerState, token: str | None = None, max_upload_bytes: int = 20 * 2 ** 20,
              host_names=(), allowed_hosts=()):
    """The ASGI application: routes inside the upload limit, the token check, the Host and Origin
    check (`host_names`: the --host name; `allowed_hosts`: --allowed-host) and the access log."""
    import anyio
    decode_limiter = anyio.CapacityLimiter(state.decode_slots)

    def endpoint(handler):
        async def wrapped(request: Request):
            try:
                return await handler(request, state, decode_limiter)
            except RequestError as e:
                return JSONResponse({"error": str(e)}, status_code=e.status)
            except UploadTooLarge as e:
                return JSONResponse({"error": str(e)}, status_code=413, headers={"connection": "close"})
            except HTTPException as e:    # Starlette's multipart parser refusing a malformed body
                return JSONResponse({"error": f"malformed request: {e.detail}"}, status_code=e.status_code)
            except ClientDisconnect:
                return Response(status_code=499)
            except Exception as e:   # a bug: one line in the log, a JSON 500 to the client, keep serving
                write_line(f"eclip serve: internal error: {type(e).__name__}: {str(e)[:200]}")
                return JSONResponse({"error": "internal error"}, status_code=500)
        return wrapped

    async def http_error(request, exc):   # unknown path, wrong method
        return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}"},
                            status_code=exc.status_code)

    routes = [Route("/match", endpoint(match), methods=["POST"]),
              Route("/search", endpoint(search), methods=["GET", "POST"]),
              Route("/image/{row:int}", endpoint(image), methods=["GET"]),
              Route("/health", endpoint(health), methods=["GET"]),
              Route("/", endpoint(page), methods=["GET"]),
              Route("/static/{name}", endpoint(static), methods=["GET"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app = BodyLimit(app, max_upload_bytes)
    if token:
        app = TokenAuth(app, token)
    return AccessLog(HostCheck(app, host_names, allowed_hosts))


# ---- reading requests -------------------------------------------------------------------------

class Utf8MultiPartParser(MultiPartParser):
    """Starlette's parser, but a text field that is not UTF-8 is refused: Starlette would decode
    it as Latin-1, and `eclip match` refuses such text too."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode("utf-8")
            except UnicodeDecodeError as e:
                raise MultiPartException(f"field '{part.field_name[:40]}' is not UTF-8 text "
                                         f"(byte 0x{part.data[e.start]:02x} at {e.start})") from None
        super().on_part_end()


@contextlib.asynccontextmanager
async def _form(request: Request):
    """The multipart form of the request (its files closed on exit); 400 when it is malformed."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestError(400, "send multipart/form-data (curl -F image=@photo.jpg -F caption=TEXT)")
    try:
        async with contextlib.aclosing(request.stream()) as stream:
            form = await Utf8MultiPartParser(request.headers, stream, max_files=MAX_IMAGES,
                                             max_fields=MAX_CAPTIONS + 8).parse()
    except MultiPartException as e:
        raise RequestError(400, f"malformed request: {e.message}") from None
    try:
        yield form
    finally:
        await form.close()


def _captions(values: list, what: str = "caption") -> list[str]:
    captions = []
    for k, value in enumerate(values, 1):
        name = what if len(values) == 1 else f"{what} {k}"
        if not isinstance(value, str):
            raise RequestError(400, f"{name}: must be a text field, not a file")
        if not value.strip():
            raise RequestError(400, f"{name}: empty")
        if len(value) > MAX_CAPTION_CHARS:
            raise RequestError(400, f"{name}: {len(value)} characters, at most {MAX_CAPTION_CHARS}")
        captions.append(value)
    return captions


def _uploads(values: list) -> list:
    for k, value in enumerate(values, 1):
        if isinstance(value, str):   # never a path on this machine: only bytes the client sent
            raise RequestError(400, f"image {k}: must be a file upload (-F image=@photo.jpg), not a text field")
    return values


def _number(value, name: str, kind=float, low=None, high=None):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise RequestError(400, f"{name}={str(value)[:40]!r}: not a {'whole ' if kind is int else ''}number") from None
    if not math.isfinite(number) or (low is not None and number < low) or (high is not None and number > high):
        raise RequestError(400, f"{name}={number}: must be between {low} and {high}")
    return number


async def _decode(uploads: list, state: ServerState, limiter) -> tuple[list, list[str]]:
    """Uploaded files -> (images after the model's image stage, their names); 400 on a bad file."""
    names = [u.filename or f"image {k}" for k, u in enumerate(uploads, 1)]

    def decode(upload, name):   # one image at a time per request; all requests within state.pixels
        with state.pixels.hold(planned_pixels(upload.file)):
            try:
                return state.batcher.image_stage(load_image(upload.file, REDUCE))
            except ImageError as e:
                raise RequestError(400, f"{name}: {e.reason}") from None

    images = [await run_in_threadpool_limited(limiter, decode, u, n) for u, n in zip(uploads, names)]
    return images, names


async def run_in_threadpool_limited(limiter, fn, *args):
    import anyio.to_thread
    return await anyio.to_thread.run_sync(lambda: fn(*args), limiter=limiter)


# ---- routes -----------------------------------------------------------------------------------

async def match(request: Request, state: ServerState, limiter):
    """The same JSON as `eclip match --json` for the uploaded images and the captions."""
    with state.batcher.arrive() as arrival:
        async with _form(request) as form:
            uploads, captions = _uploads(form.getlist("image")), _captions(form.getlist("caption"))
            threshold = form.get("threshold")
            threshold = None if threshold in (None, "") else _number(threshold, "threshold", float, -1.0, 1.0)
            if not uploads:
                raise RequestError(400, "no image: send one or more files in the field 'image'")
            if not captions:
                raise RequestError(400, "no caption: send one or more fields 'caption'")
            if len(captions) > MAX_CAPTIONS:
                raise RequestError(400, f"{len(captions)} captions, at most {MAX_CAPTIONS} in one request")
            images, names = await _decode(uploads, state, limiter)
        matcher = state.batcher.matcher
        future = arrival.submit(images, captions, lambda fi, ft: pairs_result(matcher, names, fi, captions, ft))
    result = await asyncio.wrap_future(future)
    passed = None if threshold is None else result["best"]["score"] >= threshold
    return JSONResponse({**result, "threshold": threshold, "passed": passed})


async def search(request: Request, state: ServerState, limiter):
    """Top-K gallery rows for a caption (GET ?q=) or a photo (POST image=), with thumbnail URLs."""
    store = state.store
    if store is None:
        raise RequestError(404, "no gallery: start the server with --gallery DIR (a folder from `eclip embed`)")
    with state.batcher.arrive() as arrival:
        if request.method == "GET":
            query = _captions([request.query_params.get("q", "")], "q")[0]
            top_k = _number(request.query_params.get("k", DEFAULT_TOP_K), "k", int, 1, MAX_TOP_K)
            kind, target, images, texts = "text", "images", [], [query]
        else:
            async with _form(request) as form:
                uploads = _uploads(form.getlist("image"))
                if len(uploads) != 1:
                    raise RequestError(400, f"send exactly one file in the field 'image' ({len(uploads)} sent)")
                top_k = _number(form.get("k", DEFAULT_TOP_K), "k", int, 1, MAX_TOP_K)
                target = form.get("target", "images")
                if target not in ("images", "texts"):
                    raise RequestError(400, f"target={str(target)[:40]!r}: images or texts")
                images, (query,) = await _decode(uploads, state, limiter)
            kind, texts = "image", []
        if not store.has(target):
            raise RequestError(400, f"the gallery holds no {target[:-1]} embeddings")
        method = state.search_method
        future = arrival.submit(images, texts, lambda fi, ft: search_store(store, target, ft if texts else fi,
                                                                           top_k, method)[0])
    matches = await asyncio.wrap_future(future)
    if target == "images":
        for m in matches:
            m["thumbnail"] = f"/image/{m['row']}"
    result = gallery_result(store, [{"query": query, "kind": kind, "searched": target, "matches": matches}])
    return JSONResponse(result)


async def image(request: Request, state: ServerState, limiter):
    """A thumbnail of a gallery image, by row: the path comes from the gallery, never from the client."""
    row = request.path_params["row"]
    store = state.store
    if store is None or not store.has("images") or row >= store.count("images"):
        raise RequestError(404, f"no gallery image {row}")
    data = state.thumbnails.get(row)
    if data is None:
        path = store.rows("images", [row])[0]["path"]
        data = await run_in_threadpool_limited(limiter, _thumbnail, path, row, state.pixels)
        state.thumbnails[row] = data
        while len(state.thumbnails) > THUMBNAIL_CACHE:
            state.thumbnails.popitem(last=False)
    return Response(data, media_type="image/jpeg", headers={"cache-control": "private, max-age=3600"})


def _thumbnail(path: str, row: int, pixels: PixelBudget) -> bytes:
    reduce = (0, 2 * THUMBNAIL_SIZE)     # any JPEG: a thumbnail needs no more (Pillow's thumbnail() drafts too)
    with pixels.hold(planned_pixels(path, reduce)):
        try:
            picture = load_image(path, reduce)
        except ImageError as e:
            raise RequestError(404, f"gallery image {row}: {e.reason}") from None
        picture.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=85)
    return out.getvalue()


async def health(request: Request, state: ServerState, limiter):
    from eclip import __version__
    store = state.store
    gallery = None if store is None else {k: store.count(k) for k in ("images", "texts")}
    return JSONResponse({"status": "ok", "version": __version__, "model": state.model_info, "gallery": gallery,
                         "batching": dict(state.batcher.stats)})


async def page(request: Request, state: ServerState, limiter):
    return Response(_page_file("index.html"), media_type="text/html; charset=utf-8")


async def static(request: Request, state: ServerState, limiter):
    name = request.path_params["name"]
    if name not in PAGE_FILES:     # a fixed list: nothing else of the package is reachable
        raise RequestError(404, f"no such file: /static/{name}")
    return Response(_page_file(name), media_type=PAGE_FILES[name] + "; charset=utf-8")


def _page_file(name: str) -> bytes:
    return resources.files("eclip.serve").joinpath("page", name).read_bytes()
