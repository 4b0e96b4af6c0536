"""Serving: fitted runs behind HTTP (FastAPI + uvicorn).

    POST /predict[?top=K&run=ID]  multipart field `files` (repeatable), or JSON {"images": [{"name", "data"}]}
    POST /embed[?run=ID|set=ID]   the same bodies -> vectors, JSON or numpy (featurecache/serving/web.py)
    GET  /                  a page: the run, and labels for images dropped on it (featurecache/serving/static/)
    GET  /health            {"status": "ok", "run": ...} once the models are loaded (no run id under a token)
    GET  /info[?run=ID]     backbone, weights, layer, pooling, size, head, classes, feature set, metrics
    GET  /runs, /sets       the served runs; the cache's feature sets
    GET  /openapi.json; /docs and /redoc with --docs only (their pages load scripts from a CDN)

Several runs (`--run A --run B`, `--all-runs`): the first is the default, `?run=ID` picks another
(404 naming the served ones); runs on one feature set share its encoder and stored vectors
(featurecache/serving/fleet.py). With a token (featurecache/serving/auth.py, required off loopback) every path but
/health, / and /static/ needs `Authorization: Bearer T`.

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
- No request names a path: images come in the body only. Bodies over `max_body` bytes, images over
  `max_pixels` and requests whose new images would decode to more than `max_request_pixels` are refused
  (featurecache/serving/service.py bounds the decoding); every error is JSON `{"error": "..."}` with a 4xx
  status (5xx only for a server fault), one line naming the image. A client that hangs up mid-request
  costs one log line, not a traceback.
- Without a token, a loopback server answers only requests that name it by a loopback Host and come
  from no other web origin (featurecache/serving/auth.py's LoopbackGuard): a web page cannot drive it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .auth import LoopbackGuard, TokenAuth, is_loopback
from ..errors import FeatureCacheError
from .fleet import Fleet, NotServed, all_run_ids
from .service import (Prepared, ServeOptions, Service, StoredVectors, http_status,  # noqa: F401  (HTTP-free)
                      log)

MAX_IMAGES = 256  # per request; bounds the work one request can queue
HOW = "send multipart/form-data with one field `files` per image, or JSON {\"images\": [{\"name\": ..., " \
      "\"data\": \"<base64>\"}]}"
_ENV = "FEATURECACHE_SERVE"  # how --workers processes receive their options


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
    except RecursionError:  # `[[[[...` thousands deep: the parser runs out of stack, not the server
        raise HTTPException(400, f"JSON body nested too deeply; {HOW}") from None
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


def create_app(fleet: Fleet, token: str | None = None, host: str = "127.0.0.1") -> FastAPI:
    """The app for `fleet`'s runs; `token`: the bearer token every request but the open ones needs;
    `host`: the address bound (a loopback one with no token admits only loopback Host headers)."""
    opts = fleet.opts
    batchers = {set_id: Batcher(fleet.batch_fn(set_id), opts.max_batch, opts.max_wait_ms / 1000)
                for set_id in fleet.sets}  # one forward queue per feature set, shared by its runs

    async def submit(set_id: str, items: list) -> list:
        return await batchers[set_id].submit(items) if items else []

    def served(run_id: str | None) -> Service:
        try:
            return fleet.run(run_id)
        except NotServed as e:
            raise HTTPException(404, str(e)) from None

    @asynccontextmanager
    async def lifespan(_app):
        for b in batchers.values():
            b.start()
        yield
        for b in batchers.values():
            await b.stop()

    first = fleet.run(None)
    app = FastAPI(title="featurecache", version="0.1.0", lifespan=lifespan,
                  description=f"Predictions of run {first.opts.run_id}: {first.run.describe()}"
                              + (f", and {len(fleet.runs) - 1} more runs (`GET /runs`)." if len(fleet.runs) > 1
                                 else "."),
                  docs_url="/docs" if opts.docs else None, redoc_url="/redoc" if opts.docs else None)
    app.add_middleware(BodyLimit, max_body=opts.max_body)
    if token is not None:
        app.add_middleware(TokenAuth, token=token)  # added last, so it runs first: before any body is read
    else:
        app.add_middleware(LoopbackGuard, check_host=is_loopback(host))
    _error_handlers(app)
    errors = {code: {"model": Error} for code in (400, 401, 404, 413, 415, 422)}
    body = {"required": True, "content": {"multipart/form-data": {"schema": _FORM_BODY},
                                          "application/json": {"schema": _JSON_BODY}}}
    run_query = Query(None, description="A served run (`GET /runs`); default: the first one")

    @app.post("/predict", response_model=None, responses={200: {"model": Predictions}, **errors},
              openapi_extra={"requestBody": body})
    async def predict(request: Request, top: int = Query(1, ge=1, le=1000, description="Also list the K best"),
                      run: str | None = run_query):
        """Label one or several images: label, score (probability or decision), top-k and content hash."""
        service = served(run)
        named = await read_images(request)
        try:
            p = await run_in_threadpool(service.prepare, named, top)
        except FeatureCacheError as e:
            raise HTTPException(http_status(e), str(e)) from None
        misses = sorted(p.pixels)
        p.fill(dict(zip(misses, await submit(service.stored.set_id,
                                             [(service, p.names[k], p.pixels.pop(k), top) for k in misses]))))
        rows = [dict(p.rows[k], hash=p.ids[k], cached=p.cached(k)) for k in range(len(p.ids))]
        return JSONResponse({"run": service.opts.run_id, "predictions": rows})

    @app.get("/health")
    async def health():
        # Open even under a token (load balancers ask it), so then it says only that the server is up.
        return {"status": "ok"} if token is not None else {"status": "ok", "run": fleet.default}

    @app.get("/info", responses={404: {"model": Error}})
    async def info(run: str | None = run_query):
        return served(run).info()

    from .web import add_routes

    add_routes(app, fleet, submit, read_images, errors, body)
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

    @app.exception_handler(ClientDisconnect)
    async def gone(request, _e: ClientDisconnect):
        # Nobody is left to read an answer; one line says what happened (the traceback said nothing more).
        log(f"client {request.client.host if request.client else '?'} hung up during {request.method} "
            f"{request.url.path}; request dropped")
        return _error(400, "client disconnected")

    @app.exception_handler(Exception)
    async def fault(_request, e: Exception):  # uvicorn logs the traceback
        return _error(500, f"internal error ({type(e).__name__}); the server goes on")


# ---- entry points ---------------------------------------------------------------------------------
def app_from_env():
    """uvicorn's factory in each --workers process: options come through the environment."""
    given = json.loads(os.environ[_ENV])
    fleet = Fleet(ServeOptions(**given["opts"]), given["runs"], skip_broken=given["all_runs"])
    return create_app(fleet, given["token"], given["host"])


def serve(opts: ServeOptions, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          runs: list[str] | None = None, all_runs: bool = False, token: str | None = None) -> None:
    """Serve `runs` (default: opts.run_id; `all_runs`: every run in the cache, newest first);
    `token`: required from clients (featurecache.serving.auth.token_for decides whether one must be given)."""
    import uvicorn

    if workers < 1:
        raise FeatureCacheError(f"--workers {workers}: must be at least 1")
    runs = all_run_ids(Path(opts.cache_dir)) if all_runs else list(runs or [opts.run_id])
    opts = dataclasses.replace(opts, run_id=runs[0])
    what = f"run {runs[0]}" if len(runs) == 1 else f"{len(runs)} runs ({runs[0]} by default)"
    docs = ("OpenAPI at /docs" if opts.docs else
            "OpenAPI at /openapi.json; --docs turns on /docs and /redoc, whose pages load scripts from a CDN")
    log(f"loading {what}, then serving on http://{host}:{port} (the page at /, {docs}"
        f"{', token required' if token else ''}); Ctrl-C stops")
    if workers == 1:
        uvicorn.run(create_app(Fleet(opts, runs, skip_broken=all_runs), token, host), host=host, port=port,
                    access_log=False)
        return
    from ..runs.record import load_head

    opts.check()
    if not all_runs:
        for run_id in runs:
            load_head(Path(opts.cache_dir), run_id)  # a bad run fails here with one line, not in N workers
    os.environ[_ENV] = json.dumps({"opts": dataclasses.asdict(opts), "runs": runs, "all_runs": all_runs,
                                   "token": token, "host": host})
    uvicorn.run("featurecache.serving.server:app_from_env", factory=True, host=host, port=port, workers=workers,
                access_log=False)
