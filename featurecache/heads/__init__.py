"""Heads: light classifiers trained on cached feature matrices.

A *head* is a named recipe for a classifier (``linsvc``, ``svc``, ``logreg``, ``mlp``, ``ridge``,
``sgd``, ``knn``, ``rf``). The package is in five parts, each of which can change alone:

========================  ========================================================================
``heads.registry``        :data:`HEADS`, one declaration per head (estimator class, library,
                          options, seeded); :func:`make_head`, :func:`make_pipeline`
``heads.options``         :data:`OPTIONS`: the CLI options of the heads and their converters
``heads.tuning``          :func:`fit_pipeline`, :func:`parse_grid`, :func:`grid_search`,
                          :func:`scores`
``heads.linsvc``          :class:`FastLinearSVC`, the ``linsvc`` head (solver in ``heads._newton``)
``heads.normalize``       :class:`L2Normalizer`, the pipelines' default first step
========================  ========================================================================

Everything follows the scikit-learn estimator contract, so ``clone``, ``GridSearchCV`` and
``Pipeline`` work on it. Adding a head is one :class:`Head` line in ``heads.registry``.

Saved runs pickle these classes by module path: runs saved before the package split refer to
``featurecache.heads.FastLinearSVC`` and ``featurecache.heads.L2Normalizer``, which is why they are
importable from here (and must stay so). They are imported on first use (``__getattr__``): the
command line reads the registry to declare its choices, and scikit-learn is not worth importing for
``--help``.
"""

from __future__ import annotations

import importlib

from .options import OPTIONS, Option, option_flag
from .registry import (HEADS, NORMALIZES, Head, check_head, head_names, make_head, make_pipeline, normalization,
                       with_seed)
from .tuning import Scores, averaged, check_train_labels, fit_pipeline, grid_search, parse_grid, resolve_grid, scores

# Names whose modules import scikit-learn's estimator machinery: imported when first asked for.
_LAZY = {"FastLinearSVC": "linsvc", "squared_hinge_objective": "linsvc", "L2Normalizer": "normalize"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HEADS",
    "NORMALIZES",
    "OPTIONS",
    "Option",
    "option_flag",
    "Head",
    "check_head",
    "normalization",
    "FastLinearSVC",
    "L2Normalizer",
    "Scores",
    "averaged",
    "check_train_labels",
    "fit_pipeline",
    "grid_search",
    "head_names",
    "make_head",
    "make_pipeline",
    "parse_grid",
    "resolve_grid",
    "scores",
    "squared_hinge_objective",
    "with_seed",
]
