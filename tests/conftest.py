import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def run_cli(*args, cache_dir=None, check=False):
    """Run the installed `featurecache` CLI in a subprocess, as a user would."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if cache_dir is not None:
        env["FEATURECACHE_DIR"] = str(cache_dir)
    proc = subprocess.run([sys.executable, "-m", "featurecache.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT)
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
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
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
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "featurecache.cli", "serve", *map(str, args), "--port",
                                 str(port)], env=dict(os.environ, FEATURECACHE_DIR=str(cache), **(env or {})),
                                cwd=ROOT, stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_health(url, proc, log_path)
            yield url
        finally:
            proc.terminate()
            proc.wait(30)


def error_line(proc) -> str:
    """The one `error:` line a failed command printed."""
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


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
    32px (4,096-d), shared by the real-data tests. Skips where Debian's dataset-fashion-mnist is missing."""
    from featurecache.api import DataOptions, RunSettings, dataset_features
    from featurecache.data.datasets import FASHION_MNIST_DIR
    from featurecache.extraction.extract import FeatureSpec

    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"{FASHION_MNIST_DIR} missing: apt-get install dataset-fashion-mnist")
    cache = tmp_path_factory.mktemp("fashion-cache")
    ds = DataOptions("fashion-mnist", max_train=3000, max_test=1000).load()
    spec = FeatureSpec("vgg16", "hed-bsds", ("block3_pool",), size=32)
    _, x_train, x_test = dataset_features(ds, spec, RunSettings(cache, progress=False), compute=True)
    return {"ds": ds, "cache": cache, "hed": (x_train, x_test)}
