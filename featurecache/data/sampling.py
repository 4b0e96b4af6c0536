"""Seeded, stratified splits and subsets in numpy: the images scikit-learn's `train_test_split` picks.

Which images form a split decides which feature sets and runs a user has, so this must pick exactly
the images `train_test_split(..., random_state=seed, stratify=labels)` picked when featurecache used it
(tests/data/test_datasets.py compares the two on many cases). Importing scikit-learn costs ~1.3 s, more
than the rest of a cache hit, so the split is reproduced here: the same `RandomState` draws in the
same order as scikit-learn's `StratifiedShuffleSplit` and `ShuffleSplit` (stable since 0.24).
"""

from __future__ import annotations

import math

import numpy as np


def split_sizes(n_samples: int, test_size: float | int | None, train_size: float | int | None) -> tuple[int, int]:
    """(n_train, n_test) as scikit-learn's `_validate_shuffle_split` computes them."""
    if test_size is None and train_size is None:
        test_size = 0.25
    n_test = (math.ceil(test_size * n_samples) if isinstance(test_size, float)
              else test_size if test_size is not None else None)
    n_train = (math.floor(train_size * n_samples) if isinstance(train_size, float)
               else train_size if train_size is not None else None)
    if n_train is None:
        n_train = n_samples - n_test
    elif n_test is None:
        n_test = n_samples - n_train
    return int(n_train), int(n_test)


def approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Per-class draws closest to proportional; ties broken at random (scikit-learn's `_approximate_mode`)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need = int(n_draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need -= add_now
            if need == 0:
                break
    return floored.astype(int)


def train_test_indices(labels, seed: int, test_size: float | int | None = None,
                       train_size: float | int | None = None, stratify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) positions, in the order `train_test_split(np.arange(n), ...)` returns them."""
    labels = np.asarray(labels)
    n = len(labels)
    n_train, n_test = split_sizes(n, test_size, train_size)
    rng = np.random.RandomState(seed)
    if not stratify:
        order = rng.permutation(n)
        return order[n_test:n_test + n_train], order[:n_test]
    _, y = np.unique(labels, return_inverse=True)
    counts = np.bincount(y)
    by_class = np.split(np.argsort(y, kind="mergesort"), np.cumsum(counts)[:-1])
    n_i = approximate_mode(counts, n_train, rng)
    t_i = approximate_mode(counts - n_i, n_test, rng)
    train, test = [], []
    for i in range(len(counts)):
        members = by_class[i].take(rng.permutation(counts[i]), mode="clip")
        train.extend(members[:n_i[i]])
        test.extend(members[n_i[i]:n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)
