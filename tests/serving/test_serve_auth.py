"""`featurecache serve` with a token and several runs: the lock, `?run=`, `/embed` and `/sets`, spoken to
over HTTP on a real server process; and the start-up refusals, which need no server."""

import io
import json
import os
import sys

import httpx
import numpy as np
import pytest

from conftest import FEATS, ROOT, digit_project, error_line, fit_run, run_child, run_cli, serving
from featurecache.encoding.images import content_hash
from featurecache.store.sets import FeatureStore
from test_serve import png_bytes

TOKEN = "test-token-1234"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def fit(data, cache, *args) -> str:
    return fit_run("--data", data, *FEATS, *args, "--extract", cache=cache)["run_id"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Three runs behind one token: logreg and linsvc on one feature set, logreg on another layer's."""
    root = tmp_path_factory.mktemp("serve-auth")
    data, new_files, cache = digit_project(root, 2)
    runs = [fit(data, cache, "--head", "logreg"), fit(data, cache, "--head", "linsvc"),
            fit(data, cache, "--head", "logreg", "--layer", "block4_pool")]
    # the token from the environment
    with serving([a for r in runs for a in ("--run", r)], cache, root / "server.log",
                 env={"FEATURECACHE_TOKEN": TOKEN}) as url:
        yield {"url": url, "runs": runs, "data": data, "new": new_files, "cache": cache, "log": root / "server.log"}


def post(server, path, paths, headers=AUTH, **params):
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    return httpx.post(f"{server['url']}{path}", params=params, files=files, headers=headers, timeout=60)


def set_of(server, run_id) -> str:
    return json.loads((server["cache"] / "runs" / run_id / "run.json").read_text())["feature_set"]


# ---- the lock -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                                     {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": TOKEN}])
@pytest.mark.parametrize("method, path", [("POST", "/predict"), ("POST", "/embed"), ("GET", "/info"),
                                          ("GET", "/runs"), ("GET", "/sets"), ("GET", "/openapi.json"),
                                          ("GET", "/no-such-path")])
def test_without_the_token_every_api_path_is_401_and_says_nothing_else(server, headers, method, path):
    files = {"files": ("x.png", png_bytes(np.zeros((8, 8), np.uint8)), "image/png")} if method == "POST" else None
    r = httpx.request(method, f"{server['url']}{path}", headers=headers, files=files, timeout=30)
    assert r.status_code == 401
    assert r.json() == {"error": "missing or wrong token; send the header `Authorization: Bearer <token>`"}
    assert r.headers["www-authenticate"] == "Bearer"


def test_with_the_token_predict_is_200_and_health_and_page_stay_open(server):
    image = sorted((server["data"] / "digit1").iterdir())[:1]
    assert post(server, "/predict", image, headers={}).status_code == 401
    r = post(server, "/predict", image)
    assert r.status_code == 200 and r.json()["predictions"][0]["label"].startswith("digit")
    assert httpx.get(f"{server['url']}/health").json() == {"status": "ok"}  # no run id for strangers
    page = httpx.get(f"{server['url']}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/static/app.js" in page.text
    assert httpx.get(f"{server['url']}/static/app.js").status_code == 200


# ---- several runs -----------------------------------------------------------------------------------------
def test_runs_share_an_encoder_per_feature_set_and_run_picks_one(server):
    first, second, third = server["runs"]
    listed = httpx.get(f"{server['url']}/runs", headers=AUTH).json()["runs"]
    assert [(r["run"], r["default"], r["head"]) for r in listed] == \
           [(first, True, "logreg"), (second, False, "linsvc"), (third, False, "logreg")]
    assert listed[0]["set"] == listed[1]["set"] == set_of(server, first) != listed[2]["set"]
    assert len({r["method"] for r in listed}) == 3 and "+ linsvc" in listed[1]["method"]  # each run's settings
    log = server["log"].read_text()
    assert log.count("warmed up") == 2  # two feature sets, two encoders: the linsvc run borrowed one
    assert f"head on the encoder and feature set {listed[0]['set']} of run {first} (loaded once)" in log

    paths = server["new"][:2]
    assert post(server, "/predict", paths).json()["run"] == first
    for run_id in (second, third):
        r = post(server, "/predict", paths, run=run_id, top=3)
        assert r.status_code == 200 and r.json()["run"] == run_id
        want = run_cli("predict", "--run", run_id, *paths, "--format", "json", "--top", 3,
                       cache_dir=server["cache"], check=True).stdout
        assert [p["label"] for p in r.json()["predictions"]] == [w["label"] for w in json.loads(want)]
    assert httpx.get(f"{server['url']}/info", params={"run": second}, headers=AUTH).json()["head"] == "linsvc"


@pytest.mark.parametrize("path", ["/predict", "/embed", "/info"])
def test_an_unknown_run_is_404_naming_the_served_ones(server, path):
    image = server["new"][:1]
    r = (post(server, path, image, run="no-such-run") if path != "/info" else
         httpx.get(f"{server['url']}{path}", params={"run": "no-such-run"}, headers=AUTH))
    assert r.status_code == 404
    error = r.json()["error"]
    assert "'no-such-run' is not served here" in error and all(run_id in error for run_id in server["runs"])


# ---- embeddings -------------------------------------------------------------------------------------------
def test_embed_returns_the_stored_vectors_of_cached_images_as_json_and_npy(server):
    first, _, third = server["runs"]
    paths = sorted((server["data"] / "digit2").iterdir())[:3] + sorted((server["data"] / "digit0").iterdir())[:2]
    ids = [content_hash(p.read_bytes()) for p in paths]
    for run_id in (first, third):
        stored = FeatureStore(server["cache"]).get(set_of(server, run_id)).gather(ids)
        r = post(server, "/embed", paths, run=run_id)
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["set"], body["dims"]) == (set_of(server, run_id), stored.shape[1])
        assert [(e["file"], e["hash"], e["cached"]) for e in body["embeddings"]] == \
               [(p.name, i, True) for p, i in zip(paths, ids)]
        # README: "straight from the store, bit for bit": JSON's numbers read back as float32 are the stored ones.
        assert stored.dtype == np.float32
        assert np.array_equal(np.array([e["vector"] for e in body["embeddings"]], np.float32), stored)

        r = post(server, "/embed", paths, headers={**AUTH, "Accept": "application/x-npy"}, set=set_of(server, run_id))
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
        assert r.headers["x-featurecache-set"] == set_of(server, run_id) and r.headers["x-featurecache-cached"] == "11111"
        matrix = np.load(io.BytesIO(r.content), allow_pickle=False)
        assert matrix.dtype == np.float32 and matrix.shape == stored.shape
        assert np.array_equal(matrix, stored)  # bit for bit


def test_embed_computes_new_images_as_extraction_would(server):
    paths = server["new"][2:4]  # not yet stored by any other test's CLI predict
    first = server["runs"][0]
    r = post(server, "/embed", paths, headers={**AUTH, "Accept": "application/x-npy"})
    assert r.headers["x-featurecache-cached"] == "00"
    computed = np.load(io.BytesIO(r.content))
    run_cli("predict", "--run", first, *paths, cache_dir=server["cache"], check=True)  # stores their vectors
    stored = FeatureStore(server["cache"]).get(set_of(server, first)).gather([content_hash(p.read_bytes())
                                                                                for p in paths])
    np.testing.assert_allclose(computed, stored, atol=1e-4 * np.abs(stored).max(), rtol=0)


def test_sets_lists_the_stored_sets_and_embed_refuses_a_set_the_run_does_not_have(server):
    first, second, third = server["runs"]
    sets = httpx.get(f"{server['url']}/sets", headers=AUTH).json()["sets"]
    by_id = {s["set"]: s for s in sets}
    assert by_id[set_of(server, first)]["runs"] == [first, second]
    assert by_id[set_of(server, third)]["key"]["layer"] == "block4_pool" and all(s["served"] for s in sets)
    assert by_id[set_of(server, first)]["images"] >= 36

    image = server["new"][:1]
    r = post(server, "/embed", image, run=first, set=set_of(server, third))
    assert r.status_code == 404 and f"run {first} does not have feature set {set_of(server, third)}" in r.json()["error"]
    r = post(server, "/embed", image, set="0123456789abcdef")
    assert r.status_code == 404 and "feature set '0123456789abcdef' is not served here" in r.json()["error"]
    r = post(server, "/embed", image, set=set_of(server, third)[:6])  # a unique prefix will do
    assert r.status_code == 200 and r.json()["set"] == set_of(server, third)


def test_embed_of_a_non_image_is_one_line_422(server):
    r = httpx.post(f"{server['url']}/embed", headers=AUTH, files={"files": ("notes.png", b"not an image", "image/png")})
    assert r.status_code == 422 and r.json()["error"].startswith("notes.png: not a readable image")


# ---- start-up refusals (no server) -------------------------------------------------------------------------
def serve_cli(tmp_path, *args, token=None):
    env = {k: v for k, v in os.environ.items() if k != "FEATURECACHE_TOKEN"}
    if token is not None:
        env["FEATURECACHE_TOKEN"] = token
    env["FEATURECACHE_DIR"] = str(tmp_path)
    return run_child([sys.executable, "-m", "featurecache.cli", "serve", *args], timeout=120, env=env, cwd=ROOT)


@pytest.mark.parametrize("args, token, words", [
    (["--run", "r", "--host", "0.0.0.0"], None,
     "--host 0.0.0.0 exposes the service to the network, so it needs a token: pass --token T or set "
     "FEATURECACHE_TOKEN=T"),
    (["--run", "r", "--host", "192.168.1.5"], None, "needs a token"),
    (["--run", "r", "--host", "0.0.0.0", "--token", " "], None, "--token (or FEATURECACHE_TOKEN) is empty"),
    (["--run", "r", "--token", "t", "--no-auth"], None, "--token and --no-auth contradict each other"),
    ([], None, "give --run ID (repeatable) or --all-runs"),
    (["--run", "r", "--all-runs"], None, "--run and --all-runs contradict each other"),
    (["--all-runs"], None, "--all-runs: no runs in"),
    # Past the lock (a token from the environment; --no-auth), the run itself is what fails.
    (["--run", "no-such-run", "--host", "0.0.0.0"], "from-env", "--run no-such-run: no such run"),
    (["--run", "no-such-run", "--host", "0.0.0.0", "--no-auth"], None, "--run no-such-run: no such run"),
])
def test_serve_refuses_to_start_in_one_line(tmp_path, args, token, words):
    proc = serve_cli(tmp_path, *args, token=token)
    assert proc.returncode == 2 and words in error_line(proc), proc.stderr
    if "--no-auth" in args and "0.0.0.0" in args:
        assert "warning: --no-auth: the service on 0.0.0.0 is open to anyone who can reach the port" in proc.stderr


# ---- in-process pieces ------------------------------------------------------------------------------------
@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True),
                                            ("::1", True), ("[::1]", True), ("0.0.0.0", False), ("::", False),
                                            ("192.168.1.5", False), ("myhost.example", False)])
def test_only_loopback_counts_as_closed(host, loopback):
    from featurecache.serving.auth import is_loopback

    assert is_loopback(host) is loopback


def test_all_runs_serves_the_newest_first(tmp_path):
    from featurecache.serving.fleet import all_run_ids

    for run_id, created in [("b", "2026-11-02T10:00:00"), ("a", "2026-11-03T09:00:00"), ("c", "2026-11-01T00:00:00")]:
        (tmp_path / "runs" / run_id).mkdir(parents=True)
        (tmp_path / "runs" / run_id / "run.json").write_text(json.dumps({"created": created}))
    assert all_run_ids(tmp_path) == ["a", "b", "c"]
