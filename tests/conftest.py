import os
import subprocess
import sys
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
