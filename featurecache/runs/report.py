"""The results ledger as a comparison table (method, library, seconds, train acc, test acc, notes).

The method column is each run's own `Run.describe()`: every setting that makes two runs differ."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..errors import FeatureCacheError
from .record import Run

COLUMNS = ("run_id", "method", "library", "dims", "seconds", "train_acc", "test_acc", "notes")
FORMATS = ("table", "markdown", "csv")


def _row(r: Run) -> dict:
    m = r.metrics
    return {"run_id": r.id, "method": r.describe(), "library": r.library, "dims": r.dims or "",
            "seconds": f"{r.fit_seconds:.2f}", "train_acc": f"{m.get('train_accuracy', float('nan')):.4f}",
            "test_acc": f"{m.get('test_accuracy', float('nan')):.4f}", "notes": r.notes}


def render(records: list[Run], fmt: str = "table") -> str:
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


def plot_runs(records: list[Run], path: Path) -> Path:
    from .plots import scatter_png

    points = [(r.fit_seconds, r.metrics.get("test_accuracy", float("nan")), f"{r.head} {r.features}")
              for r in records]
    return scatter_png(points, Path(path), "fit seconds (log)", "test accuracy", "Runs: test accuracy vs fit time")
