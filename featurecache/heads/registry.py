"""The registry of heads: each head declared once, and the estimators and pipelines built from it.

A head is a named classifier recipe. Its declaration says everything the rest of the project needs
to know about it, so that nothing elsewhere tests a head's name: where the estimator class lives
(imported on first use: listing the heads should not pay for importing every estimator module),
which library implements it (recorded with every run), which CLI options apply, and whether it
takes a seed. :func:`make_head` builds the estimator from the options the user set and
:func:`make_pipeline` puts it behind a normalisation step (and an optional PCA). :func:`check_head`
checks a head's settings without building anything (``settings.HeadSpec`` calls it when built).

Nothing here imports scikit-learn at import time: the command line reads the head names, options
and normalisations from here to declare its choices, and must start without paying for it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from featurecache.errors import FeatureCacheError

from .options import OPTIONS, Option, option_flag, positive_int

if TYPE_CHECKING:
    from sklearn.base import BaseEstimator
    from sklearn.pipeline import Pipeline

__all__ = ["HEADS", "NORMALIZES", "Head", "check_head", "head_names", "make_head", "make_pipeline",
           "normalization", "with_seed"]

# Row scalings before the head (see make_pipeline); "auto" is made concrete per fit by `normalization`.
NORMALIZES = ("auto", "l2", "l2-per-tap", "standard", "none")
NORMALIZE_AUTO = {1: "l2"}  # one tap: whole-row unit norm; several: each tap first (l2-per-tap), see README

_SEED_PARAM = OPTIONS["seed"].param


@dataclass(frozen=True)
class Head:
    """One head, declared.

    name, description : str
        How users choose it (``--head``) and what ``--help`` says about it.
    estimator : str
        Import path of the estimator class, e.g. ``"sklearn.svm.SVC"``.
    library : str
        The distribution that implements it, as recorded with every run (``"scikit-learn"``).
    options : tuple of str
        The CLI options (names in :data:`~featurecache.heads.options.OPTIONS`) that apply, ``seed``
        excepted: see ``seeded``.
    seeded : bool
        Whether fitting it is random. A seeded head takes ``--seed`` (its ``random_state``) and gets
        ``random_state=0`` when none is given, so that runs are reproducible.
    fixed : tuple of (param, value)
        Estimator parameters this project always sets (e.g. the solver).
    defaults : tuple of (param, value)
        Estimator parameters set unless the user gives the option.
    streams : bool
        Whether it learns incrementally (``partial_fit``), so that ``fit`` can stream a training
        matrix larger than memory from the stored parts.
    """

    name: str
    description: str
    estimator: str
    library: str
    options: tuple[str, ...]
    seeded: bool = False
    fixed: tuple[tuple[str, Any], ...] = ()
    defaults: tuple[tuple[str, Any], ...] = ()
    streams: bool = False  # learns incrementally (partial_fit): can fit a matrix larger than memory

    def accepts(self, option: str) -> bool:
        return option in self.options or (option == "seed" and self.seeded)

    def estimator_class(self) -> type:
        module, _, name = self.estimator.rpartition(".")
        return getattr(importlib.import_module(module), name)

    def build(self, values: dict[str, Any]) -> BaseEstimator:
        """Estimator from already converted option values (calibrate excluded)."""
        params = dict(self.defaults)
        if self.seeded:
            params[_SEED_PARAM] = 0
        params.update({OPTIONS[name].param: v for name, v in values.items()})
        params.update(dict(self.fixed))
        return self.estimator_class()(**params)


class _Registry(dict):
    """A dict of heads whose missing keys raise FeatureCacheError listing the valid names."""

    def __missing__(self, name):
        raise FeatureCacheError(f"unknown head {name!r}; choose one of: {', '.join(self)}")


HEADS: dict[str, Head] = _Registry({
    h.name: h
    for h in [
        Head("linsvc", "linear SVM, squared hinge, one-vs-rest (FastLinearSVC: LinearSVC's "
             "optimum, float32 BLAS)", "featurecache.heads.linsvc.FastLinearSVC", "featurecache",
             ("C", "max_iter", "calibrate")),
        Head("svc", "kernel SVM (sklearn SVC, libsvm); slow beyond ~20k samples", "sklearn.svm.SVC",
             "scikit-learn", ("C", "kernel", "gamma", "max_iter", "calibrate"), seeded=True),
        # C=10, not scikit-learn's 1: on unit-norm codes C=1 is over-regularised (README, "Heads").
        Head("logreg", "multinomial logistic regression (lbfgs)",
             "sklearn.linear_model.LogisticRegression", "scikit-learn", ("C", "max_iter"),
             fixed=(("solver", "lbfgs"),), defaults=(("C", 10.0), ("max_iter", 300))),
        Head("mlp", "multi-layer perceptron (adam)", "sklearn.neural_network.MLPClassifier",
             "scikit-learn", ("hidden", "max_iter", "alpha"), seeded=True),
        Head("ridge", "ridge regression on +-1 targets (RidgeClassifier); --alpha ~ 1/(2C)",
             "sklearn.linear_model.RidgeClassifier", "scikit-learn", ("alpha", "calibrate")),
        Head("sgd", "linear SVM by stochastic gradient descent (hinge)",
             "sklearn.linear_model.SGDClassifier", "scikit-learn",
             ("alpha", "max_iter", "calibrate"), seeded=True, fixed=(("loss", "hinge"),),
             defaults=(("n_jobs", -1),), streams=True),
        Head("knn", "k nearest neighbours", "sklearn.neighbors.KNeighborsClassifier",
             "scikit-learn", ("k",), defaults=(("n_jobs", -1),)),
        Head("rf", "random forest", "sklearn.ensemble.RandomForestClassifier", "scikit-learn",
             ("n_estimators", "max_depth"), seeded=True, defaults=(("n_jobs", -1),)),
    ]
})


def head_names() -> list[str]:
    return list(HEADS)


def heads_with(option: str) -> list[str]:
    """Names of the heads that take ``option``, in registry order."""
    return [h.name for h in HEADS.values() if h.accepts(option)]


def get_head(name: str) -> Head:
    if not isinstance(name, str):
        raise FeatureCacheError(f"unknown head {name!r}; choose one of: {', '.join(HEADS)}")
    return HEADS[name]


def with_seed(name: str, options: dict, seed: int) -> dict:
    """``options`` plus ``seed`` when head ``name`` takes one and the options do not set it.

    For callers whose seed is global (the split, random weights and the head share ``--seed``).
    """
    return dict(options, seed=seed) if get_head(name).seeded and "seed" not in options else options


def check_option(head: Head, name: str, what: str | None = None) -> Option:
    """The option ``name`` if ``head`` takes it, else FeatureCacheError naming the heads that do."""
    what = what or option_flag(name)
    if name not in OPTIONS:
        raise FeatureCacheError(
            f"{what}: unknown option; options of the heads are: "
            f"{', '.join(option_flag(o) for o in OPTIONS)}"
        )
    if not head.accepts(name):
        hint = "; this head's regularisation is alpha (about 1/(2C))" if (
            name == "C" and head.accepts("alpha")) else ""
        raise FeatureCacheError(
            f"{what} does not apply to head {head.name!r} "
            f"(it applies to: {', '.join(heads_with(name))}){hint}"
        )
    return OPTIONS[name]


def convert_options(head: Head, options: dict | None) -> tuple[dict[str, Any], bool]:
    """(converted option values, calibrate) of the options the user set for ``head``.

    ``None`` means "not set" and ``calibrate=False`` is the same as not set. Values may be typed or
    strings (as from a command line). An option that does not apply to the head or a bad value
    raises :class:`FeatureCacheError` naming the culprit.
    """
    values = {}
    calibrate = False
    for opt, raw in (options or {}).items():
        if raw is None:
            continue
        if opt == "calibrate" and raw is False:
            continue
        option = check_option(head, opt)
        value = option.convert(opt, raw)
        if opt == "calibrate":
            calibrate = value
        else:
            values[opt] = value
    return values, calibrate


def normalization(normalize: str, taps: int) -> str:
    """``auto`` made concrete for a fit of ``taps`` taps."""
    return NORMALIZE_AUTO.get(taps, "l2-per-tap") if normalize == "auto" else normalize


def check_head(name: str, options: dict | None = None, normalize: str = "auto", pca: int | None = None) -> None:
    """FeatureCacheError naming the culprit unless head ``name`` exists and takes ``options`` (values
    checked as :func:`make_head` reads them), ``normalize`` is one of :data:`NORMALIZES` and ``pca`` is
    a positive integer."""
    convert_options(get_head(name), options)
    if normalize not in NORMALIZES:
        raise FeatureCacheError(f"--normalize must be one of {', '.join(NORMALIZES)}, got {normalize!r}")
    if pca is not None:
        positive_int("pca", pca)


def make_head(name: str, options: dict | None = None) -> BaseEstimator:
    """The estimator for head ``name`` with the options the user set.

    ``options`` maps option names (see :data:`OPTIONS`) to values (see :func:`convert_options`). An
    option that does not apply to the head, an unknown head or a bad value raises
    :class:`FeatureCacheError` naming the culprit.
    """
    head = get_head(name)
    values, calibrate = convert_options(head, options)
    estimator = head.build(values)
    if calibrate:
        from sklearn.calibration import CalibratedClassifierCV

        # Platt scaling fitted on 3-fold out-of-fold decision values, then one model refitted on
        # all of the train split (ensemble=False): what SVC(probability=True) did before
        # scikit-learn 1.9 deprecated it in favour of exactly this wrapper.
        estimator = CalibratedClassifierCV(estimator, method="sigmoid", cv=3, ensemble=False)
    return estimator


def make_pipeline(head_name: str, options: dict | None = None, normalize: str = "l2",
                  pca: int | None = None, blocks: tuple[int, ...] | None = None) -> Pipeline:
    """``normalize -> pca -> head`` as a scikit-learn Pipeline (steps are always present).

    normalize: ``"l2"`` -- :class:`L2Normalizer` (rows to unit norm, IN PLACE on float input:
    the caller's array is rescaled, which is harmless for cached features because the
    operation is idempotent); ``"standard"`` -- StandardScaler (fitted on what ``fit`` gets, i.e.
    the train split; works on a copy); ``"l2-per-tap"`` -- each block of columns (``blocks``: the
    taps' widths) to unit norm, then the row; ``"none"`` -- passthrough. ``pca``: number of PCA
    components (fitted on the train split), or None for no PCA.
    """
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from .normalize import L2Normalizer

    normalizers = {"l2": L2Normalizer, "l2-per-tap": lambda: L2Normalizer(blocks=tuple(blocks or ()) or None),
                   "standard": StandardScaler, "none": lambda: "passthrough"}
    if normalize not in normalizers:
        raise FeatureCacheError(
            f"--normalize must be one of {', '.join(normalizers)}, got {normalize!r}"
        )
    if pca is not None:
        pca = positive_int("pca", pca)
    head = make_head(head_name, options)
    return Pipeline(
        [
            ("normalize", normalizers[normalize]()),
            ("pca", PCA(n_components=pca, random_state=0) if pca else "passthrough"),
            ("head", head),
        ]
    )
