"""`featurecache serve` against a hostile or careless client (issue 25): decode cost, deep JSON, hang-ups,
DNS rebinding, what /info gives away, /docs' CDN scripts, damaged run records. Real servers on loopback."""

import io
import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from conftest import FEATS, digit_project, error_line, fit_run, run_cli, serving

BIG = 4096  # the largest image the default --max-pixels lets through: a few KB of PNG, 16.8 Mpx decoded


def big_png(shade: int) -> bytes:
    """A flat 4096x4096 PNG: tens of KB on the wire, ~0.2 s of CPU and ~120 MB to decode."""
    buf = io.BytesIO()
    Image.new("RGB", (BIG, BIG), (shade, 255 - shade, 128)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@pytest.fixture(scope="module")
def big():
    return [big_png(40 * k) for k in range(5)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A logreg run on digit PNGs (fitted from an absolute --data path), served with the default limits."""
    root = tmp_path_factory.mktemp("hardening")
    data, new_files, cache = digit_project(root, 2)
    run_id = fit_run("--data", data.resolve(), *FEATS, "--head", "logreg", "--extract", cache=cache)["run_id"]
    log = root / "server.log"
    with serving(["--run", run_id], cache, log) as url:
        yield {"url": url, "run": run_id, "data": data.resolve(), "new": new_files, "cache": cache, "log": log}


def files(named):
    return [("files", (name, data, "image/png")) for name, data in named]


def decoding(url) -> dict:
    return httpx.get(f"{url}/info", timeout=30).json()["decoding"]


# ---- finding 1: decode cost ------------------------------------------------------------------------
def test_a_request_over_the_pixel_budget_gets_one_line_413_before_any_decode(server, big):
    """Red team: five 16 KB PNGs of 4096x4096 in one request (256 were allowed), each ~0.2 s of CPU and
    ~120 MB to decode: `curl -F files=@big0.png ... -F files=@big4.png http://127.0.0.1:8000/predict`."""
    before = decoding(server["url"])
    r = httpx.post(f"{server['url']}/predict", files=files((f"big{k}.png", d) for k, d in enumerate(big)),
                   timeout=60)
    assert r.status_code == 413, r.text
    message = r.json()["error"]
    assert "\n" not in message and "67,108,864" in message and "--max-request-pixels" in message
    assert decoding(server["url"])["images_decoded"] == before["images_decoded"]  # refused from the headers
    # An image over --max-pixels among them is named by its own limit, not lost in the budget's sum.
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")
    r = httpx.post(f"{server['url']}/predict", files=files([(f"big{k}.png", d) for k, d in enumerate(big)]
                                                          + [("huge.png", buf.getvalue())]), timeout=60)
    assert r.status_code == 422 and r.json()["error"].startswith("huge.png: declares 5000x5000 pixels"), r.text
    # Four fit the default budget (64 Mi pixels), and a repeat costs nothing of it.
    r = httpx.post(f"{server['url']}/predict", files=files([(f"big{k}.png", d) for k, d in enumerate(big[:4])]
                                                          + [("again.png", big[0])]), timeout=120)
    assert r.status_code == 200, r.text


def test_identical_uploads_are_decoded_and_computed_once(server):
    """Red team: the same new image 6 times in one request was decoded (and run through the network) 6
    times; now once, and every copy gets the row, under its own name."""
    data = server["new"][0].read_bytes()
    before = httpx.get(f"{server['url']}/info", timeout=30).json()
    r = httpx.post(f"{server['url']}/predict", files=files((f"copy{k}.png", data) for k in range(6)), timeout=60)
    assert r.status_code == 200, r.text
    rows = r.json()["predictions"]
    assert [row["file"] for row in rows] == [f"copy{k}.png" for k in range(6)]
    assert len({(row["label"], row["score"], row["hash"]) for row in rows}) == 1
    assert not any(row["cached"] for row in rows)
    after = httpx.get(f"{server['url']}/info", timeout=30).json()
    assert after["decoding"]["images_decoded"] - before["decoding"]["images_decoded"] == 1
    assert after["decoding"]["repeats_reused"] - before["decoding"]["repeats_reused"] == 5
    assert after["encoder"]["images_encoded"] - before["encoder"]["images_encoded"] == 1  # one row computed

    other = server["new"][1].read_bytes()
    r = httpx.post(f"{server['url']}/embed", files=files((f"e{k}.png", other) for k in range(3)), timeout=60)
    vectors = [e["vector"] for e in r.json()["embeddings"]]
    assert r.status_code == 200 and vectors[0] == vectors[1] == vectors[2]
    assert decoding(server["url"])["images_decoded"] - after["decoding"]["images_decoded"] == 1


def test_health_answers_while_big_decodes_run_and_decodes_in_flight_are_bounded(server, big):
    """Red team: 16 concurrent requests of 4096x4096 PNGs took the server from 1.0 to 2.86 GB. Decodes in
    flight are bounded across requests (one per core; the rest wait) and /health answers throughout."""
    with ThreadPoolExecutor(8) as pool:
        posts = [pool.submit(httpx.post, f"{server['url']}/predict", timeout=300,
                             files=files([(f"r{j}a.png", big[j % 4]), (f"r{j}b.png", big[(j + 1) % 4])]))
                 for j in range(6)]
        health = []
        while not all(p.done() for p in posts):
            health.append(httpx.get(f"{server['url']}/health", timeout=30).status_code)
            time.sleep(0.05)
        assert all(p.result().status_code == 200 for p in posts)
    assert health and set(health) == {200}
    seen = decoding(server["url"])
    assert 1 <= seen["in_flight_peak"] <= seen["in_flight_limit"]


# ---- low findings ----------------------------------------------------------------------------------
def test_deeply_nested_json_gets_one_line_400(server):
    """Red team: `python -c "print('{\\"images\\":' + '['*100000 + ']'*100000 + '}')" > deep.json;
    curl -H 'Content-Type: application/json' --data-binary @deep.json http://127.0.0.1:8000/predict` gave a
    500 (RecursionError)."""
    body = '{"images":' + "[" * 100_000 + "]" * 100_000 + "}"
    r = httpx.post(f"{server['url']}/predict", content=body, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"] and "\n" not in r.json()["error"]
    assert httpx.get(f"{server['url']}/health", timeout=30).status_code == 200


def test_a_client_hanging_up_mid_upload_logs_one_line(server):
    """Red team: a client that sends half a multipart body and closes the socket left ~70 lines of
    traceback in the server's log each time."""
    port = int(server["url"].rsplit(":", 1)[1])
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary=xyz"
            f"\r\nContent-Length: 100000\r\n\r\n").encode()
    part = b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n' + b"x" * 1000
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(head + part)
            time.sleep(0.3)
    deadline = time.monotonic() + 20
    while server["log"].read_text().count("hung up") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    text = server["log"].read_text()
    assert text.count("hung up during POST /predict") == 2, text[-3000:]
    assert "Traceback" not in text and "ClientDisconnect" not in text


@pytest.mark.parametrize("headers, status", [
    ({"Host": "evil.example"}, 403),  # DNS rebinding: the attacker's name, re-pointed at 127.0.0.1
    ({"Host": "evil.example:{port}"}, 403),
    ({"Origin": "http://evil.example"}, 403),  # a page elsewhere posting to the loopback server
    ({"Origin": "null"}, 403),
    ({"Origin": "http://127.0.0.1:{port}"}, 200),  # the server's own page
    ({"Host": "localhost:{port}"}, 200),
    ({"Host": "[::1]:{port}"}, 200),
    ({"Host": "127.0.0.1"}, 200),
])
def test_an_open_loopback_server_answers_only_loopback_hosts_and_its_own_origin(server, headers, status):
    """Red team: a page on evil.example whose name re-resolves to 127.0.0.1 (DNS rebinding) drove an open
    loopback server: `curl -H 'Host: evil.example' -F files=@x.png http://127.0.0.1:8000/predict` answered."""
    port = server["url"].rsplit(":", 1)[1]
    headers = {k: v.format(port=port) for k, v in headers.items()}
    image = server["new"][0]
    r = httpx.post(f"{server['url']}/predict", headers=headers, files=files([(image.name, image.read_bytes())]),
                   timeout=60)
    assert r.status_code == status, r.text
    if status == 403:
        assert "\n" not in r.json()["error"] and "--token" in r.json()["error"]


def test_info_names_the_dataset_not_its_path_and_docs_are_off(server):
    """Red team: `curl http://127.0.0.1:8000/info` gave the dataset's absolute path; `/docs` and `/redoc`
    loaded their scripts from a CDN."""
    texts = [httpx.get(f"{server['url']}{path}", timeout=30).text for path in ("/info", "/runs", "/openapi.json")]
    assert json.loads(texts[0])["data"] == server["data"].name
    assert not any(str(server["data"]) in text for text in texts)
    assert httpx.get(f"{server['url']}/docs", timeout=30).status_code == 404
    assert httpx.get(f"{server['url']}/redoc", timeout=30).status_code == 404
    assert "--docs turns on /docs" in server["log"].read_text()


def test_all_runs_skips_a_damaged_run_record_in_one_line(server, tmp_path):
    """Red team: a run.json missing a key (`del blocks[0]["shape"]`) stopped all of `serve --all-runs` with a
    KeyError traceback; and `featurecache serve --run nope` hinted "the latest is run.json"."""
    cache = tmp_path / "cache"
    shutil.copytree(server["cache"], cache)
    broken = cache / "runs" / "20000101-000000-broken"
    shutil.copytree(cache / "runs" / server["run"], broken)
    record = json.loads((broken / "run.json").read_text())
    del record["blocks"][0]["shape"], record["run_id"]
    (broken / "run.json").write_text(json.dumps(record))
    log = tmp_path / "server.log"
    with serving(["--all-runs", "--docs"], cache, log) as url:
        assert [r["run"] for r in httpx.get(f"{url}/runs", timeout=30).json()["runs"]] == [server["run"]]
        assert httpx.get(f"{url}/docs", timeout=30).status_code == 200
    lines = [line for line in log.read_text().splitlines() if "20000101-000000-broken" in line]
    assert len(lines) == 1 and "damaged run.json (key 'shape' missing)" in lines[0], log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()

    line = error_line(run_cli("serve", "--run", "nope", cache_dir=cache))
    assert f"the latest is {server['run']}" in line and "run.json" not in line
