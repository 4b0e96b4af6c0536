"""The heads' declarations are true of the estimators they build, and grid names come from get_params."""

from __future__ import annotations

import importlib.metadata
import pickle
import warnings

import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from featurecache.errors import FeatureCacheError
from featurecache.heads import (HEADS, OPTIONS, FastLinearSVC, L2Normalizer, grid_search, make_head, make_pipeline,
                                parse_grid, scores, with_seed)


@pytest.fixture(scope="module")
def small_digits():
    X, y = load_digits(return_X_y=True)
    return X[:600].astype(np.float32), y[:600], X[600:800].astype(np.float32)


def _fit_outputs(name, options, data):
    Xtr, ytr, Xte = data
    pipe = make_pipeline(name, dict({"max_iter": 60, "hidden": "32"} if name == "mlp" else {}, **options))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe.fit(Xtr.copy(), ytr)
    return scores(pipe, Xte.copy()).values


@pytest.mark.parametrize("name", list(HEADS))
def test_declaration_matches_the_estimator(name):
    head = HEADS[name]
    est = make_head(name)
    assert type(est) is head.estimator_class()
    # the declared library is the distribution that ships the estimator's module
    top = type(est).__module__.split(".")[0]
    assert head.library in importlib.metadata.packages_distributions()[top]
    params = est.get_params()
    for option in head.options:
        if OPTIONS[option].param is not None:  # calibrate wraps instead of setting a parameter
            assert OPTIONS[option].param in params, (name, option)
    if head.seeded:
        assert params["random_state"] == 0  # reproducible unless the user asks otherwise
        assert make_head(name, {"seed": 7}).get_params()["random_state"] == 7
        assert with_seed(name, {}, 5) == {"seed": 5} and with_seed(name, {"seed": 1}, 5) == {"seed": 1}
    else:
        with pytest.raises(FeatureCacheError, match="--seed does not apply"):
            make_head(name, {"seed": 7})
        assert with_seed(name, {"C": 1.0}, 5) == {"C": 1.0}


@pytest.mark.parametrize("name", list(HEADS))
def test_a_fit_is_reproducible(name, small_digits):
    """Unseeded heads must be deterministic; seeded ones are, given their default seed."""
    np.testing.assert_array_equal(_fit_outputs(name, {}, small_digits), _fit_outputs(name, {}, small_digits))


@pytest.mark.parametrize("name", [n for n, h in HEADS.items() if h.seeded and n != "svc"])
def test_the_seed_reaches_a_random_head(name, small_digits):
    # (svc declares a seed but libsvm only uses it for probability estimates, which we calibrate instead)
    a = _fit_outputs(name, {"seed": 0}, small_digits)
    b = _fit_outputs(name, {"seed": 1}, small_digits)
    assert not np.array_equal(a, b)


def test_grid_names_come_from_the_pipelines_params():
    """A head the registry never built, nested two ways: the option still finds its parameter."""
    nested = Pipeline([("normalize", L2Normalizer()), ("pca", "passthrough"),
                       ("head", Pipeline([("scale", StandardScaler()), ("clf", SVC())]))])
    assert parse_grid(["C=1,10", "kernel=rbf"], nested) == {"head__clf__C": [1.0, 10.0],
                                                           "head__clf__kernel": ["rbf"]}
    wrapped = make_pipeline("linsvc", {}).set_params(head=CalibratedClassifierCV(LogisticRegression()))
    assert parse_grid(["C=0.5"], wrapped) == {"head__estimator__C": [0.5]}
    # pipeline parameter names pass through, and the table speaks the user's names back
    X, y = load_digits(return_X_y=True)
    best, table = grid_search(make_pipeline("logreg", {"max_iter": 200}), {"head__C": [0.1, 1.0]},
                              X[:300].astype(np.float32), y[:300], cv=2)
    assert [p for p, _, _ in table] == [{"C": 0.1}, {"C": 1.0}]


def test_runs_saved_before_the_package_split_still_load(small_digits):
    """Old head.joblib files name featurecache.heads.FastLinearSVC / L2Normalizer: still importable there."""
    Xtr, ytr, Xte = small_digits
    pipe = make_pipeline("linsvc", {}).fit(Xtr.copy(), ytr)
    blob = pickle.dumps(pipe, protocol=0)  # protocol 0 spells classes as "module\nname\n" lines
    assert b"featurecache.heads.linsvc\nFastLinearSVC" in blob
    old = blob.replace(b"featurecache.heads.linsvc\n", b"featurecache.heads\n")
    old = old.replace(b"featurecache.heads.normalize\n", b"featurecache.heads\n")
    assert b"featurecache.heads.linsvc" not in old and b"featurecache.heads.normalize" not in old
    loaded = pickle.loads(old)
    assert isinstance(loaded.named_steps["head"], FastLinearSVC)
    np.testing.assert_array_equal(loaded.decision_function(Xte.copy()), pipe.decision_function(Xte.copy()))


def test_fast_linear_svc_declares_its_constraints():
    """Parameters are checked from the declared constraints, naming the parameter."""
    X, y = load_digits(return_X_y=True)
    for bad, word in (({"C": 0}, "'C'"), ({"max_iter": 1.5}, "'max_iter'"),
                      ({"fit_intercept": "yes"}, "'fit_intercept'")):
        with pytest.raises(ValueError, match=word):
            FastLinearSVC(**bad).fit(X[:50], y[:50])
    with pytest.raises(ValueError, match="'copy'"):
        L2Normalizer(copy="no").fit(X[:5])


# Parameters each estimator had when runs were first saved (featurecache 0.1.0): a pickle from then has
# these attributes only, and must still transform and predict after parameters are added.
SAVED_WITH = {L2Normalizer: {"copy"},
              FastLinearSVC: {"C", "tol", "max_iter", "intercept_scaling", "fit_intercept", "verbose"}}


@pytest.mark.parametrize("cls", list(SAVED_WITH), ids=lambda c: c.__name__)
def test_an_estimator_pickled_before_a_new_parameter_still_works(cls, small_digits):
    Xtr, ytr, Xte = small_digits
    est = cls().fit(Xtr.copy(), ytr)
    state = est.__getstate__()
    for name in set(cls().get_params()) - SAVED_WITH[cls]:
        state.pop(name, None)  # what an older pickle lacks
    old = cls.__new__(cls)
    old.__setstate__(state)
    if cls is L2Normalizer:
        np.testing.assert_array_equal(old.transform(Xte.copy()), est.transform(Xte.copy()))
    else:
        np.testing.assert_array_equal(old.decision_function(Xte), est.decision_function(Xte))
