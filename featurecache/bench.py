"""What the scripts in scripts/ need beyond :mod:`featurecache.api`: benchmark and reproduction helpers.

Scripts import only ``featurecache.api``, ``featurecache.heads``, ``featurecache.errors`` and this
module, or run the CLI (tests/test_scripts.py holds them to it). Where a benchmark must look at more
than the API shows (a set's parts after a crash, a network's FLOPs), the reach inside the package is
here, in one module, and every function is exercised by tests/test_scripts.py: a change inside the
package that breaks one fails a test instead of a benchmark nobody ran.

    write_section(path, heading, body)      replace one `## heading` section of a Markdown file
    run_cli(args, env)                      a `featurecache` command in a child: seconds, peak RSS, stdout
    write_digit_images(root, per_class)     real digit PNGs in class subfolders (a folder dataset)
    noise_pngs(n, size)                     random-noise PNG bytes (images never in any cache)
    decode_file(path), check_file(path)     the full decode extraction does, and the cheaper up-front
                                            check of `extract --on-error fail`
    tap_shapes(model, size, cache_dir)      {tap: map shape}, in network order
    set_state(cache_dir, set_id)            what a feature set holds on disk: ids, rows in parts, problems
    set_vectors(cache_dir, set_id, ids)     stored vectors of `ids`, in that order
    run_encoder(run_id, cache_dir)          the encoder of a fitted run's features (what `serve` runs)
    conv_flops(model, size, tap)            convolution FLOPs per image, for GFLOP/s figures
    predict_files(paths, run_id, cache_dir) `featurecache predict` in this process (warm, for timings)
    version(distribution)                   an installed library's version, as runs record it
    evaluate, write_atomic, confusion_png, scatter_png, lines_png, plot_by_layer, recommend
                                            the metrics, atomic writes and plots that `fit`, `report`
                                            and `sweep` use, for tables the CLI does not make
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .runs.plots import confusion_png, lines_png, scatter_png
from .runs.record import evaluate
from .store.prune import parse_size
from .store.sets import write_atomic
from .runs.sweep import plot as plot_by_layer
from .runs.sweep import recommend

__all__ = ["CliRun", "SetState", "check_file", "cpu_model", "parse_size", "confusion_png", "conv_flops", "decode_file", "evaluate",
           "lines_png", "noise_pngs", "plot_by_layer", "predict_files", "recommend", "run_cli", "run_encoder",
           "scatter_png", "set_state", "set_vectors", "tap_shapes", "version", "write_atomic", "write_digit_images",
           "write_section"]


def cpu_model() -> str:
    """/proc/cpuinfo's model name, family and vector extensions (machines differ from week to week)."""
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        import platform

        return platform.processor() or "unknown"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = sorted(f for f in fields.get("flags", "").split() if f.startswith(("avx512", "amx")) or f in
                   ("avx2", "fma", "avx_vnni"))
    return f"{fields.get('model name', 'unknown')} (cpu family {fields.get('cpu family', '?')}; {' '.join(flags)})"


def write_section(path: Path, heading: str, body: str) -> None:
    """Replace the ``## heading`` section of the Markdown file ``path`` (or add it), leaving the others alone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEach section is written by the script it names.\n"
    section = f"## {heading}\n\n_Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}._\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text)


@dataclass(frozen=True)
class CliRun:
    seconds: float  # wall clock, process start to exit
    peak_rss: int  # bytes: the child's own ru_maxrss (on Linux it includes pages shared with the parent at fork)
    stdout: str
    returncode: int


def run_cli(args: list[str], env: dict | None = None, check: bool = True) -> CliRun:
    """Run ``featurecache ARGS`` in a child process, as a user would, and measure it.

    ``env`` replaces the environment (e.g. to set FEATURECACHE_DIR); stderr passes through. With
    ``check`` a failure exits this script with one line naming the command.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "featurecache.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    # wait4 gives this child's own rusage; RUSAGE_CHILDREN would report the largest child so far.
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if check and proc.returncode:
        sys.exit(f"featurecache {shlex.join(map(str, args))} failed ({proc.returncode})")
    return CliRun(seconds, usage.ru_maxrss * 1024, out, proc.returncode)


def write_digit_images(root: Path, per_class: int, classes=(0, 1, 2), offset: int = 0) -> list[Path]:
    """scikit-learn's 8x8 digits as PNG files in class subfolders ``digit<c>/``: a small real folder dataset."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    paths = []
    for c in classes:
        (Path(root) / f"digit{c}").mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(d.target == c)[offset:offset + per_class]:
            p = Path(root) / f"digit{c}" / f"{i}.png"
            Image.fromarray(np.rint(d.images[i] * 255 / 16).astype(np.uint8)).save(p)
            paths.append(p)
    return paths


def noise_pngs(n: int, size: int, seed: int = 0) -> list[bytes]:
    """``n`` random-noise RGB PNGs of ``size`` x ``size``, encoded: images no cache has seen."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def decode_file(path: Path) -> np.ndarray:
    """An image file as extraction decodes it: RGB uint8 at its own size (FeatureCacheError if unreadable)."""
    from .encoding.images import load_file

    return load_file(Path(path))


def check_file(path: Path) -> None:
    """The up-front check `extract --on-error fail` runs on files still to compute (FeatureCacheError if bad)."""
    from .encoding.images import check_file as check

    check(Path(path))


def tap_shapes(model: str, size: int, cache_dir: Path | None = None) -> dict[str, tuple[int, ...]]:
    """``{tap: output shape}`` of ``model`` at ``size`` px, in network order (what `featurecache layers` lists)."""
    from .backbones import get_backbone
    from .encoding.taps import catalogue

    return {t.name: tuple(t.shape) for t in catalogue(get_backbone(model), size, cache_dir)}


@dataclass(frozen=True)
class SetState:
    """A feature set as stored: what a reader sees after any crash."""
    ids: frozenset  # distinct image ids stored
    rows: int  # rows over all visible parts: more than len(ids) means a row is stored twice
    temp_files: int  # unfinished part writes (invisible to readers)
    problems: tuple[str, ...]  # what `featurecache cache verify` would report about its structure


def set_state(cache_dir: Path, set_id: str) -> SetState | None:
    """The set's state (None if it does not exist yet). Gathers every stored row, so it also proves
    that every visible part opens and reads."""
    from .store.sets import FeatureStore
    from .extraction.verify import check_structure

    fs = FeatureStore(Path(cache_dir)).get(set_id)
    if fs is None:
        return None
    ids = list(fs.index())
    fs.gather(ids)
    rows = sum(len(fs.part_ids(p)) for p in fs.part_files())
    problems, _ = check_structure(fs)
    return SetState(frozenset(ids), rows, len(fs.temp_files()), tuple(p.text for p in problems))


def set_vectors(cache_dir: Path, set_id: str, ids: list[str]) -> np.ndarray:
    """The stored vectors of ``ids`` (rows in that order) from feature set ``set_id``."""
    from .errors import FeatureCacheError
    from .store.sets import FeatureStore

    fs = FeatureStore(Path(cache_dir)).get(set_id)
    if fs is None:
        raise FeatureCacheError(f"no feature set {set_id} in {cache_dir}")
    return fs.gather(list(ids))


def run_encoder(run_id: str, cache_dir: Path, engine: str | None = None):
    """The encoder of a fitted run's features (its model, tap, size and options), as `serve` builds it:
    :func:`featurecache.api.make_encoder` of the run's recorded feature settings."""
    from .api import make_encoder
    from .runs.record import load
    from .settings import RunSettings, default_engine

    run = RunSettings(Path(cache_dir), engine or default_engine())
    return make_encoder(load(run.cache_dir, run_id).spec, run)


def conv_flops(model: str, size: int, tap: str) -> float:
    """FLOPs (2 per multiply-add) of the convolutions of ``model`` at ``size`` px up to ``tap``, per image:
    nearly all of a CNN's arithmetic, for figures in GFLOP/s. Counted on a seeded random-weights build."""
    from .backbones import get_backbone
    from .backbones.build import build_model
    from .backbones.weights import resolve_weights

    backbone = get_backbone(model)
    total = 0.0
    for layer in build_model(backbone, resolve_weights(backbone, "random"), size).layers:
        kind = type(layer).__name__
        if kind in ("Conv2D", "DepthwiseConv2D"):
            _, h, w, c_out = layer.output.shape
            kh, kw, c_in = layer.get_weights()[0].shape[:3]
            total += 2.0 * h * w * kh * kw * (c_in * c_out if kind == "Conv2D" else c_in)
        if layer.name == tap:
            break
    return total


def predict_files(paths: list[Path], run_id: str, cache_dir: Path, engine: str | None = None, top: int = 1,
                  batch_size: int = 64) -> list[dict]:
    """`featurecache predict` in this process (warm after the first call): one row per file with its label,
    score, score kind and top classes, exactly as the command's --format json prints them."""
    from .api import default_engine
    from .runs.predict import predict_files as predict
    from .settings import RunSettings

    settings = RunSettings(Path(cache_dir), engine or default_engine(), batch_size, False, log=lambda m: None)
    return predict([Path(p) for p in paths], run_id, settings, top=top)


def version(distribution: str) -> str:
    """The installed version of a distribution, as runs record it ("not installed" if absent)."""
    from .versions import version as installed

    return installed(distribution)


def store_write_rate(cache_dir: Path, dims: int, rows: int = 20000, batch: int = 64) -> float:
    """Vectors per second the driver of an extraction can store: batches of `batch` float32 vectors of
    `dims` appended to a fresh feature set under its lock, cut into parts as extraction cuts them (each
    written, fsynced and renamed). The ceiling of a cluster run, whose only writer is its driver."""
    from .store.sets import FeatureStore

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((batch, dims)).astype(np.float32)
    fs = FeatureStore(Path(cache_dir)).open(f"bench{dims:011d}", {"bench": dims}, dims)
    with fs.lock():
        t0 = since = time.perf_counter()
        buffered, ids = [], []
        for k in range(0, rows, batch):
            ids += [f"{k + j:032x}" for j in range(batch)]
            buffered.append(vectors)
            if fs.part_due(len(ids), time.perf_counter() - since) or k + batch >= rows:
                fs.append(ids, np.concatenate(buffered))
                ids, buffered, since = [], [], time.perf_counter()
        return rows / (time.perf_counter() - t0)
