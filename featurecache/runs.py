"""Runs: a head fitted on one feature set, evaluated, saved with its provenance, and loaded again.

    <cache>/runs/<run id>/head.joblib    the fitted scikit-learn pipeline (normaliser, PCA, head)
    <cache>/runs/<run id>/run.json       provenance, metrics and the SHA-256 of head.joblib
    <cache>/runs/<run id>/confusion.png
    <cache>/runs/ledger.jsonl            one line per run, for `featurecache report`

joblib files are pickles, which can run code when loaded: a head is loaded only from the cache's runs
folder, and only when its bytes still hash to what was recorded when it was saved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import time
from pathlib import Path

import numpy as np

from . import versions
from .errors import FeatureCacheError
from .store import write_atomic


def runs_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "runs"


def new_run_id(head: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{head}-{secrets.token_hex(2)}"


def evaluate(pipeline, x_train, y_train, x_test, y_test, class_names, pred_test=None, pred_train=None) -> dict:
    """`pred_test`/`pred_train`: predictions made elsewhere (--tta averages views; a streamed fit predicts
    chunk by chunk), used instead of the pipeline's on `x_test`/`x_train`."""
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

    labels = list(range(len(class_names)))
    pred_test = pipeline.predict(x_test) if pred_test is None else pred_test
    pred_train = pipeline.predict(x_train) if pred_train is None else pred_train
    report = classification_report(y_test, pred_test, labels=labels, target_names=list(class_names),
                                   output_dict=True, zero_division=0)
    return {
        "train_accuracy": float(accuracy_score(y_train, pred_train)),
        "test_accuracy": float(accuracy_score(y_test, pred_test)),
        "per_class": {c: {k: round(float(report[c][k]), 4) for k in ("precision", "recall", "f1-score", "support")}
                      for c in class_names},
        "confusion_matrix": confusion_matrix(y_test, pred_test, labels=labels).tolist(),
    }


def save_run(cache_dir: Path, run_id: str, pipeline, record: dict) -> Path:
    """Write head, provenance and plot; append to the ledger last, so the ledger never names a half-saved run."""
    import joblib

    from .plots import confusion_png

    folder = runs_dir(cache_dir) / run_id
    folder.mkdir(parents=True, exist_ok=False)
    head_path = folder / "head.joblib"
    joblib.dump(pipeline, head_path)
    record = dict(record, run_id=run_id, head_sha256=_sha256(head_path),
                  libraries=versions.library_versions("scikit-learn", "numpy", "joblib", "tensorflow", "keras"),
                  created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    cm = np.asarray(record["metrics"]["confusion_matrix"])
    title = f"{record['head']} on {record['features']} — test accuracy {record['metrics']['test_accuracy']:.4f}"
    confusion_png(cm, record["class_names"], folder / "confusion.png", title)
    record["confusion_png"] = str(folder / "confusion.png")
    write_atomic(folder / "run.json", json.dumps(record, indent=1))
    ledger = runs_dir(cache_dir) / "ledger.jsonl"
    summary = {k: record[k] for k in ("run_id", "created", "data", "features", "head", "library", "notes",
                                      "fit_seconds", "dims", "n_train", "n_test")}
    summary.update(train_accuracy=record["metrics"]["train_accuracy"],
                   test_accuracy=record["metrics"]["test_accuracy"])
    with open(ledger, "a") as f:
        f.write(json.dumps(summary) + "\n")
    return folder


def load_record(cache_dir: Path, run_id: str) -> dict:
    path = runs_dir(cache_dir) / run_id / "run.json"
    if not path.is_file():
        known = sorted(p.name for p in runs_dir(cache_dir).glob("*/run.json"))
        hint = f"; the latest is {known[-1]}" if known else "; fit one with `featurecache fit`"
        raise FeatureCacheError(f"--run {run_id}: no such run in {runs_dir(cache_dir)}{hint}")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise FeatureCacheError(f"{path}: unreadable run record ({e}); fit the head again") from e


def load_head(cache_dir: Path, run_id: str):
    """(record, pipeline), refusing a head file whose bytes changed since it was saved."""
    import joblib

    record = load_record(cache_dir, run_id)
    head_path = runs_dir(cache_dir) / run_id / "head.joblib"
    if not head_path.is_file() or _sha256(head_path) != record.get("head_sha256"):
        raise FeatureCacheError(f"{head_path}: missing or changed since it was saved (hash mismatch); "
                                "refusing to unpickle it, fit the head again")
    return record, joblib.load(head_path)


def read_ledger(cache_dir: Path) -> list[dict]:
    path = runs_dir(cache_dir) / "ledger.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash; the run folder still holds the full record
    return out


def spec_dict(spec) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(spec).items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
