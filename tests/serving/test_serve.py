"""`featurecache serve` end to end: a real server process on a free port, spoken to over HTTP."""

import base64
import io
import json
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import FEATS, digit_project, error_line, fit_run, run_cli, serving
from featurecache.encoding.images import content_hash

MAX_PIXELS = 10_000
MAX_BODY_MB = 0.5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A logreg run on real digit PNGs (3 classes), served with small limits; 9 more digits not in the cache."""
    root = tmp_path_factory.mktemp("serve")
    data, new_files, cache = digit_project(root, 3)
    run_id = fit_run("--data", data, *FEATS, "--head", "logreg", "--extract", cache=cache)["run_id"]
    with serving(["--run", run_id, "--max-pixels", MAX_PIXELS, "--max-body-mb", MAX_BODY_MB,
                  "--max-wait-ms", "50"],  # room for concurrent requests to meet in one batch
                 cache, root / "server.log") as url:
        yield {"url": url, "run": run_id, "data": data, "new": new_files, "cache": cache}


def post_files(url, paths, top=1):
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    return httpx.post(f"{url}/predict", params={"top": top}, files=files, timeout=60)


def cli_predict(server, paths, top):
    out = run_cli("predict", "--run", server["run"], *paths, "--format", "json", "--top", top,
                  cache_dir=server["cache"], check=True).stdout
    return json.loads(out)


def png_bytes(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_labels_match_cli_predict_for_cached_and_new_images(server):
    cached = sorted((server["data"] / "digit1").iterdir())[:3]
    paths = cached + server["new"]
    r = post_files(server["url"], paths, top=2)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["run"] == server["run"]
    rows = got["predictions"]
    assert [row["file"] for row in rows] == [p.name for p in paths]
    assert [row["hash"] for row in rows] == [content_hash(p.read_bytes()) for p in paths]
    assert [row["cached"] for row in rows] == [True] * len(cached) + [False] * len(server["new"])

    # The CLI computes (and stores) the new images' features itself: the same labels and scores.
    want = cli_predict(server, paths, top=2)
    assert [row["label"] for row in rows] == [w["label"] for w in want]
    assert [[t["label"] for t in row["top"]] for row in rows] == [[t["label"] for t in w["top"]] for w in want]
    assert np.allclose([row["score"] for row in rows], [w["score"] for w in want], atol=1e-4)
    assert {row["score_kind"] for row in rows} == {w["score_kind"] for w in want} == {"probability"}

    # The server notices the parts `predict` just stored and answers those images from the cache now.
    deadline = time.monotonic() + 15
    while not all(row["cached"] for row in rows) and time.monotonic() < deadline:
        time.sleep(0.5)
        rows = post_files(server["url"], paths, top=2).json()["predictions"]
    assert all(row["cached"] for row in rows)
    assert [row["label"] for row in rows] == [w["label"] for w in want]


def test_json_body_gives_the_multipart_answer_and_names_are_never_paths(server):
    paths = server["new"][:2]
    multipart = post_files(server["url"], paths).json()["predictions"]
    body = {"images": [{"name": "/etc/passwd", "data": base64.b64encode(paths[0].read_bytes()).decode()},
                       {"data": base64.b64encode(paths[1].read_bytes()).decode()}]}
    r = httpx.post(f"{server['url']}/predict", json=body, timeout=60)
    assert r.status_code == 200, r.text
    rows = r.json()["predictions"]
    assert [row["file"] for row in rows] == ["/etc/passwd", "images[1]"]  # only echoed, never opened
    assert [(row["label"], row["hash"]) for row in rows] == [(m["label"], m["hash"]) for m in multipart]


def test_concurrent_requests_are_batched_and_answered_alike(server):
    rng = np.random.default_rng(1)
    noise = [png_bytes(rng.integers(0, 256, (8, 8), dtype=np.uint8)) for _ in range(12)]  # never cached

    def one(data):
        r = httpx.post(f"{server['url']}/predict", files={"files": ("noise.png", data, "image/png")}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["predictions"][0]

    before = httpx.get(f"{server['url']}/info").json()["encoder"]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(one, noise))
    after = httpx.get(f"{server['url']}/info").json()["encoder"]
    alone = [one(data) for data in noise[:3]]
    assert not any(row["cached"] for row in together)
    assert after["images_encoded"] - before["images_encoded"] == 12
    assert after["forward_passes"] - before["forward_passes"] < 12  # some requests shared a forward pass
    assert [row["label"] for row in together[:3]] == [row["label"] for row in alone]


def test_health_info_and_openapi(server):
    assert httpx.get(f"{server['url']}/health").json() == {"status": "ok", "run": server["run"]}
    info = httpx.get(f"{server['url']}/info").json()
    record = json.loads((server["cache"] / "runs" / server["run"] / "run.json").read_text())
    assert (info["backbone"], info["layer"], info["pooling"], info["size"], info["head"]) == \
           ("vgg16", record["layer"], "flatten", 32, "logreg")
    assert info["class_names"] == ["digit0", "digit1", "digit2"]
    assert info["feature_set"]["id"] == record["feature_set"] and info["feature_set"]["key"]["model"] == "vgg16"
    assert info["metrics"]["test_accuracy"] == record["metrics"]["test_accuracy"]
    assert info["limits"]["max_pixels"] == MAX_PIXELS
    from featurecache.runs import record as runs

    run = runs.load(server["cache"], server["run"])
    # As `report` gives it, with the dataset named rather than located (the server keeps its paths to itself).
    assert info["method"] == run.describe().replace(run.data, Path(run.data).name)
    body = httpx.get(f"{server['url']}/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]
    assert set(body["content"]) == {"multipart/form-data", "application/json"}


def truncated_png() -> bytes:
    data = png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return data[:len(data) // 2]


def chunks(total: int):
    for _ in range(total // 65536):
        yield b"\0" * 65536


BIG = int(MAX_BODY_MB * (1 << 20)) + 100_000
ERRORS = {
    "empty body": (dict(content=b""), 400, "empty request body"),
    "empty multipart": (dict(content=b"--b--\r\n", headers={"content-type": "multipart/form-data; boundary=b"}),
                        400, "no field `files` in the form (fields: none)"),
    "non-image": (dict(files={"files": ("notes.png", b"not an image", "image/png")}), 422,
                  "notes.png: not a readable image"),
    "truncated image": (dict(files={"files": ("cut.png", truncated_png(), "image/png")}), 422,
                        "cut.png: damaged image"),
    "over the pixel limit": (dict(files={"files": ("wide.png", png_bytes(np.zeros((50, 201), np.uint8)),
                                                   "image/png")}), 422, "wide.png: declares 201x50 pixels"),
    "over the size limit": (dict(files={"files": ("big.png", b"\0" * BIG, "image/png")}), 413, "over the limit"),
    "over the size limit, streamed": (dict(content=chunks(BIG + 65536), headers={"content-type": "image/png"}),
                                      413, "over the limit"),
    "wrong field name": (dict(files={"file": ("a.png", png_bytes(np.zeros((8, 8), np.uint8)), "image/png")}),
                         400, "no field `files` in the form (fields: file)"),
    "text in files": (dict(data={"files": "hello"}, files={"other": ("a.png", b"x", "image/png")}), 400,
                      "must be a file upload"),
    "not JSON": (dict(content=b"{nope", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    "bad base64": (dict(json={"images": [{"name": "x.png", "data": "@@@"}]}), 400, "x.png: `data` is not valid base64"),
    "no images list": (dict(json={"files": []}), 400, "no list `images`"),
    "other content type": (dict(content=b"GIF89a", headers={"content-type": "image/gif"}), 415, "image/gif"),
    "bad top": (dict(params={"top": 0}, files={"files": ("a.png", b"x", "image/png")}), 422, "top"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_requests_get_one_line_json_4xx_and_the_server_goes_on(server, case):
    kwargs, status, words = ERRORS[case]
    r = httpx.post(f"{server['url']}/predict", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error and "\n" not in error
    good = post_files(server["url"], server["new"][:1])
    assert good.status_code == 200 and good.json()["predictions"][0]["label"].startswith("digit")


@pytest.mark.parametrize("args, words", [
    (["--run", "no-such-run"], "--run no-such-run: no such run"),
    (["--run", "x", "--workers", "0"], "--workers 0: must be at least 1"),
])
def test_bad_serve_options_give_one_line(tmp_path, args, words):
    proc = run_cli("serve", *args, cache_dir=tmp_path)
    assert proc.returncode == 2 and words in error_line(proc)
