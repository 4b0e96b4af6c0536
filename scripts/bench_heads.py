"""Benchmark the heads: fit time, peak memory and accuracy on 50,000 x 2,048 float32 features.

Every head is fitted in a fresh subprocess (so that its peak resident memory is its own: the
child reports ``ru_maxrss`` right after loading the features and again after fitting), behind the
same pipeline the CLI uses (``make_pipeline(head, {}, normalize="l2")``). scikit-learn's
``LinearSVC(dual=False)`` at the same C is the reference row for ``linsvc``: same objective, so
the table also shows both primal objective values and the accuracy difference.

    python scripts/bench_heads.py                         # real features if possible, else synthetic
    python scripts/bench_heads.py --source synthetic      # 10-class make_classification problem
    python scripts/bench_heads.py --features feats.npz    # arrays X_train, y_train, X_test, y_test
    python scripts/bench_heads.py --heads linsvc,sklearn-linearsvc --n-train 50000

Feature sources (``--source``): ``npz`` (``--features PATH``), ``api`` (real CNN codes:
``featurecache.api.load_features("fashion-mnist", model="vgg16", weights="hed-bsds",
layer="block4_pool", pool="flatten", size=32)``, 2,048 dims, extracted and cached on first use),
``synthetic``; ``auto`` (default) = npz if ``--features`` is given, else api, else synthetic.
Results go to stdout and to the section "## Heads (scripts/bench_heads.py)" of docs/BENCHMARKS.md
(replaced in place; other sections are left alone). Use ``--no-write`` to leave the file alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SECTION = "Heads (scripts/bench_heads.py)"
REFERENCE = "sklearn-linearsvc"
ALL_HEADS = ["linsvc", REFERENCE, "logreg", "ridge", "sgd", "rf", "knn", "mlp", "svc"]
SLOW_HEADS = {"svc", "knn", "mlp"}  # inherently slow at 50k: fitted on --slow-n-train rows


# ---------------------------------------------------------------------------- features


def synthetic_features(n_train: int, n_test: int, seed: int = 0):
    """A non-trivial 10-class problem shaped like CNN codes: 2,048 non-negative float32 dims.

    make_classification (64 informative + 192 redundant directions, 2 clusters per class, 2 %
    label noise), mixed into 2,048 dims by a random non-negative-ish map and passed through ReLU so
    the rows look like pooled activations (a dominant mean direction, power-law spectrum).
    """
    from sklearn.datasets import make_classification

    n = n_train + n_test
    X, y = make_classification(
        n_samples=n, n_features=256, n_informative=64, n_redundant=192, n_classes=10,
        n_clusters_per_class=2, class_sep=1.0, flip_y=0.02, random_state=seed,
    )
    rng = np.random.default_rng(seed)
    mix = (rng.standard_normal((256, 2048)) / 16).astype(np.float32)
    F = X.astype(np.float32) @ mix
    F += 0.5
    np.maximum(F, 0, out=F)
    return F[:n_train], y[:n_train], F[n_train:], y[n_train:]


def load_source(args):
    """(X_train, y_train, X_test, y_test, description, kind) according to --source."""
    source = args.source
    if source == "auto":
        source = "npz" if args.features else "api"
    if source == "npz":
        if not args.features:
            sys.exit("error: --source npz needs --features PATH.npz")
        with np.load(args.features) as z:
            Xtr, ytr, Xte, yte = (z[k] for k in ("X_train", "y_train", "X_test", "y_test"))
        return Xtr, ytr, Xte, yte, f"npz file {args.features}", "npz"
    if source == "api":
        try:
            from featurecache.api import load_features

            Xtr, ytr, Xte, yte, _ = load_features(
                data="fashion-mnist", model="vgg16", weights="hed-bsds", layer="block4_pool",
                pool="flatten", size=32, extract=True, max_train=args.n_train,
            )
            desc = ("real CNN codes: Fashion-MNIST (official split; train subsampled to "
                    f"{len(ytr)}), VGG16 hed-bsds block4_pool, flatten, 32 px, via "
                    "featurecache.api.load_features")
            return Xtr, ytr, Xte, yte, desc, "api"
        except Exception as e:  # noqa: BLE001 - any failure means "not available here"
            if args.source == "api":
                raise
            print(f"[bench] featurecache.api.load_features unavailable ({type(e).__name__}: "
                  f"{str(e)[:200]}); falling back to synthetic features", file=sys.stderr)
    Xtr, ytr, Xte, yte = synthetic_features(args.n_train, args.n_test)
    return Xtr, ytr, Xte, yte, (
        f"synthetic: sklearn make_classification, 10 classes (64 informative + 192 redundant "
        f"dims, 2 clusters/class, 2 % label noise) mixed to 2,048 ReLU dims, seed 0"), "synthetic"


# ---------------------------------------------------------------------------- one head (child)


def _rss_mb(field: str) -> float:
    """VmRSS (current) or VmHWM (peak) of this process in MB, from /proc/self/status."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: write 5 to /proc/self/clear_refs); True if done."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _rss_mb("VmHWM")
        return True
    except (OSError, AttributeError):
        return False


def child(args) -> None:
    """Runs in a fresh process: load the arrays, fit one head, print a JSON line."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from featurecache import heads

    d = Path(args.child_dir)
    Xtr = np.load(d / "X_train.npy")
    ytr = np.load(d / "y_train.npy")
    Xte = np.load(d / "X_test.npy")
    yte = np.load(d / "y_test.npy")
    n = min(args.child_n, len(ytr))
    if n < len(ytr):  # stratified-ish deterministic subsample
        idx = np.sort(np.random.default_rng(0).permutation(len(ytr))[:n])
        Xtr, ytr = Xtr[idx], ytr[idx]
    reset = _reset_peak_rss()  # so that the peak below is the fit's, not the loading's
    base_mb = _rss_mb("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    name = args.child
    if name == REFERENCE:
        from sklearn.pipeline import Pipeline
        from sklearn.svm import LinearSVC

        pipe = Pipeline([("normalize", heads.L2Normalizer()),
                         ("head", LinearSVC(C=args.C, dual=False))])
    else:
        options = {"C": args.C} if heads.HEADS[name].accepts("C") else {}
        pipe = heads.make_pipeline(name, options, normalize="l2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        t0 = time.perf_counter()
        c0 = time.process_time()
        pipe.fit(Xtr, ytr)
        fit_s = time.perf_counter() - t0
        cpu_s = time.process_time() - c0
    peak_mb = _rss_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    train_acc = float(pipe.score(Xtr, ytr))
    test_acc = float(pipe.score(Xte, yte))
    score_s = time.perf_counter() - t0
    out = dict(head=name, n=int(n), fit_s=fit_s, cpu_s=cpu_s, score_s=score_s, base_mb=base_mb,
               peak_mb=peak_mb, train_acc=train_acc, test_acc=test_acc,
               warnings=sorted({" ".join(str(w.message).split())[:80] for w in caught
                                if issubclass(w.category, ConvergenceWarning)}))
    est = pipe.named_steps["head"]
    if name in ("linsvc", REFERENCE):
        Xn = pipe.named_steps["normalize"].transform(Xtr)  # in place: already normalised
        out["objective"] = heads.squared_hinge_objective(est.coef_, est.intercept_, Xn, ytr,
                                                         est.classes_, args.C)
        out["n_iter"] = int(np.max(est.n_iter_))
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------- parent


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    import scipy
    import sklearn

    try:
        from threadpoolctl import threadpool_info

        blas = ", ".join(sorted({f"{i['internal_api']} {i.get('version') or ''} "
                                 f"({i['num_threads']} threads)".replace("  ", " ")
                                 for i in threadpool_info() if i["user_api"] == "blas"}))
    except Exception:  # noqa: BLE001
        blas = "?"
    return (f"{os.cpu_count()} cores ({model}){mem}, Python {platform.python_version()}, "
            f"numpy {np.__version__}, scipy {scipy.__version__}, scikit-learn {sklearn.__version__}, "
            f"BLAS: {blas}")


def run_child(name, n, tmp, args):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--child-dir", str(tmp),
           "--child-n", str(n), "--C", repr(args.C)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")


def fmt_table(rows, C) -> str:
    ref = next((r for r in rows if r["head"] == REFERENCE), None)
    lin = next((r for r in rows if r["head"] == "linsvc"), None)
    head = ("| head | n train | fit s | fit CPU s | peak RSS MB (fit +) | train acc | test acc "
            "| objective | notes |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        notes = []
        if r["head"] == "linsvc" and ref:
            notes.append(f"test acc {100 * (r['test_acc'] - ref['test_acc']):+.2f} pts vs "
                         f"LinearSVC; objective {100 * (r['objective'] / ref['objective'] - 1):+.4f} % "
                         f"vs LinearSVC; {ref['fit_s'] / r['fit_s']:.1f}x faster")
        if r["head"] == REFERENCE:
            notes.append("reference: sklearn LinearSVC(dual=False), liblinear")
        if r.get("n_iter") is not None:
            notes.append(f"{r['n_iter']} iterations")
        notes += [f"ConvergenceWarning: {' '.join(w.split())}" for w in r.get("warnings", [])]
        notes = [n.replace("|", "/") for n in notes]
        obj = f"{r['objective']:.6g}" if "objective" in r else ""
        lines.append(
            f"| {r['head']} | {r['n']:,} | {r['fit_s']:.2f} | {r['cpu_s']:.2f} | "
            f"{r['peak_mb']:.0f} (+{r['peak_mb'] - r['base_mb']:.0f}) | {r['train_acc']:.4f} | "
            f"{r['test_acc']:.4f} | {obj} | {'; '.join(notes)} |")
    return "\n".join(lines)


BLOCK_ORDER = ("api", "npz", "synthetic")
BLOCK_TITLES = {"api": "Real CNN codes (featurecache.api.load_features)",
                "npz": "Features from an .npz file", "synthetic": "Synthetic features"}
PREAMBLE = ("One block per feature source; a run replaces the block of its own source and leaves "
            "the others (and the other sections of this file) alone.")


def _existing_blocks(path: Path) -> dict[str, str]:
    """The ``### ...`` blocks of this script's section in ``path``, keyed by source kind."""
    if not path.exists():
        return {}
    m = re.search(rf"^## {re.escape(SECTION)}\n(.*?)(?=^## |\Z)", path.read_text(), re.S | re.M)
    if not m:
        return {}
    blocks = {}
    for chunk in re.split(r"^(?=### )", m.group(1), flags=re.M):
        for kind, title in BLOCK_TITLES.items():
            if chunk.startswith(f"### {title}\n"):
                blocks[kind] = chunk.strip()
    return blocks


def write_doc(path: Path, kind: str, block: str) -> None:
    """Replace this source's block inside the section "## Heads (scripts/bench_heads.py)"."""
    blocks = _existing_blocks(path)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    blocks[kind] = f"### {BLOCK_TITLES[kind]}\n\n_Measured {stamp}._\n\n{block.strip()}"
    body = "\n\n".join([PREAMBLE] + [blocks[k] for k in BLOCK_ORDER if k in blocks])
    from featurecache.bench import write_section

    write_section(path, SECTION, body)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["auto", "api", "npz", "synthetic"], default="auto",
                   help="where the features come from (default auto: npz if --features, else api, "
                        "else synthetic)")
    p.add_argument("--features", help="an .npz with X_train, y_train, X_test, y_test")
    p.add_argument("--heads", default=",".join(ALL_HEADS),
                   help=f"comma-separated heads (default: {','.join(ALL_HEADS)})")
    p.add_argument("--n-train", type=int, default=50000, help="training rows (default 50000)")
    p.add_argument("--slow-n-train", type=int, default=10000,
                   help=f"training rows for the slow heads {sorted(SLOW_HEADS)} (default 10000)")
    p.add_argument("--n-test", type=int, default=10000, help="test rows, synthetic source only")
    p.add_argument("--C", type=float, default=1.0, help="C of linsvc, LinearSVC, svc and logreg")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per head")
    p.add_argument("--output", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-dir", help=argparse.SUPPRESS)
    p.add_argument("--child-n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return

    names = [h.strip() for h in args.heads.split(",") if h.strip()]
    unknown = [h for h in names if h not in ALL_HEADS]
    if unknown:
        sys.exit(f"error: --heads {','.join(unknown)}: unknown; choose from {','.join(ALL_HEADS)}")
    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python scripts/bench_heads.py", shlex.join(given)]).strip()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    Xtr, ytr, Xte, yte, desc, kind = load_source(args)
    Xtr = np.ascontiguousarray(Xtr[: args.n_train], dtype=np.float32)
    ytr = np.asarray(ytr[: args.n_train])
    Xte = np.ascontiguousarray(Xte, dtype=np.float32)
    yte = np.asarray(yte)
    shape = Xtr.shape
    print(f"[bench] source: {desc}", flush=True)
    print(f"[bench] X_train {Xtr.shape} {Xtr.dtype}, X_test {Xte.shape}, "
          f"{len(np.unique(ytr))} classes, loaded in {time.perf_counter() - t0:.1f}s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_heads_") as tmp:
        for key, arr in (("X_train", Xtr), ("y_train", ytr), ("X_test", Xte), ("y_test", yte)):
            np.save(Path(tmp) / f"{key}.npy", arr)
        del Xtr, Xte
        for name in names:
            n = min(args.slow_n_train, args.n_train) if name in SLOW_HEADS else args.n_train
            print(f"[bench] {name} on {n} rows ...", flush=True)
            r = run_child(name, n, tmp, args)
            print(f"[bench]   fit {r['fit_s']:.2f}s (cpu {r['cpu_s']:.2f}s), peak RSS "
                  f"{r['peak_mb']:.0f} MB (+{r['peak_mb'] - r['base_mb']:.0f} while fitting), "
                  f"train {r['train_acc']:.4f}, test {r['test_acc']:.4f}", flush=True)
            rows.append(r)
    load_after = os.getloadavg()
    table = fmt_table(rows, args.C)
    body = "\n".join([
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}. Load average (1 min) before / after: "
        f"{load_before[0]:.2f} / {load_after[0]:.2f} (other jobs on the machine inflate wall times; "
        "the CPU column is this process's CPU time).",
        "",
        f"Features: {desc}. X_train {shape[0]:,} x {shape[1]:,} float32, {len(yte):,} test rows, "
        f"{len(np.unique(ytr))} classes.",
        "",
        f"Every head is fitted in a fresh process behind `make_pipeline(head, options, "
        f"normalize=\"l2\")` (L2Normalizer, in place, then the head); C = {args.C:g} for linsvc, "
        f"LinearSVC, svc and logreg; other options at their defaults. Fit s: wall time of "
        "`pipeline.fit`; peak RSS: the child's maximum resident memory during the fit (Linux "
        "VmHWM, reset after loading; the features, ~0.5 GB, are included), in brackets its "
        "growth over the resident memory before the fit. Accuracies: train on the n rows fitted, test on all "
        "test rows. Objective: the primal LinearSVC objective (squared hinge, L2, regularised "
        "intercept) of the fitted coefficients, the same for both rows.",
        "",
        table,
    ])
    print()
    print(body)
    if not args.no_write:
        write_doc(Path(args.output), kind, body)
        print(f"\n[bench] wrote block '{BLOCK_TITLES[kind]}' of section '## {SECTION}' in "
              f"{args.output}")


if __name__ == "__main__":
    main()
