"""PNG plots for results people would rather see than read. Matplotlib, headless (Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_png(cm: np.ndarray, class_names, path: Path, title: str) -> Path:
    plt = _pyplot()
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * n + 2), max(4, 0.6 * n + 1.5)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    top = cm.max() if cm.size else 0
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scatter_png(points: list[tuple[float, float, str]], path: Path, xlabel: str, ylabel: str, title: str,
                logx: bool = True) -> Path:
    """One labelled point per run (e.g. fit seconds against test accuracy)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for x, y, label in points:
        ax.scatter([max(x, 1e-3)], [y])
        ax.annotate(label, (max(x, 1e-3), y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def lines_png(series: dict[str, list[tuple[object, float]]], path: Path, xlabel: str, ylabel: str,
              title: str, order: list | None = None) -> Path:
    """One line per series over a categorical x axis (e.g. accuracy by layer, one line per size).

    `order` ranks the categories (e.g. layers by depth), for series that hold different subsets of them;
    without it, categories appear in the order first seen.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = list(dict.fromkeys(x for pts in series.values() for x, _ in pts))
    if order:
        rank = {x: i for i, x in enumerate(order)}
        xs.sort(key=lambda x: rank.get(x, len(rank)))
    for name, pts in series.items():
        pts = sorted(pts, key=lambda p: xs.index(p[0]))
        ax.plot([xs.index(x) for x, _ in pts], [y for _, y in pts], marker="o", label=name)
    ax.set_xticks(range(len(xs)), [str(x) for x in xs], rotation=30, ha="right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
