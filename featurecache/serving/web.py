"""The service's routes beyond /predict: the page, the embeddings, and listings of runs and sets.

    GET  /                  the page (featurecache/serving/static/: plain HTML, CSS and JavaScript, no build
                            step, nothing fetched from elsewhere, so it works offline)
    GET  /runs              the served runs, the default first
    GET  /sets              every feature set in the cache; `served` ones can be embedded with
    POST /embed[?run=ID | ?set=ID]   the images' vectors (same bodies as /predict)

/embed answers with the run's feature set (default: the default run's), or with `set`, one of the
served sets (a unique prefix will do). Images whose content hash the set already holds are answered
with the stored vectors, bit for bit; the others go through the same encoder and micro-batch queue
as /predict (the server never writes the store, so they stay uncached). Two answer formats:
- JSON (the default): {"run", "set", "dims", "embeddings": [{"file", "hash", "cached", "vector"}]},
  refused with 406 over MAX_JSON_FLOATS numbers (about 20 MB of text);
- `Accept: application/x-npy`: the bytes of `numpy.save` of a float32 (images, dims) array, rows in
  the order the images were posted; headers X-Featurecache-Set (the set id), X-Featurecache-Run, and
  X-Featurecache-Cached (one character per row, "1" answered from the store, "0" computed). Row ids
  are not repeated in headers (256 of them would overflow common proxies' header buffers): an image's
  id is the BLAKE2b-128 of its bytes, `featurecache.encoding.images.content_hash(data)`, as in the JSON form.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ..errors import FeatureCacheError
from .fleet import Fleet, NotServed
from .service import http_status

STATIC = Path(__file__).parent / "static"
NPY = "application/x-npy"
MAX_JSON_FLOATS = 1 << 20  # ~20 MB of JSON text; binary answers have no such limit but the body's


def wants_npy(request: Request) -> bool:
    return NPY in request.headers.get("accept", "").lower()


def npy_bytes(matrix: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, matrix, allow_pickle=False)
    return buf.getvalue()


def add_routes(app: FastAPI, fleet: Fleet, submit, read_images, errors: dict, body: dict) -> None:
    """`submit(set_id, items)`: the set's micro-batch queue; `read_images(request)` and `body` (its
    OpenAPI requestBody): /predict's body parser, so /embed takes exactly the same bodies and limits."""

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/runs")
    async def runs():
        """The served runs, the default first, with their features, head, test accuracy and set."""
        return {"runs": fleet.run_list()}

    @app.get("/sets")
    async def sets():
        """Every feature set in the cache: key, dims, and whether this server embeds with it (`served`)."""
        return {"sets": await run_in_threadpool(fleet.stored_sets)}

    @app.post("/embed", response_model=None, responses={
        200: {"content": {"application/json": {}, NPY: {}},
              "description": "JSON, or with `Accept: application/x-npy` numpy.save bytes of float32 (n, dims)"},
        404: errors[422], 406: errors[422], **errors}, openapi_extra={"requestBody": body})
    async def embed(request: Request, run: str | None = Query(None, description="A served run's feature set"),
                    set_id: str | None = Query(None, alias="set", description="A served feature set (id or prefix)")):
        """The vectors of one or several images: stored ones where the set holds the image, computed
        otherwise. JSON, or `Accept: application/x-npy` for numpy.save bytes (rows in posted order)."""
        try:
            svc = fleet.set_for(run, set_id)
        except NotServed as e:
            raise HTTPException(404, str(e)) from None
        named = await read_images(request)
        try:
            found = await run_in_threadpool(svc.look_up, named)
        except FeatureCacheError as e:
            raise HTTPException(http_status(e), str(e)) from None
        ids, stored, pixels = found.ids, found.stored, found.pixels
        misses = sorted(pixels)
        computed = await submit(svc.stored.set_id, [(None, named[k][0], pixels.pop(k), 1) for k in misses])
        vectors = {**stored, **dict(zip(misses, computed))}
        vectors.update({k: vectors[first] for k, first in found.same.items()})  # repeats: computed once
        matrix = np.stack([np.asarray(vectors[k], np.float32) for k in range(len(named))])
        cached = "".join("1" if k in stored else "0" for k in range(len(named)))
        run_id = run or fleet.runs_on(svc.stored.set_id)[0]
        if wants_npy(request):
            return Response(npy_bytes(matrix), media_type=NPY, headers={
                "X-Featurecache-Set": svc.stored.set_id, "X-Featurecache-Run": run_id,
                "X-Featurecache-Cached": cached})
        if matrix.size > MAX_JSON_FLOATS:
            raise HTTPException(406, f"{matrix.shape[0]} vectors of {matrix.shape[1]:,} floats are too many for "
                                     f"JSON (limit {MAX_JSON_FLOATS:,} numbers); send `Accept: {NPY}` or fewer "
                                     f"images")
        rows = [{"file": name, "hash": ids[k], "cached": cached[k] == "1", "vector": matrix[k].tolist()}
                for k, (name, _) in enumerate(named)]
        return JSONResponse({"run": run_id, "set": svc.stored.set_id, "dims": int(matrix.shape[1]),
                             "embeddings": rows})
