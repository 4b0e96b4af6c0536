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
imported here (and must stay importable from here).
"""

from __future__ import annotations

from .linsvc import FastLinearSVC, squared_hinge_objective
from .normalize import L2Normalizer
from .options import OPTIONS, Option, option_flag
from .registry import HEADS, Head, head_names, make_head, make_pipeline, with_seed
from .tuning import Scores, averaged, check_train_labels, fit_pipeline, grid_search, parse_grid, resolve_grid, scores

__all__ = [
    "HEADS",
    "OPTIONS",
    "Option",
    "option_flag",
    "Head",
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
