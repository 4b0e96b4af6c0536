import importlib
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]

# How long a child a test starts may run before the test fails naming it: generous (a CLI run that converts a
# network on 2 loaded cores takes a minute or two), yet finite, so a hung child fails CI instead of hanging it.
CHILD_TIMEOUT = 600
STOP_TIMEOUT = 30  # a server asked to stop (SIGTERM) that is still running after this is killed


def must_have(variable: str) -> bool:
    """Whether this machine promises what `variable` names: `CI` (set by CI services; `.ci/run` installs the
    lock, so every package it pins is there), FEATURECACHE_REQUIRE_DATA (Fashion-MNIST),
    FEATURECACHE_REQUIRE_BROWSER (chromium and chromedriver). Where it is promised, a missing thing is a
    failure: CI cannot be green by skipping."""
    return os.environ.get(variable, "").lower() not in ("", "0", "false", "no")


def require(what, why: str, under: str = "CI"):
    """The one rule for a test's prerequisite. `what` is a condition, or a module's name (then the module is
    returned). Missing: the test skips with `why` on a developer's machine, and fails with it where `under`
    is promised (must_have). Usable in a test, a fixture, or at a module's top."""
    module = None
    if isinstance(what, str):
        try:
            module = importlib.import_module(what)
        except ImportError as e:
            why = f"{why} ({e})"
        ok = module is not None
    else:
        ok = bool(what)
    if not ok:
        if must_have(under):
            pytest.fail(f"{why}; required here ({under} is set)", pytrace=False)
        pytest.skip(why, allow_module_level=True)
    return module


def needs(ok: bool, why: str, under: str = "CI"):
    """`require` as a mark, for a condition known at collection: skips the test where `ok` is false, and
    fails it there where `under` is promised (pytest_runtest_setup below)."""
    if ok or not must_have(under):
        return pytest.mark.skipif(not ok, reason=why)
    return pytest.mark.required_but_missing(f"{why}; required here ({under} is set)")


def pytest_configure(config):
    config.addinivalue_line("markers", "required_but_missing(why): set by conftest.needs; the test fails with why")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("required_but_missing"):
        pytest.fail(mark.args[0], pytrace=False)


# Fashion-MNIST: Debian's dataset-fashion-mnist, or the folder FEATURECACHE_FASHION_MNIST_DIR names (a test's
# own data, or a missing folder to see that CI fails without the data).
FASHION_DIR_OVERRIDE = os.environ.get("FEATURECACHE_FASHION_MNIST_DIR") or None


def fashion_mnist_dir() -> Path:
    from featurecache.data.datasets import FASHION_MNIST_DIR

    return Path(FASHION_DIR_OVERRIDE or FASHION_MNIST_DIR)


FASHION_WHY = "{} missing: apt-get install dataset-fashion-mnist"


def needs_fashion_mnist():
    """The mark of a real-data test: skipped without Fashion-MNIST, failed under FEATURECACHE_REQUIRE_DATA."""
    folder = fashion_mnist_dir()
    return needs(folder.is_dir(), FASHION_WHY.format(folder), under="FEATURECACHE_REQUIRE_DATA")


def _tail(text) -> str:
    if isinstance(text, bytes):  # TimeoutExpired keeps bytes even under text=True
        text = text.decode(errors="replace")
    return (text or "")[-3000:]


def run_child(cmd, timeout: float = CHILD_TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd) capturing text output, with a limit: a child still running after `timeout` s is
    killed and the test fails naming the command and the end of what it printed."""
    kwargs = {"capture_output": True, "text": True, **kwargs}
    try:
        return subprocess.run([str(c) for c in cmd], timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"hung: `{shlex.join(str(c) for c in cmd)}` still running after {timeout} s, killed; "
                             f"its stderr ended:\n{_tail(e.stderr)}") from None


def read_line(proc: subprocess.Popen, what: str, timeout: float = CHILD_TIMEOUT) -> str:
    """proc.stdout.readline() with a limit (a blocking read has none): a child that neither prints a line nor
    exits within `timeout` s is killed, and the test fails naming it."""
    got = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        proc.kill()
        proc.wait(STOP_TIMEOUT)
        raise AssertionError(f"hung: `{what}` printed no line in {timeout} s, killed")
    return got[0]


def stop(proc: subprocess.Popen, what: str, timeout: float = STOP_TIMEOUT) -> int:
    """Ask a child to stop (SIGTERM); kill it if it is still running `timeout` s later, and fail naming it."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
        raise AssertionError(f"`{what}` ignored SIGTERM for {timeout} s and was killed") from None


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def run_cli(*args, cache_dir=None, check=False, cwd=ROOT, env=None):
    """Run the installed `featurecache` CLI in a subprocess, as a user would (failing after CHILD_TIMEOUT), in
    `cwd` (where it looks for featurecache.toml), with `env` added to the environment."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    if cache_dir is not None:
        env["FEATURECACHE_DIR"] = str(cache_dir)
    proc = run_child([sys.executable, "-m", "featurecache.cli", *args], env=env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"featurecache {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


def feats(size: int = 32, *layers: str, weights: str = "random") -> list[str]:
    """The feature options of a test that needs vectors made fast rather than good ones: VGG16 with seeded
    random weights (or `weights`, e.g. hed-bsds) at `size` px, on `layers` (default: the model's tap)."""
    return ["--model", "vgg16", "--weights", weights, "--size", str(size), *(a for l in layers for a in ("--layer", l))]


FEATS = feats()  # random-weight VGG16 at 32 px, its default tap: the plumbing tests' features


def fit_run(*args, cache) -> dict:
    """`featurecache fit ARGS --json -q` (with --extract among ARGS it extracts first): the run's summary, whose
    `run_id` names it for predict, serve and export."""
    return json.loads(run_cli("fit", *args, "--json", "-q", cache_dir=cache, check=True).stdout)


def run_python(code: str) -> str:
    """Run `code` in a fresh interpreter from the repository root, as a user's program would, and return its
    stdout (a failure shows the end of its stderr): how a test sees what an import pulls in (TensorFlow?)."""
    proc = run_child([sys.executable, "-c", code], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(url, proc, log_path, timeout=180):
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"server not healthy after {timeout} s:\n{log_path.read_text()[-3000:]}")


@contextmanager
def serving(args, cache: Path, log_path: Path, env: dict | None = None):
    """A real `featurecache serve ARGS` on a free loopback port, healthy before the block, stopped after it;
    yields its base URL. Its output goes to `log_path` (quoted when it fails to start)."""
    port = free_port()
    cmd = [sys.executable, "-m", "featurecache.cli", "serve", *map(str, args), "--port", str(port)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=dict(os.environ, FEATURECACHE_DIR=str(cache), **(env or {})),
                                cwd=ROOT, stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_health(url, proc, log_path)
            yield url
        finally:
            stop(proc, shlex.join(cmd))


def error_line(proc) -> str:
    """The one `error:` line a failed command printed."""
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def digit_project(root: Path, new: int) -> tuple[Path, list[Path], Path]:
    """A served run's usual ground: (a folder of 12 digits per class, `new` more per class that it lacks, a cache)."""
    data, cache = root / "digits", root / "cache"
    write_digit_folder(data, 12)
    return data, write_digit_folder(root / "new", new, offset=12), cache


def write_digit_folder(root: Path, per_class: int, classes=(0, 1, 2), offset: int = 0) -> list[Path]:
    """Real digits written as PNG files in class subfolders."""
    from sklearn.datasets import load_digits

    d = load_digits()
    paths = []
    for c in classes:
        (root / f"digit{c}").mkdir(parents=True, exist_ok=True)
        idx = np.flatnonzero(d.target == c)[offset:offset + per_class]
        for i in idx:
            p = root / f"digit{c}" / f"{i}.png"
            Image.fromarray(np.rint(d.images[i] * 255 / 16).astype(np.uint8)).save(p)
            paths.append(p)
    return paths


def write_cifar_archive(root: Path, per_batch: int = 10) -> tuple[Path, Path, dict]:
    """A small CIFAR-10 "python version": cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
    (protocol-2 pickles of dicts with bytes keys, uint8 rows of 3072 = 3 planes of 32x32) and its .tar.gz."""
    import pickle
    import tarfile

    from featurecache.data.datasets import CIFAR10_CLASSES

    def batch(seed):
        rng = np.random.default_rng(seed)
        return {b"batch_label": b"batch", b"labels": (np.arange(per_batch) % 10).tolist(),
                b"data": rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8),
                b"filenames": [b"f%d.png" % i for i in range(per_batch)]}

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(i), protocol=2))
    test_batch = batch(9)
    (folder / "test_batch").write_bytes(pickle.dumps(test_batch, protocol=2))
    meta = {b"label_names": [n.encode() for n in CIFAR10_CLASSES], b"num_cases_per_batch": per_batch,
            b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return archive, folder, test_batch


@pytest.fixture(scope="session")
def fashion_small(tmp_path_factory):
    """Fashion-MNIST, 3,000 train / 1,000 test, with a session cache holding its HED-VGG16 block3_pool codes at
    32px (4,096-d), shared by the real-data tests. Where Debian's dataset-fashion-mnist is missing: skips, or
    fails under FEATURECACHE_REQUIRE_DATA (as .ci/run sets)."""
    from featurecache.api import DataOptions, RunSettings, dataset_features
    from featurecache.extraction.extract import FeatureSpec

    folder = fashion_mnist_dir()
    require(folder.is_dir(), FASHION_WHY.format(folder), under="FEATURECACHE_REQUIRE_DATA")
    cache = tmp_path_factory.mktemp("fashion-cache")
    ds = DataOptions("fashion-mnist", FASHION_DIR_OVERRIDE, max_train=3000, max_test=1000).load()
    spec = FeatureSpec("vgg16", "hed-bsds", ("block3_pool",), size=32)
    _, x_train, x_test = dataset_features(ds, spec, RunSettings(cache, progress=False), compute=True)
    return {"ds": ds, "cache": cache, "hed": (x_train, x_test)}
