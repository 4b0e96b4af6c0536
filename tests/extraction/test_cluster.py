"""Extraction on a Ray cluster (issue #13): same cache, same vectors, faults absorbed, bad input in one line.

One real local Ray (2 CPUs) serves the whole module: started here, in the test process, and joined by
the CLI subprocesses through its address (`--ray-address`), as a user joins a cluster started with
`ray start --head`. Small configurations throughout (digits, vgg16 with seeded random weights at 32 px):
the machine is shared.
"""

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import (CHILD_TIMEOUT, ROOT, error_line, feats, free_port, require, run_child, run_cli,  # noqa: E402
                      write_digit_folder)

require("ray", "ray is not installed (pip install -e '.[test]')")
from test_reliability import Child, progress  # noqa: E402

from featurecache.api import DataOptions, RunSettings, extract_dataset  # noqa: E402
from featurecache.extraction.cluster import ClusterSettings, probe  # noqa: E402
from featurecache.data.datasets import load_dataset  # noqa: E402
from featurecache.errors import FeatureCacheError  # noqa: E402
from featurecache.extraction.extract import FeatureSpec  # noqa: E402
from featurecache.store.sets import FeatureStore  # noqa: E402

SPEC = FeatureSpec("vgg16", "random", ("block5_pool",), size=32)
FEATS = feats(32, "block5_pool")
SMALL = ["--data", "digits", "--max-train", "120", "--max-test", "60"]
QUIET_ENV = {"TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"}


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray with 2 CPUs for the module; its GCS address is what `--ray-address` takes."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture
def ray_client_address():
    """A cluster started by hand as docs/CLUSTER.md says (`ray start --head`, with Ray Client's port), in
    its own temporary folder; stopped by its own process ids afterwards, never by `ray stop` (which
    would stop every Ray of this user on the machine)."""
    temp = Path(tempfile.mkdtemp(prefix="fc-ray-", dir="/tmp"))  # Ray's socket paths must stay short
    client = free_port()  # outside Ray's worker port range (10002-19999): the OS hands out higher ones
    ray_cli = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_cli), "start", "--head", "--port", str(free_port()), "--ray-client-server-port",
                             str(client), "--num-cpus", "2", "--temp-dir", str(temp), "--include-dashboard", "false",
                             "--disable-usage-stats", "--block"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            # a loaded 2-core CI machine can take over Ray's 30 s to start a client's server
                            env=dict(os.environ, RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S="120"))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", client), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
                time.sleep(0.5)
        yield f"ray://127.0.0.1:{client}"
    finally:
        head.terminate()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
        for pid in [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]:
            try:  # whatever that head left: its processes name its temporary folder
                if str(temp).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def all_ids(ds) -> list[str]:
    return list(dict.fromkeys(ds.train.images.ids + ds.test.images.ids))


def the_set(cache):
    (fs,) = FeatureStore(cache).all()
    return fs


def rows_in_parts(fs) -> int:
    return sum(len(p.ids) for p in fs.parts())


def encode_actor_pids() -> list[int]:
    """Process ids of the live encoder actors (Ray Data names them MapWorker(MapBatches(EncodeActor)))."""
    from ray._private import state

    return [a["Pid"] for a in state.actors().values()
            if "EncodeActor" in a.get("ActorClassName", "") and a.get("State") == "ALIVE" and a.get("Pid")]


def test_ray_set_is_a_local_cache_hit_with_the_same_vectors_and_accuracy(ray_address, tmp_path):
    from featurecache.runs.fit import fit
    from featurecache.settings import HeadSpec

    on_ray, local = tmp_path / "ray", tmp_path / "local"
    proc = run_cli("extract", *SMALL, *FEATS, "--executor", "ray", "--ray-address", ray_address, "--workers", "2",
                   "--json", cache_dir=on_ray, check=True)
    out = json.loads(proc.stdout)
    assert out["computed"] == 180 and out["sets"][0]["stored"] == 180
    noise = [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith("notice:")]
    assert noise == [], proc.stderr[-2000:]  # --json: no progress bar, and none of Ray's log lines
    again = json.loads(run_cli("extract", *SMALL, *FEATS, "--json", cache_dir=on_ray, check=True).stdout)
    assert again["cache_hit"] and again["computed"] == 0 and again["sets"][0]["id"] == out["sets"][0]["id"]

    data = DataOptions("digits", max_train=120, max_test=60)
    ds = data.load()
    _, s = extract_dataset(ds, SPEC, RunSettings(local, progress=False))
    assert s.sets[0]["id"] == out["sets"][0]["id"]  # the executor is not part of the key
    ids = all_ids(ds)
    a, b = the_set(on_ray).gather(ids), the_set(local).gather(ids)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    fits = [fit(data, SPEC, RunSettings(cache, log=lambda m: None), HeadSpec("linsvc", normalize="l2"))
            for cache in (on_ray, local)]
    assert fits[0]["metrics"]["test_accuracy"] == fits[1]["metrics"]["test_accuracy"]


def test_a_cluster_joined_through_ray_client(ray_client_address, tmp_path):
    # The driver is outside the cluster: it reads the batches itself and sends them to the actors.
    proc = run_cli("extract", *SMALL, *FEATS, "--executor", "ray", "--ray-address", ray_client_address, "--json",
                   cache_dir=tmp_path, check=True)
    assert json.loads(proc.stdout)["computed"] == 180
    assert [l for l in proc.stderr.splitlines() if l.strip() and not l.startswith("notice:")] == []
    again = json.loads(run_cli("extract", *SMALL, *FEATS, "--json", cache_dir=tmp_path, check=True).stdout)
    assert again["cache_hit"]


def test_a_killed_actor_is_replaced_and_every_image_is_stored_once(ray_address, tmp_path):
    cache = tmp_path / "cache"
    child = Child("extract", "--data", "digits", "--max-train", "300", "--max-test", "100", *FEATS,
                  "--executor", "ray", "--ray-address", ray_address, "--workers", "2", "--batch-size", "8",
                  cache_dir=cache, env=dict(QUIET_ENV, FEATURECACHE_PART_ROWS="32"))
    child.wait_for(lambda e: progress(e) >= 16)
    pids = encode_actor_pids()
    assert pids, "no live encoder actor found"
    os.kill(pids[0], signal.SIGKILL)
    rc, out = child.finish()
    assert rc == 0, child.err[-3000:]
    ds = DataOptions("digits", max_train=300, max_test=100).load()
    fs = the_set(cache)
    assert len(fs) == rows_in_parts(fs) == len(all_ids(ds)) == 400  # every image, each exactly once
    assert fs.missing(all_ids(ds)) == []


def test_a_killed_driver_reruns_only_what_is_missing(ray_address, tmp_path):
    cache = tmp_path / "cache"
    args = ["extract", "--data", "digits", "--max-train", "300", "--max-test", "100", *FEATS, "--executor", "ray",
            "--ray-address", ray_address, "--workers", "2", "--batch-size", "8"]
    env = dict(QUIET_ENV, FEATURECACHE_PART_ROWS="16")
    child = Child(*args, cache_dir=cache, env=env)
    child.wait_for(lambda e: progress(e) >= 64)
    child.proc.send_signal(signal.SIGKILL)
    child.finish()
    stored = len(the_set(cache))
    assert 0 < stored < 400
    rerun = Child(*args, "--json", cache_dir=cache, env=env)
    rc, out = rerun.finish()
    assert rc == 0, rerun.err[-3000:]
    assert json.loads(out)["computed"] == 400 - stored
    fs = the_set(cache)
    assert len(fs) == rows_in_parts(fs) == 400


def test_ctrl_c_keeps_finished_batches_and_stops_a_local_ray(tmp_path):
    # No address: the driver starts its own Ray. Ctrl-C in a terminal signals the whole process group.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", FEATURECACHE_DIR=str(tmp_path), PYTHONUNBUFFERED="1", **QUIET_ENV)
    proc = subprocess.Popen([sys.executable, "-m", "featurecache.cli", "extract", "--data", "digits", "--max-train",
                             "300", "--max-test", "100", *FEATS, "--executor", "ray", "--batch-size", "8"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    err, deadline = "", time.monotonic() + CHILD_TIMEOUT
    try:
        while progress(err) < 16:
            assert proc.poll() is None and time.monotonic() < deadline, f"extract --executor ray hung:\n{err[-3000:]}"
            if select.select([proc.stderr], [], [], 1)[0]:  # a silent child must not block the read for ever
                err += os.read(proc.stderr.fileno(), 4096).decode()
        os.killpg(proc.pid, signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # hung, or Ctrl-C ignored: the test fails, the child does not outlive it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    done = re.search(r"interrupted after (\d+) of 400 images", err + rest)
    assert proc.returncode == 2 and done, (err + rest)[-3000:]
    assert len(the_set(tmp_path)) == int(done.group(1)) >= 16
    time.sleep(2)
    left = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _group(int(p.name)) == proc.pid]
    assert left == []  # the local Ray went with it


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def test_unreadable_image_on_a_worker_is_skipped_by_name(ray_address, tmp_path):
    folder = tmp_path / "photos"
    write_digit_folder(folder, per_class=8)
    bad = folder / "digit1" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ds = load_dataset(str(folder), test_size=0.25)
    _, s = extract_dataset(ds, SPEC, RunSettings(tmp_path / "cache", progress=False, on_error="skip", executor="ray",
                                                 cluster=ClusterSettings(workers=1)))
    assert [x["name"] for x in s.skipped] == [str(bad)] and s.computed == 24
    with pytest.raises(FeatureCacheError, match="broken.png"):  # fail: the same check as local, before any work
        extract_dataset(ds, SPEC, RunSettings(tmp_path / "other", progress=False, executor="ray",
                                              cluster=ClusterSettings()))


def test_plan_estimates_from_the_cluster_resources(ray_address, tmp_path):
    from featurecache.extraction.plan import describe, run_plan

    ds = DataOptions("digits", max_train=120, max_test=60).load()
    run = RunSettings(tmp_path / "cache", executor="ray", cluster=ClusterSettings(workers=None))
    out = run_plan(ds, SPEC, run, probe=32)
    assert out["executor"] == "ray" and out["cluster_cpus"] == 2 and out["workers"] == 2
    assert out["measured_images_per_second"] == pytest.approx(2 * out["per_worker_images_per_second"], rel=0.01)
    assert out["expected_seconds"] > out["setup_seconds"] and "Ray cluster of 2 CPUs" in describe(out)


@contextmanager
def silent_address():
    """A loopback HOST:PORT that never answers, as a firewalled head does: a listening socket with a full
    accept queue (backlog 0, one connection held, never accepted), so the kernel drops further SYNs and a
    connect() waits until its own timeout."""
    with socket.socket() as srv, socket.socket() as held:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        held.connect(srv.getsockname())
        yield "%s:%d" % srv.getsockname()


def test_an_address_that_does_not_answer_is_one_line_within_the_documented_bound(tmp_path):
    """docs/CLUSTER.md: an address that does not answer is one line "within 5 seconds, before any work". The
    figure is the probe's timeout (asserted equal, not timed: ray.init alone would retry for a minute or
    more); a refused port and a silent one each end in one line, and nothing is extracted."""
    from featurecache.extraction import cluster

    claim = re.search(r"within (\d+) seconds, before any work", (ROOT / "docs" / "CLUSTER.md").read_text())
    assert claim and float(claim.group(1)) == cluster.PROBE_SECONDS
    proc = run_cli("extract", *SMALL, *FEATS, "--executor", "ray", "--ray-address", "127.0.0.1:1", cache_dir=tmp_path)
    assert proc.returncode == 2 and "--ray-address 127.0.0.1:1: nothing answers" in error_line(proc)
    with silent_address() as address:
        with pytest.raises(FeatureCacheError, match=f"--ray-address {address}: nothing answers .*no answer"):
            probe(address, timeout=0.5)  # the bound is the probe's: a silent host waits no longer than it
        proc = run_cli("extract", *SMALL, *FEATS, "--executor", "ray", "--ray-address", address, cache_dir=tmp_path)
    assert proc.returncode == 2 and "(no answer)" in error_line(proc)  # the CLI's probe, with its default bound
    assert not (tmp_path / "features").exists() or not any((tmp_path / "features").iterdir())  # before any work
    with pytest.raises(FeatureCacheError, match="expected HOST:PORT"):
        probe("nonsense")


def test_without_ray_installed_the_error_names_the_extra(tmp_path):
    import subprocess

    code = ("import sys, runpy; sys.modules['ray'] = None; "  # `import ray` now fails as if not installed
            f"sys.argv = ['featurecache', 'extract', *{SMALL + FEATS!r}, '--executor', 'ray']; "
            "runpy.run_module('featurecache.cli', run_name='__main__')")
    proc = run_child([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, FEATURECACHE_DIR=str(tmp_path)))
    assert proc.returncode == 2 and 'pip install "featurecache[ray]"' in error_line(proc)


def test_store_write_rate_writes_what_it_times(tmp_path):
    from featurecache.bench import store_write_rate

    assert store_write_rate(tmp_path, 16, rows=640) > 0  # the benchmark's driver ceiling (bench_cluster.py)
    fs = the_set(tmp_path)
    assert len(fs) == rows_in_parts(fs) == 640 and fs.dims == 16
