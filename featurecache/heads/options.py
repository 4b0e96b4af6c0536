"""The heads' options: how the CLI names them, which estimator parameter each sets, how values are read.

Option names (shared with the CLI): ``C``, ``kernel``, ``gamma``, ``hidden``, ``max_iter``, ``seed``,
``max_depth``, ``k``, ``n_estimators``, ``alpha``, ``calibrate``. Values may arrive typed or as
strings (from a command line or a ``--grid`` spec); each converter checks and converts one value
and raises :class:`FeatureCacheError` naming the option. Which heads take which options is declared
in :mod:`featurecache.heads.registry`.

Regularisation choice for ``ridge``: it keeps scikit-learn's own ``alpha`` (larger = stronger,
default 1.0) rather than a translated ``C``; to compare with the ``C`` of the hinge/logistic heads,
``alpha`` is about ``1 / (2 C)`` (``0.5 ||w||^2 + C sum loss`` has the same minimiser as
``sum loss + ||w||^2 / (2C)``). ``sgd`` and ``mlp`` also take ``alpha`` in scikit-learn's meaning.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from featurecache.errors import FeatureCacheError

__all__ = ["OPTIONS", "Option", "option_flag", "parse_number", "positive_int"]


def option_flag(name: str) -> str:
    """How the CLI spells option ``name`` in messages: ``max_iter`` -> ``--max-iter``."""
    return "--" + name.replace("_", "-")


def parse_number(text):
    """'10' -> 10, '0.1' -> 0.1, '1e-3' -> 0.001, anything else stays a string."""
    if isinstance(text, str):
        t = text.strip()
        for cast in (int, float):
            try:
                return cast(t)
            except ValueError:
                pass
        return t
    return text


def _positive_float(name, value):
    v = parse_number(value)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
        raise FeatureCacheError(f"{option_flag(name)} must be a positive number, got {value!r}")
    return float(v)


def positive_int(name, value):
    v = parse_number(value)
    if isinstance(v, numbers.Real) and not isinstance(v, bool) and float(v).is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise FeatureCacheError(f"{option_flag(name)} must be a positive integer, got {value!r}")
    return int(v)


def _seed(name, value):
    v = parse_number(value)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v < 2**32:
        raise FeatureCacheError(
            f"{option_flag(name)} must be an integer between 0 and 2**32 - 1, got {value!r}"
        )
    return int(v)


def _choice(*choices):
    def convert(name, value):
        if value not in choices:
            raise FeatureCacheError(
                f"{option_flag(name)} must be one of {', '.join(choices)}, got {value!r}"
            )
        return value

    return convert


def _gamma(name, value):
    if value in ("scale", "auto"):
        return value
    v = parse_number(value)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
        raise FeatureCacheError(
            f"{option_flag(name)} must be 'scale', 'auto' or a positive number, got {value!r}"
        )
    return float(v)


def _hidden(name, value):
    """'512,100' -> (512, 100); 256 -> (256,); [512, 100] -> (512, 100)."""
    parts = value.replace(" ", "").split(",") if isinstance(value, str) else value
    if isinstance(parts, numbers.Integral) and not isinstance(parts, bool):
        parts = [parts]
    try:
        sizes = tuple(int(p) for p in parts)
        ok = len(sizes) > 0 and all(s >= 1 and str(s) == str(p).strip() for s, p in zip(sizes, parts))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise FeatureCacheError(
            f"{option_flag(name)} must be hidden layer sizes like 512,100 (positive integers), "
            f"got {value!r}"
        )
    return sizes


def _boolean(name, value):
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise FeatureCacheError(f"{option_flag(name)} must be true or false, got {value!r}")


@dataclass(frozen=True)
class Option:
    """A CLI option of the heads: its name, the estimator parameter it sets, its converter, and the
    type the command line reads it as (``featurecache.cli.options`` makes ``fit``'s flags from these)."""

    name: str
    param: str | None  # None: handled by make_head itself (calibrate)
    convert: Callable[[str, Any], Any]
    help: str
    kind: type = str  # float, int, bool (a switch) or str (the converter reads the text)


OPTIONS: dict[str, Option] = {
    o.name: o
    for o in [
        Option("C", "C", _positive_float, "inverse regularisation strength (larger = weaker)", float),
        Option("kernel", "kernel", _choice("linear", "poly", "rbf", "sigmoid"), "SVC kernel"),
        Option("gamma", "gamma", _gamma, "RBF/poly/sigmoid kernel width: scale, auto or a number"),
        Option("hidden", "hidden_layer_sizes", _hidden, "MLP hidden layer sizes, e.g. 512,100"),
        Option("max_iter", "max_iter", positive_int, "iteration limit of the solver", int),
        Option("seed", "random_state", _seed, "random seed (default 0: runs are reproducible)", int),
        Option("max_depth", "max_depth", positive_int, "maximum tree depth (default: unlimited)", int),
        Option("k", "n_neighbors", positive_int, "number of neighbours", int),
        Option("n_estimators", "n_estimators", positive_int, "number of trees", int),
        Option("alpha", "alpha", _positive_float,
               "regularisation strength (larger = stronger); for ridge about 1/(2C)", float),
        Option("calibrate", None, _boolean,
               "give probabilities: CalibratedClassifierCV(sigmoid, 3 folds, ensemble=False)", bool),
    ]
}
