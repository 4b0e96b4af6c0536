"""Serving: a fitted run behind HTTP (FastAPI + uvicorn).

    POST /predict[?top=K]   multipart field `files` (repeatable), or JSON {"images": [{"name", "data"}]}
    GET  /health            {"status": "ok", "run": ...} once the model is loaded
    GET  /info              backbone, weights, layer, pooling, size, head, classes, feature set, metrics
    GET  /docs, /openapi.json

Design:
- One process holds the backbone and head, loaded once. Forward passes run in one worker thread (the
  engine already uses every core inside a pass: TF's intra-op threads, or one ONNX Runtime / OpenVINO
  stream per core), so the event loop stays free to parse; decoding runs in the thread pool.
- New images from concurrent requests are micro-batched: they queue up and the worker takes up to
  `max_batch` of them at a time, waiting at most `max_wait_ms` after the oldest one arrived (under
  load the queue fills while the previous pass runs, so batches grow with no added wait), then runs
  one forward pass and one head call for the whole batch (the head costs about as much for 32 rows
  as for 1).
- Images already in the run's feature set (same content hash as the cache uses) are answered from the
  stored vectors without the network. The server only reads the store, never writes it: an upload
  cannot grow the cache or take a feature set's lock away from `extract`. Part files are immutable,
  so they stay open; the set's folder is re-listed at most every REFRESH_S seconds to pick up parts
  that `extract` or `predict` add meanwhile.
- No request names a path: images come in the body only. Bodies over `max_body` bytes and images over
  `max_pixels` are refused; every error is JSON `{"error": "..."}` with a 4xx status (5xx only for a
  server fault), one line naming the image.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import images as imagelib
from .errors import FeatureCacheError
from .predict import label_rows, run_spec
from .store import FeatureStore

REFRESH_S = 2.0
MAX_IMAGES = 256  # per request; bounds the work one request can queue
HOW = "send multipart/form-data with one field `files` per image, or JSON {\"images\": [{\"name\": ..., " \
      "\"data\": \"<base64>\"}]}"
_ENV = "FEATURECACHE_SERVE"  # how --workers processes receive their options


@dataclass(frozen=True)
class ServeOptions:
    run_id: str
    cache_dir: str
    max_batch: int = 32
    max_wait_ms: float = 2.0
    max_body: int = 20 << 20
    max_pixels: int = 4096 * 4096
    engine: str = "auto"  # what runs the backbone: auto | tensorflow | onnxruntime | openvino

    def check(self) -> None:
        for name in ("max_batch", "max_body", "max_pixels"):
            if getattr(self, name) < 1:
                raise FeatureCacheError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.max_wait_ms < 0:
            raise FeatureCacheError(f"--max-wait-ms {self.max_wait_ms}: must not be negative")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- cached vectors ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Snapshot:
    names: tuple[str, ...]  # part file names, to notice new parts by listing the folder
    index: dict  # image id -> (part, row)
    features: list  # open h5py datasets, one per part


class StoredVectors:
    """Read-only view of the run's feature set: the vectors of images already in the cache."""

    def __init__(self, store: FeatureStore, set_id: str):
        self._store, self.set_id = store, set_id
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._snap = self._read()

    def __len__(self) -> int:
        return len(self._snap.index)

    def _listing(self) -> tuple[str, ...]:
        fs = self._store.get(self.set_id)
        return tuple(p.name for p in fs.part_files()) if fs else ()

    def _read(self) -> _Snapshot:
        fs = self._store.get(self.set_id)
        if fs is None:
            return _Snapshot((), {}, [])
        parts = fs.parts()
        # The store's own opener: same checks, and the same HDF5 open flags, which HDF5 insists on
        # for a file this process already holds open.
        return _Snapshot(tuple(p.path.name for p in parts), fs.index(),
                         [fs.open_part(p.path)["features"] for p in parts])

    def _maybe_refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < REFRESH_S or not self._lock.acquire(blocking=False):
            return
        try:
            self._checked = now
            if self._listing() != self._snap.names:
                self._snap = self._read()  # old handles close when the last reader drops them
        except (FeatureCacheError, OSError) as e:
            _log(f"warning: feature set {self.set_id} not re-read ({e}); serving the previous index")
        finally:
            self._lock.release()

    def lookup(self, ids: list[str]) -> dict[int, np.ndarray]:
        """{position in ids: stored vector} for the ids the set holds."""
        self._maybe_refresh()
        snap = self._snap
        found = {k: snap.index[i] for k, i in enumerate(ids) if i in snap.index}
        # One row per read: a server request wants a few rows, not the whole part `gather` reads.
        return {k: snap.features[p][r] for k, (p, r) in found.items()}


# ---- micro-batching -----------------------------------------------------------------------------------
class Batcher:
    """Runs items from concurrent requests through `run_batch` together, in one worker thread."""

    def __init__(self, run_batch, max_batch: int, max_wait_s: float):
        self._run_batch, self.max_batch, self.max_wait_s = run_batch, max_batch, max_wait_s
        self._pending: deque = deque()  # (enqueued at, item, future); touched only on the event loop
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._task.cancel()
        self._executor.shutdown(wait=True)

    async def submit(self, items: list) -> list:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        now = loop.time()
        self._pending.extend((now, item, f) for item, f in zip(items, futures))
        self._arrived.set()
        return await asyncio.gather(*futures)

    async def _next_batch(self) -> list:
        loop = asyncio.get_running_loop()
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._pending[0][0] + self.max_wait_s
        while len(self._pending) < self.max_batch and (left := deadline - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
                break
        return [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [entry for entry in await self._next_batch() if not entry[2].done()]
            if not batch:
                continue
            try:
                out = await loop.run_in_executor(self._executor, self._run_batch, [item for _, item, _ in batch])
            except Exception as e:  # these requests fail (500); the server goes on
                for _, _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, _, f), result in zip(batch, out):
                if not f.done():
                    f.set_result(result)


# ---- the model and head -------------------------------------------------------------------------------
@dataclass
class Prepared:
    """One request's images: ids, rows of those the cache holds, decoded pixels of the others."""
    names: list[str]
    ids: list[str]
    rows: dict[int, dict]
    pixels: dict[int, np.ndarray]


class Service:
    """A run's backbone, head and feature set, loaded once."""

    def __init__(self, opts: ServeOptions):
        from .backbones.build import build_model
        from .engines import choose
        from .extract import forward_fn, resolve
        from .runs import load_head

        opts.check()
        self.opts = opts
        cache = Path(opts.cache_dir)
        self.record, self.pipeline = load_head(cache, opts.run_id)
        self.layer = self.record["layer"]
        self.res = resolve(run_spec(self.record), None, cache)
        choose(opts.engine, self.res.precision)  # a bad --engine fails before the model is built
        t0 = time.perf_counter()
        self.engine, self._forward = forward_fn(build_model(self.res.backbone, self.res.weights, self.res.size),
                                                [self.layer], engine=opts.engine, res=self.res, cache_dir=cache,
                                                log=_log)
        blank = np.zeros((opts.max_batch, self.res.size, self.res.size, 3), np.uint8)
        self.compute(blank[:1])  # two batch sizes: tf.function then settles on one trace for any size
        self.compute(blank)
        self.stored = StoredVectors(FeatureStore(cache), self.res.set_ids[self.layer])
        _log(f"run {opts.run_id}: {self.record['features']} + {self.record['head']} loaded on {self.engine} and "
             f"warmed up in "
             f"{time.perf_counter() - t0:.1f} s; {len(self.stored)} images in feature set {self.stored.set_id}")

    def compute(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, size, size, 3) -> (N, D) vectors, exactly as extraction makes them."""
        from .backbones import preprocess
        from .taps import pool_maps

        maps = self._forward(preprocess(pixels, self.res.preprocess_mode))[0]
        return pool_maps(np.asarray(maps), self.res.pool)

    def prepare(self, named: list[tuple[str, bytes]], top: int) -> Prepared:
        """Hash every image and label those in the cache; decode the others (a bad one fails the request)."""
        names = [n for n, _ in named]
        ids = [imagelib.content_hash(data) for _, data in named]
        stored = self.stored.lookup(ids)
        hits = sorted(stored)
        rows = dict(zip(hits, self._label([names[k] for k in hits], [stored[k] for k in hits], top)))
        pixels = {k: self.decode(name, data) for k, (name, data) in enumerate(named) if k not in stored}
        return Prepared(names, ids, rows, pixels)

    def decode(self, name: str, data: bytes) -> np.ndarray:
        img = imagelib.open_image(data, name, self.opts.max_pixels)
        return imagelib.resize(imagelib.to_rgb(img), self.res.size, self.res.resize)

    def label_batch(self, items: list[tuple[str, np.ndarray, int]]) -> list[dict]:
        """(name, pixels, top) of new images from several requests -> one forward pass, one head call."""
        names, pixels, tops = zip(*items)
        rows = self._label(list(names), self.compute(np.stack(pixels)), max(tops))
        for row, top in zip(rows, tops):
            row["top"] = row["top"][:top]
        return rows

    def _label(self, names: list[str], vectors, top: int) -> list[dict]:
        if not names:
            return []
        return label_rows(names, self.pipeline, np.asarray(vectors), self.record["class_names"], top)

    def info(self) -> dict:
        r, res = self.record, self.res
        info = {"run": r["run_id"], "backbone": res.backbone.name, "weights": res.weights.label, "engine": self.engine,
                "precision": res.precision,
                "layer": self.layer, "pooling": res.pool, "size": res.size, "resize": res.resize,
                "preprocess": res.preprocess_mode, "head": r["head"], "head_options": r.get("head_options", {}),
                "normalize": r.get("normalize"), "pca": r.get("pca"), "class_names": r["class_names"],
                "feature_set": {"id": self.stored.set_id, "key": res.keys[self.layer],
                                "stored_images": len(self.stored)},
                "metrics": r["metrics"], "data": r.get("data"), "created": r.get("created"),
                "limits": {k: v for k, v in dataclasses.asdict(self.opts).items() if k.startswith("max_")}}
        if self.stored.set_id != r.get("feature_set"):
            info["notice"] = (f"the run was fitted on feature set {r.get('feature_set')}; these library versions "
                              f"key it as {self.stored.set_id}, so its training images are not cache hits")
        return info


# ---- HTTP ---------------------------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware refusing bodies over `max_body` bytes, declared or streamed, before they pile up."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            return await _error(413, self._message())(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise _TooLarge(self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"request body over the limit of {self.max_body:,} bytes; send fewer or smaller images"


class _TooLarge(Exception):
    pass


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def read_images(request) -> list[tuple[str, bytes]]:
    """(name, bytes) of every image in the body; names are labels for the reply, never paths."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.headers.get("content-length") == "0":
        raise HTTPException(400, f"empty request body; {HOW}")
    if kind == "multipart/form-data":
        named = await _from_form(request)
    elif kind == "application/json":
        named = _from_json(await request.body())
    elif not await request.body():
        raise HTTPException(400, f"empty request body; {HOW}")
    else:
        raise HTTPException(415, f"content type {kind or '(none)'!r} not accepted; {HOW}")
    if not named:
        raise HTTPException(400, f"no images in the request; {HOW}")
    return named


async def _from_form(request) -> list[tuple[str, bytes]]:
    async with request.form(max_files=MAX_IMAGES, max_fields=MAX_IMAGES) as form:
        if "files" not in form:
            got = ", ".join(sorted(set(form.keys()))) or "none"
            raise HTTPException(400, f"no field `files` in the form (fields: {got}); {HOW}")
        named = []
        for k, item in enumerate(form.getlist("files")):
            if not isinstance(item, UploadFile):
                raise HTTPException(400, f"files[{k}]: field `files` must be a file upload, not text")
            named.append((item.filename or f"files[{k}]", await item.read()))
    return named


def _from_json(body: bytes) -> list[tuple[str, bytes]]:
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise HTTPException(400, f"body is not valid JSON ({e}); {HOW}") from None
    items = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise HTTPException(400, f"JSON body has no list `images`; {HOW}")
    if len(items) > MAX_IMAGES:
        raise HTTPException(413, f"{len(items)} images in one request, over the limit of {MAX_IMAGES}")
    named = []
    for k, item in enumerate(items):
        item = item if isinstance(item, dict) else {}
        name = item.get("name") if isinstance(item.get("name"), str) else None
        name = name or f"images[{k}]"
        if not isinstance(item.get("data"), str):
            raise HTTPException(400, f"{name}: missing string `data` (the image file's bytes in base64)")
        try:
            named.append((name, base64.b64decode(item["data"], validate=True)))
        except binascii.Error:
            raise HTTPException(400, f"{name}: `data` is not valid base64") from None
    return named


_JSON_BODY = {"type": "object", "required": ["images"], "properties": {"images": {
    "type": "array", "minItems": 1, "maxItems": MAX_IMAGES, "items": {
        "type": "object", "required": ["data"], "properties": {
            "name": {"type": "string", "description": "echoed back as `file`; never used as a path"},
            "data": {"type": "string", "format": "byte", "description": "the image file's bytes, base64"}}}}}}
_FORM_BODY = {"type": "object", "required": ["files"], "properties": {
    "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}


class Top(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    file: str
    hash: str
    label: str
    score: float
    score_kind: str
    top: list[Top]
    cached: bool


class Predictions(BaseModel):
    run: str
    predictions: list[Prediction]


class Error(BaseModel):
    error: str


def create_app(service: Service) -> FastAPI:
    batcher = Batcher(service.label_batch, service.opts.max_batch, service.opts.max_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="featurecache", version="0.1.0", lifespan=lifespan,
                  description=f"Predictions of run {service.opts.run_id}: {service.record['features']} "
                              f"+ {service.record['head']}.")
    app.add_middleware(BodyLimit, max_body=service.opts.max_body)
    _error_handlers(app)
    errors = {code: {"model": Error} for code in (400, 413, 415, 422)}

    @app.post("/predict", response_model=None, responses={200: {"model": Predictions}, **errors},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "multipart/form-data": {"schema": _FORM_BODY}, "application/json": {"schema": _JSON_BODY}}}})
    async def predict(request: Request, top: int = Query(1, ge=1, le=1000, description="Also list the K best")):
        """Label one or several images: label, score (probability or decision), top-k and content hash."""
        named = await read_images(request)
        try:
            p = await run_in_threadpool(service.prepare, named, top)
        except FeatureCacheError as e:
            raise HTTPException(422, str(e)) from None
        misses = sorted(p.pixels)
        p.rows.update(zip(misses, await batcher.submit([(p.names[k], p.pixels[k], top) for k in misses])))
        rows = [dict(p.rows[k], hash=p.ids[k], cached=k not in p.pixels) for k in range(len(p.ids))]
        return JSONResponse({"run": service.opts.run_id, "predictions": rows})

    @app.get("/health")
    async def health():
        return {"status": "ok", "run": service.opts.run_id}

    @app.get("/info")
    async def info():
        return service.info()

    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error is {"error": one line}: the framework's own (404, 405, bad query) as well as ours."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, e: RequestValidationError):
        first = e.errors()[0]
        return _error(422, f"{'.'.join(map(str, first['loc']))}: {first['msg']}")

    @app.exception_handler(_TooLarge)
    async def too_large(_request, e: _TooLarge):
        return _error(413, str(e))

    @app.exception_handler(Exception)
    async def fault(_request, e: Exception):  # uvicorn logs the traceback
        return _error(500, f"internal error ({type(e).__name__}); the server goes on")


# ---- entry points ---------------------------------------------------------------------------------
def app_from_env():
    """uvicorn's factory in each --workers process: options come through the environment."""
    return create_app(Service(ServeOptions(**json.loads(os.environ[_ENV]))))


def serve(opts: ServeOptions, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    import uvicorn

    if workers < 1:
        raise FeatureCacheError(f"--workers {workers}: must be at least 1")
    _log(f"loading run {opts.run_id}, then serving it on http://{host}:{port} (OpenAPI at /docs); Ctrl-C stops")
    if workers == 1:
        uvicorn.run(create_app(Service(opts)), host=host, port=port, access_log=False)
        return
    from .runs import load_head

    opts.check()
    load_head(Path(opts.cache_dir), opts.run_id)  # a bad run fails here with one line, not in N workers
    os.environ[_ENV] = json.dumps(dataclasses.asdict(opts))
    uvicorn.run("featurecache.serve:app_from_env", factory=True, host=host, port=port, workers=workers,
                access_log=False)
