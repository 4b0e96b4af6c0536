"""The results ledger as a comparison table (method, library, seconds, train acc, test acc, notes)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .errors import FeatureCacheError

COLUMNS = ("run_id", "method", "library", "dims", "seconds", "train_acc", "test_acc", "notes")
FORMATS = ("table", "markdown", "csv")


def _row(r: dict) -> dict:
    return {"run_id": r["run_id"], "method": f"{r['features']} + {r['head']}", "library": r.get("library", ""),
            "dims": r.get("dims", ""), "seconds": f"{r['fit_seconds']:.2f}",
            "train_acc": f"{r['train_accuracy']:.4f}", "test_acc": f"{r['test_accuracy']:.4f}",
            "notes": r.get("notes") or ""}


def render(records: list[dict], fmt: str = "table") -> str:
    if fmt not in FORMATS:
        raise FeatureCacheError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    rows = [_row(r) for r in records]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, COLUMNS)
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue().rstrip("\n")
    if fmt == "markdown":
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    return "\n".join(lines + ["  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS) for r in rows])


def plot_runs(records: list[dict], path: Path) -> Path:
    from .plots import scatter_png

    points = [(r["fit_seconds"], r["test_accuracy"], f"{r['head']} {r['features']}") for r in records]
    return scatter_png(points, Path(path), "fit seconds (log)", "test accuracy", "Runs: test accuracy vs fit time")
