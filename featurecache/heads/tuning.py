"""Training, tuning and scoring of head pipelines: label checks, grid search, per-class scores.

Grid names are what users write (``C=0.1,1``) or pipeline parameters (``head__C``). Where an
option lives in a pipeline is read from the pipeline's own ``get_params()`` -- ``head__C`` for a
bare head, ``head__estimator__C`` behind a calibration wrapper, wherever a future wrapper puts it --
not from a table of prefixes kept by hand.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from featurecache.errors import FeatureCacheError

from .options import OPTIONS, parse_number, positive_int
from .registry import check_option, get_head, heads_with, make_pipeline

__all__ = ["Scores", "check_train_labels", "fit_pipeline", "grid_search", "parse_grid",
           "resolve_grid", "scores"]


def _plain(value):
    """numpy scalar -> Python scalar, for readable messages."""
    return value.item() if isinstance(value, np.generic) else value


def check_train_labels(y, min_per_class: int = 1, what: str = "the train split") -> None:
    """FeatureCacheError unless y holds at least two classes (and min_per_class of each)."""
    labels, counts = np.unique(np.asarray(y), return_counts=True)
    if len(labels) < 2:
        only = f" ({_plain(labels[0])!r})" if len(labels) else ""
        raise FeatureCacheError(
            f"{what} has only one class{only}; a classifier needs at least two: use more "
            "training samples or check the labels"
        )
    if counts.min() < min_per_class:
        raise FeatureCacheError(
            f"{what} has only {counts.min()} sample(s) of class {_plain(labels[counts.argmin()])!r} "
            f"but --cv {min_per_class} needs at least {min_per_class} of every class: lower --cv "
            "or use more training samples"
        )


def fit_pipeline(pipeline, X, y):
    """``pipeline.fit(X, y)`` after checking the labels (one class -> FeatureCacheError)."""
    check_train_labels(y)
    return pipeline.fit(X, y)


def _split_values(text: str) -> list[str]:
    sep = ";" if ";" in text else ","
    return [v.strip() for v in text.split(sep)]


def parse_grid(specs, target=None, calibrate: bool = False, head: str | None = None) -> dict:
    """``["C=0.01,0.1,1", "kernel=rbf,linear"]`` -> ``{"C": [0.01, 0.1, 1.0], "kernel": [...]}``.

    Values are parsed as int, float or string and then checked like the option itself (C must be
    positive, ...). Separate values with ``;`` instead of ``,`` when a value holds commas:
    ``hidden=512,100;256`` -> ``[(512, 100), (256,)]``.

    ``target`` maps the names to pipeline parameters and checks them (see :func:`resolve_grid`):
    a pipeline, or a head name (then say ``calibrate=True`` if it is wrapped). ``head`` is the
    registry name of the pipeline's head, when the caller has it: options the head does not take
    are refused and messages name it. Without ``target`` the option names are kept.
    """
    grid: dict[str, list] = {}
    for spec in specs or []:
        name, sep, text = str(spec).partition("=")
        name = name.strip()
        values = _split_values(text) if sep else []
        if not sep or not name or not values or any(v == "" for v in values):
            raise FeatureCacheError(
                f"--grid {spec!r} must look like NAME=V1,V2,... (e.g. --grid C=0.01,0.1,1,10)"
            )
        option = OPTIONS.get(name)
        if option is None or option.param is None:
            names = ", ".join(o for o, opt in OPTIONS.items() if opt.param is not None)
            raise FeatureCacheError(
                f"--grid {name}: not a parameter that can be searched; use one of: {names}"
            )
        if name in grid:
            raise FeatureCacheError(f"--grid {name} is given twice; give all its values at once")
        converted = []
        for v in values:
            try:
                converted.append(option.convert(name, parse_number(v)))
            except FeatureCacheError as e:
                raise FeatureCacheError(f"--grid {name}: {e}") from None
        grid[name] = converted
    if target is None:
        return grid
    if isinstance(target, str):
        head = target
        target = make_pipeline(target, {"calibrate": calibrate})
    return resolve_grid(target, grid, head)[0]


def _head_params(params: dict, param: str) -> list[str]:
    """Pipeline parameters of the head step named ``param``, nearest the head first."""
    found = [k for k in params if k.startswith("head__") and k.rsplit("__", 1)[1] == param]
    return sorted(found, key=lambda k: k.count("__"))


def resolve_grid(pipeline, grid: dict, head: str | None = None) -> tuple[dict, dict]:
    """Grid with pipeline parameter names, and the map back to the names shown to users.

    An option name (``C``) becomes the head parameter that ``pipeline.get_params()`` holds for it;
    a pipeline parameter (``head__estimator__C``) is kept if the pipeline has it. ``head``, when
    given, is the registry name of the pipeline's head: it names the head in messages and refuses
    the options that head does not declare (even where its estimator happens to have the parameter).
    """
    if not hasattr(pipeline, "get_params"):
        raise TypeError(f"expected a pipeline from make_pipeline, got {type(pipeline).__name__}")
    params = pipeline.get_params()
    estimator = params.get("head")
    label = repr(head) if head else type(getattr(estimator, "estimator", None) or estimator).__name__
    user_name = {o.param: o.name for o in OPTIONS.values() if o.param is not None}
    resolved, names = {}, {}
    for name, values in grid.items():
        if "__" in name:
            if name not in params:
                raise FeatureCacheError(f"--grid {name}: the pipeline has no parameter {name}")
            tail = name.rsplit("__", 1)[1]
            is_head = name in _head_params(params, tail)
            resolved[name], names[name] = list(values), (user_name.get(tail, name) if is_head else name)
            continue
        option = OPTIONS.get(name)
        keys = _head_params(params, option.param) if option is not None and option.param else []
        if head is not None and keys:
            check_option(get_head(head), name, what=f"--grid {name}")
        if not keys:
            applies = heads_with(name)
            hint = f" (it applies to: {', '.join(applies)})" if applies else ""
            raise FeatureCacheError(f"--grid {name}: head {label} has no parameter {name}{hint}")
        resolved[keys[0]], names[keys[0]] = list(values), name
    return resolved, names


def grid_search(pipeline, grid: dict, X, y, cv: int = 3, seed: int = 0, head: str | None = None):
    """Cross-validated grid search on (X, y) -- the train split only -- and refit of the best.

    ``grid`` maps option names (``C``) or pipeline parameters (``head__C``) to lists of values,
    as :func:`parse_grid` returns; ``head`` as in :func:`resolve_grid`. Returns ``(best fitted
    pipeline, [(params, mean, std), ...])`` with one entry per grid point in grid order, params
    keyed by the names users know, scores = accuracy over ``cv`` stratified shuffled folds
    (``seed``).
    """
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    cv = positive_int("cv", cv)
    if cv < 2:
        raise FeatureCacheError(f"--cv must be at least 2, got {cv}")
    resolved, names = resolve_grid(pipeline, grid, head)
    check_train_labels(y, min_per_class=cv)
    search = GridSearchCV(
        pipeline,
        resolved,
        cv=StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed),
        refit=True,
        error_score="raise",
    )
    search.fit(X, y)
    res = search.cv_results_
    table = [
        ({names[k]: v for k, v in params.items()}, float(mean), float(std))
        for params, mean, std in zip(res["params"], res["mean_test_score"], res["std_test_score"])
    ]
    return search.best_estimator_, table


class Scores(NamedTuple):
    """Per-class scores of a fitted pipeline on X.

    kind: ``"probability"`` (predict_proba) or ``"decision"`` (decision_function; a binary
    decision d is expanded to the two columns ``[-d, d]``). values: (n, n_classes) in
    ``classes`` order. top_labels / top_scores: (n, top), best first.
    """

    kind: str
    classes: np.ndarray
    values: np.ndarray
    top_labels: np.ndarray
    top_scores: np.ndarray


def scores(pipeline, X, top: int = 5) -> Scores:
    """Scores for prediction: probabilities where the head has them, else decision values."""
    return averaged(pipeline, [X], top)


def averaged(pipeline, views, top: int = 5) -> Scores:
    """`scores` averaged over several views of the same rows (test-time augmentation: the images and,
    row for row, their augmented views)."""
    if hasattr(pipeline, "predict_proba"):
        kind, values = "probability", np.mean([np.asarray(pipeline.predict_proba(X)) for X in views], axis=0)
    elif hasattr(pipeline, "decision_function"):
        kind, values = "decision", np.mean([np.asarray(pipeline.decision_function(X)) for X in views], axis=0)
        if values.ndim == 1:
            values = np.column_stack([-values, values])
    else:
        raise FeatureCacheError("the head gives neither probabilities nor decision values")
    classes = np.asarray(pipeline.classes_)
    k = min(positive_int("top", top), len(classes))
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    return Scores(kind, classes, values, classes[order], np.take_along_axis(values, order, axis=1))
