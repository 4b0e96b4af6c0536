"""Tests of featurecache.heads: registry, pipelines, grid search, scores and FastLinearSVC."""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.svm import LinearSVC
from sklearn.utils.estimator_checks import check_estimator

from featurecache.errors import FeatureCacheError
from featurecache.heads import (HEADS, FastLinearSVC, L2Normalizer, fit_pipeline, grid_search, make_head,
                                make_pipeline, parse_grid, scores, squared_hinge_objective)

PROBABILISTIC = {"logreg", "mlp", "knn", "rf"}


def _l2(X):
    X = np.array(X, dtype=np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X


@pytest.fixture(scope="module")
def digits():
    """Real data: sklearn digits, float32, stratified train/test split."""
    X, y = load_digits(return_X_y=True)
    return train_test_split(X.astype(np.float32), y, test_size=0.3, random_state=0, stratify=y)


@pytest.fixture(scope="module")
def digits_codes():
    """Digits lifted to 512 non-negative, L2-normalised dims, like pooled CNN codes.

    512 > the solver's subspace rank, so FastLinearSVC's preconditioned Newton-CG path runs
    (on the 64-dim digits the subspace is the whole space and the warm start is exact Newton).
    """
    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    F = _l2(np.maximum(X @ rng.standard_normal((64, 512)) / 8 + 0.5, 0))
    return train_test_split(F, y, test_size=0.3, random_state=0, stratify=y)


def _quiet_fit(est, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, y)


# ----------------------------------------------------------------------------- every head


@pytest.mark.parametrize("name", list(HEADS))
def test_every_head_fits_and_predicts_through_make_pipeline(name, digits):
    Xtr, Xte, ytr, yte = digits
    options = {"max_iter": 80, "hidden": "64"} if name == "mlp" else {}
    pipe = make_pipeline(name, options)
    assert [s for s, _ in pipe.steps] == ["normalize", "pca", "head"]
    _quiet_fit(pipe, Xtr.copy(), ytr)
    pred = pipe.predict(Xte.copy())
    assert pred.shape == yte.shape
    assert set(np.unique(pred)) <= set(np.unique(ytr))
    assert (pred == yte).mean() > 0.85, name
    s = scores(pipe, Xte[:7].copy(), top=3)
    assert s.kind == ("probability" if name in PROBABILISTIC else "decision")
    assert s.values.shape == (7, 10)
    assert s.top_labels.shape == s.top_scores.shape == (7, 3)
    assert np.all(np.diff(s.top_scores, axis=1) <= 0)  # best first
    if s.kind == "probability":
        np.testing.assert_allclose(s.values.sum(axis=1), 1.0, rtol=1e-6)
    else:  # argmax of the decision values is the prediction
        np.testing.assert_array_equal(s.top_labels[:, 0], pipe.predict(Xte[:7].copy()))


@pytest.mark.parametrize("name", ["linsvc", "ridge", "sgd", "svc"])
def test_calibrate_gives_probabilities(name, digits):
    Xtr, Xte, ytr, yte = digits
    pipe = _quiet_fit(make_pipeline(name, {"calibrate": True}), Xtr.copy(), ytr)
    s = scores(pipe, Xte.copy())
    assert s.kind == "probability"
    np.testing.assert_allclose(s.values.sum(axis=1), 1.0, rtol=1e-6)
    assert (pipe.predict(Xte.copy()) == yte).mean() > 0.85


def test_calibrate_false_counts_as_not_set():
    assert isinstance(make_head("logreg", {"calibrate": False, "C": None}), type(make_head("logreg")))


def test_binary_decision_is_expanded_to_two_columns(digits):
    Xtr, Xte, ytr, _ = digits
    yb = np.where(ytr == 3, "three", "other")
    pipe = fit_pipeline(make_pipeline("linsvc", {}), Xtr.copy(), yb)
    s = scores(pipe, Xte.copy(), top=5)
    d = pipe.decision_function(Xte.copy())
    assert s.kind == "decision" and list(s.classes) == ["other", "three"]
    np.testing.assert_allclose(s.values, np.column_stack([-d, d]))
    assert s.top_labels.shape == (len(Xte), 2)  # top is capped at the number of classes
    np.testing.assert_array_equal(s.top_labels[:, 0], pipe.predict(Xte.copy()))


def test_options_reach_the_estimator():
    assert make_head("mlp", {"hidden": "512,100"}).hidden_layer_sizes == (512, 100)
    assert make_head("mlp", {"hidden": 64}).hidden_layer_sizes == (64,)
    assert make_head("knn", {"k": "7"}).n_neighbors == 7
    svc = make_head("svc", {"C": "10", "kernel": "linear", "seed": 3, "calibrate": True})
    assert (svc.method, svc.cv, svc.ensemble) == ("sigmoid", 3, False)
    assert (svc.estimator.C, svc.estimator.kernel, svc.estimator.random_state) == (10.0, "linear", 3)
    rf = make_head("rf", {"max_depth": 5, "n_estimators": 20})
    assert (rf.max_depth, rf.n_estimators, rf.n_jobs, rf.random_state) == (5, 20, -1, 0)
    assert make_head("logreg", {"C": 2, "max_iter": 50}).get_params()["solver"] == "lbfgs"
    assert make_head("sgd", {}).loss == "hinge"
    assert make_head("ridge", {"alpha": 0.5}).alpha == 0.5
    lin = make_head("linsvc", {"C": 0.5, "max_iter": 7, "calibrate": True})
    assert lin.estimator.C == 0.5 and lin.estimator.max_iter == 7


def test_make_pipeline_normalize_and_pca(digits):
    Xtr, Xte, ytr, yte = digits
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    std = make_pipeline("logreg", {"max_iter": 500}, normalize="standard", pca=20)
    assert isinstance(std.named_steps["normalize"], StandardScaler)
    assert isinstance(std.named_steps["pca"], PCA) and std.named_steps["pca"].n_components == 20
    before = Xtr.copy()
    _quiet_fit(std, Xtr, ytr)
    np.testing.assert_array_equal(Xtr, before)  # standard scaling works on a copy
    assert std.named_steps["pca"].components_.shape == (20, 64)
    assert std.score(Xte, yte) > 0.85
    none = make_pipeline("linsvc", {}, normalize="none")
    assert none.named_steps["normalize"] == "passthrough"
    assert none.fit(Xtr, ytr).score(Xte, yte) > 0.85
    with pytest.raises(FeatureCacheError, match="--normalize"):
        make_pipeline("linsvc", {}, normalize="l1")
    with pytest.raises(FeatureCacheError, match="--pca"):
        make_pipeline("linsvc", {}, pca=0)


# ----------------------------------------------------------------------------- estimator contract


def test_get_set_params_and_clone_roundtrip(digits):
    Xtr, _, ytr, _ = digits
    pipe = make_pipeline("linsvc", {"C": 0.5})
    params = pipe.get_params()
    assert params["head__C"] == 0.5 and params["normalize__copy"] is False
    pipe.set_params(head__C=2.0, head__tol=1e-5, normalize__copy=True)
    assert pipe.named_steps["head"].C == 2.0 and pipe.named_steps["head"].tol == 1e-5
    twin = clone(pipe)
    assert twin.get_params()["head__C"] == 2.0 and twin.get_params()["normalize__copy"] is True
    assert twin.named_steps["head"] is not pipe.named_steps["head"]
    pipe.fit(Xtr, ytr)
    assert hasattr(pipe.named_steps["head"], "coef_")
    fresh = clone(pipe)
    assert not hasattr(fresh.named_steps["head"], "coef_")
    est = FastLinearSVC(C=3.0, tol=1e-3, max_iter=50, intercept_scaling=2.0, fit_intercept=False)
    assert FastLinearSVC(**est.get_params()).get_params() == est.get_params()
    assert clone(est).get_params() == est.get_params()


@pytest.mark.parametrize("estimator", [FastLinearSVC(), L2Normalizer(), L2Normalizer(copy=True)],
                         ids=["FastLinearSVC", "L2Normalizer", "L2Normalizer-copy"])
def test_sklearn_check_estimator(estimator):
    # The full suite, nothing skipped (FastLinearSVC: dense and sparse input, float32/64,
    # one-class error mentioning "class", pickling, idempotent fit, ...).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(estimator, on_fail=None)
    failed = [(r["check_name"], repr(r["exception"])) for r in results if r["status"] == "failed"]
    assert not failed
    assert len(results) > 40


def test_sklearn_gridsearchcv_over_head_C(digits):
    Xtr, Xte, ytr, yte = digits
    search = GridSearchCV(make_pipeline("linsvc", {}), {"head__C": [0.1, 1.0, 10.0]}, cv=3)
    search.fit(Xtr, ytr)
    assert search.best_params_["head__C"] in (0.1, 1.0, 10.0)
    assert len(search.cv_results_["mean_test_score"]) == 3
    assert search.score(Xte, yte) > 0.9


def test_grid_search_helper(digits):
    Xtr, Xte, ytr, yte = digits
    pipe = make_pipeline("svc", {})
    grid = parse_grid(["C=0.1,10", "kernel=rbf,linear"], pipe)
    assert grid == {"head__C": [0.1, 10.0], "head__kernel": ["rbf", "linear"]}
    best, table = grid_search(pipe, grid, Xtr, ytr, cv=3, seed=0)
    assert len(table) == 4
    assert all(set(p) == {"C", "kernel"} for p, _, _ in table)  # the user's names
    assert all(0 <= m <= 1 and s >= 0 for _, m, s in table)
    best_row = max(table, key=lambda row: row[1])
    assert best.named_steps["head"].C == best_row[0]["C"]
    assert best.named_steps["head"].kernel == best_row[0]["kernel"]
    assert best.score(Xte, yte) > 0.9  # refit on the whole train split
    # option names straight from parse_grid work too, also through a calibration wrapper
    cal = make_pipeline("linsvc", {"calibrate": True})
    best, table = grid_search(cal, parse_grid(["C=0.1,1"]), Xtr, ytr, cv=3)
    assert [p for p, _, _ in table] == [{"C": 0.1}, {"C": 1.0}]
    assert best.named_steps["head"].estimator.C in (0.1, 1.0)


def test_parse_grid_values():
    assert parse_grid(["C=0.01,0.1,1,10"]) == {"C": [0.01, 0.1, 1.0, 10.0]}
    assert parse_grid(["k=1,5", "kernel=rbf,linear"]) == {"k": [1, 5], "kernel": ["rbf", "linear"]}
    assert parse_grid(["hidden=512,100;256"]) == {"hidden": [(512, 100), (256,)]}
    assert parse_grid(["gamma=scale,0.5"]) == {"gamma": ["scale", 0.5]}
    assert parse_grid(["C=1,10"], "linsvc") == {"head__C": [1.0, 10.0]}
    assert parse_grid(["C=1"], "linsvc", calibrate=True) == {"head__estimator__C": [1.0]}
    assert parse_grid(["hidden=64"], make_pipeline("mlp", {})) == {
        "head__hidden_layer_sizes": [(64,)]}
    assert parse_grid([]) == {}


# ----------------------------------------------------------------------------- user errors


def _one_line_error(fn) -> str:
    with pytest.raises(FeatureCacheError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_option_that_does_not_apply_names_option_and_heads():
    msg = _one_line_error(lambda: make_head("linsvc", {"kernel": "rbf"}))
    assert msg == "--kernel does not apply to head 'linsvc' (it applies to: svc)"
    msg = _one_line_error(lambda: make_head("ridge", {"C": 1.0}))
    assert "--C" in msg and "'ridge'" in msg and "linsvc, svc, logreg" in msg and "alpha" in msg
    msg = _one_line_error(lambda: make_pipeline("knn", {"max_iter": 5}))
    assert "--max-iter" in msg and "'knn'" in msg


def test_unknown_head_and_option_and_bad_values():
    msg = _one_line_error(lambda: make_head("xgboost", {}))
    assert "'xgboost'" in msg and all(name in msg for name in HEADS)
    msg = _one_line_error(lambda: HEADS["xgboost"])  # the registry itself says the same
    assert "'xgboost'" in msg and "linsvc" in msg
    assert "--colour" in _one_line_error(lambda: make_head("linsvc", {"colour": "red"}))
    assert "--C must be a positive number" in _one_line_error(lambda: make_head("svc", {"C": -1}))
    assert "--kernel must be one of" in _one_line_error(lambda: make_head("svc", {"kernel": "x"}))
    assert "--hidden" in _one_line_error(lambda: make_head("mlp", {"hidden": "512,,x"}))
    assert "--k must be a positive integer" in _one_line_error(lambda: make_head("knn", {"k": 0}))
    assert "--seed" in _one_line_error(lambda: make_head("rf", {"seed": -3}))
    assert "--calibrate" in _one_line_error(lambda: make_head("linsvc", {"calibrate": "maybe"}))


def test_bad_grid_parameter_is_named():
    svc = make_pipeline("svc", {})
    msg = _one_line_error(lambda: parse_grid(["k=1,3"], svc, head="svc"))
    assert msg.startswith("--grid k:") and "'svc'" in msg and "knn" in msg
    # without the registry name, the head is named by its class (not recovered by building heads)
    msg = _one_line_error(lambda: parse_grid(["k=1,3"], svc))
    assert msg == "--grid k: head SVC has no parameter k (it applies to: knn)"
    msg = _one_line_error(lambda: parse_grid(["kernel=rbf"], "linsvc"))
    assert "--grid kernel" in msg and "'linsvc'" in msg
    msg = _one_line_error(lambda: grid_search(make_pipeline("ridge", {}), {"C": [1.0]}, None, [0, 1],
                                              head="ridge"))
    assert "--grid C" in msg and "'ridge'" in msg and "alpha" not in msg.split("(")[0]
    # the estimator has random_state, but logreg (lbfgs) does not declare a seed: refused by name
    msg = _one_line_error(lambda: parse_grid(["seed=1,2"], make_pipeline("logreg", {}), head="logreg"))
    assert msg.startswith("--grid seed does not apply to head 'logreg'") and "svc, mlp, sgd, rf" in msg
    assert "--grid 'C'" in _one_line_error(lambda: parse_grid(["C"]))
    assert "--grid 'C='" in _one_line_error(lambda: parse_grid(["C="]))
    assert "--grid colour" in _one_line_error(lambda: parse_grid(["colour=red"]))
    assert "--grid calibrate" in _one_line_error(lambda: parse_grid(["calibrate=true,false"]))
    assert "given twice" in _one_line_error(lambda: parse_grid(["C=1", "C=2"]))
    assert "--grid C: --C must be a positive" in _one_line_error(lambda: parse_grid(["C=0,1"]))
    msg = _one_line_error(lambda: grid_search(svc, {"head__nope": [1]}, None, [0, 1]))
    assert "head__nope" in msg


def test_one_class_training_set_is_a_clear_error(digits):
    Xtr, _, _, _ = digits
    y = np.full(len(Xtr), 4)
    for name in HEADS:
        msg = _one_line_error(lambda: fit_pipeline(make_pipeline(name, {}), Xtr.copy(), y))
        assert "the train split has only one class (4)" in msg
    # FastLinearSVC itself raises it too (a FeatureCacheError that is also sklearn's ValueError)
    with pytest.raises(FeatureCacheError, match="only one class") as info:
        FastLinearSVC().fit(Xtr, y)
    assert isinstance(info.value, ValueError)
    assert "only one class" in _one_line_error(
        lambda: grid_search(make_pipeline("linsvc", {}), {"C": [1.0]}, Xtr, y))
    msg = _one_line_error(lambda: grid_search(
        make_pipeline("linsvc", {}), {"C": [1.0]}, Xtr[:12], np.r_[np.zeros(10), [1, 1]], cv=3))
    assert "--cv 3" in msg


# ----------------------------------------------------------------------------- L2Normalizer


def test_l2_normalizer_is_in_place_on_float32():
    rng = np.random.default_rng(0)
    X = rng.random((500, 64), dtype=np.float32) * 5
    X[3] = 0.0  # zero rows stay zero
    expected = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-30)
    out = L2Normalizer().fit_transform(X)
    assert out is X or np.shares_memory(out, X)
    assert out.dtype == np.float32
    np.testing.assert_allclose(X, expected, rtol=1e-5, atol=1e-7)  # the input itself was rescaled
    np.testing.assert_allclose(np.linalg.norm(X[np.arange(500) != 3], axis=1), 1.0, rtol=1e-5)
    assert not X[3].any()
    again = L2Normalizer().transform(X)  # idempotent
    np.testing.assert_allclose(again, expected, rtol=1e-5, atol=1e-7)


def test_l2_normalizer_through_a_pipeline_does_not_copy(digits):
    Xtr, _, ytr, _ = digits
    X = Xtr.copy()
    pipe = make_pipeline("linsvc", {}).fit(X, ytr)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-5)  # normalised in place
    assert pipe.score(X, ytr) > 0.95


def test_l2_normalizer_float64_ints_readonly_sparse_and_copy():
    rng = np.random.default_rng(1)
    X64 = rng.random((50, 8))
    out = L2Normalizer().fit_transform(X64)
    assert out.dtype == np.float64 and np.shares_memory(out, X64)
    np.testing.assert_allclose(np.linalg.norm(X64, axis=1), 1.0)

    Xi = rng.integers(0, 10, size=(50, 8))
    Xi[0] = 0
    before = Xi.copy()
    out = L2Normalizer().fit_transform(Xi)
    np.testing.assert_array_equal(Xi, before)  # ints cannot be rescaled in place: new array
    assert out.dtype.kind == "f"
    np.testing.assert_allclose(np.linalg.norm(out[1:], axis=1), 1.0)
    np.testing.assert_allclose(out, before / np.maximum(np.linalg.norm(before, axis=1), 1)[:, None])

    ro = rng.random((20, 4)).astype(np.float32)
    ro.setflags(write=False)
    out = L2Normalizer().fit_transform(ro)
    assert not np.shares_memory(out, ro)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)

    Xc = rng.random((30, 6)).astype(np.float32)
    keep = Xc.copy()
    out = L2Normalizer(copy=True).fit_transform(Xc)
    np.testing.assert_array_equal(Xc, keep)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)

    S = sp.random(40, 30, density=0.2, format="csr", random_state=0, dtype=np.float32)
    dense = S.toarray()
    out = L2Normalizer().fit_transform(S)
    norms = np.linalg.norm(dense, axis=1)
    norms[norms == 0] = 1
    np.testing.assert_allclose(out.toarray(), dense / norms[:, None], rtol=1e-6)


# ----------------------------------------------------------------------------- FastLinearSVC


def _agreement(X, y, Xte, yte, C):
    ours = FastLinearSVC(C=C).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = LinearSVC(C=C, loss="squared_hinge", penalty="l2", dual=False).fit(X, y)
    obj_ours = squared_hinge_objective(ours.coef_, ours.intercept_, X, y, ours.classes_, C)
    obj_ref = squared_hinge_objective(ref.coef_, ref.intercept_, X, y, ref.classes_, C)
    acc_ours = (ours.predict(Xte) == yte).mean()
    acc_ref = (ref.predict(Xte) == yte).mean()
    return ours, ref, obj_ours, obj_ref, acc_ours, acc_ref


@pytest.mark.parametrize("C", [0.1, 1.0, 10.0, 100.0])
def test_fast_linear_svc_matches_liblinear_on_cnn_like_codes(digits_codes, C):
    Xtr, Xte, ytr, yte = digits_codes
    ours, ref, obj_ours, obj_ref, acc_ours, acc_ref = _agreement(Xtr, ytr, Xte, yte, C)
    assert ours.coef_.shape == ref.coef_.shape == (10, 512)
    assert ours.intercept_.shape == ref.intercept_.shape == (10,)
    np.testing.assert_array_equal(ours.classes_, ref.classes_)
    assert abs(acc_ours - acc_ref) <= 0.005
    # same objective: ours no worse than liblinear's optimum (up to 1e-6) and not far below it
    assert obj_ours <= obj_ref * (1 + 1e-6)
    assert obj_ours >= obj_ref * (1 - 1e-3)
    train_agree = (ours.predict(Xtr) == ref.predict(Xtr)).mean()
    assert train_agree > 0.99


@pytest.mark.parametrize("C", [0.1, 1.0, 10.0])
def test_fast_linear_svc_matches_liblinear_on_digits(digits, C):
    Xtr, Xte, ytr, yte = digits
    Xtr, Xte = _l2(Xtr), _l2(Xte)
    ours, ref, obj_ours, obj_ref, acc_ours, acc_ref = _agreement(Xtr, ytr, Xte, yte, C)
    assert abs(acc_ours - acc_ref) <= 0.005
    assert obj_ours <= obj_ref * (1 + 1e-6) and obj_ours >= obj_ref * (1 - 1e-3)


@pytest.mark.parametrize("codes", [False, True], ids=["digits", "codes512"])
def test_fast_linear_svc_binary_matches_liblinear(digits, digits_codes, codes):
    Xtr, Xte, ytr, yte = digits_codes if codes else digits
    Xtr, Xte = _l2(Xtr), _l2(Xte)
    yb, ybte = np.where(ytr == 8, "eight", "rest"), np.where(yte == 8, "eight", "rest")
    ours, ref, obj_ours, obj_ref, acc_ours, acc_ref = _agreement(Xtr, yb, Xte, ybte, 1.0)
    assert ours.coef_.shape == (1, Xtr.shape[1]) and ours.intercept_.shape == (1,)
    assert ours.decision_function(Xte).shape == (len(Xte),)
    assert abs(acc_ours - acc_ref) <= 0.005
    assert obj_ours <= obj_ref * (1 + 1e-6) and obj_ours >= obj_ref * (1 - 1e-3)
    # same sign convention as sklearn: positive decision -> classes_[1]
    assert np.mean(np.sign(ours.decision_function(Xte)) == np.sign(ref.decision_function(Xte))) > 0.99


def test_fast_linear_svc_intercept_options(digits_codes):
    Xtr, Xte, ytr, yte = digits_codes
    for kwargs in ({"intercept_scaling": 3.0}, {"fit_intercept": False}):
        ours = FastLinearSVC(**kwargs).fit(Xtr, ytr)
        ref = LinearSVC(dual=False, **kwargs).fit(Xtr, ytr)
        o = squared_hinge_objective(ours.coef_, ours.intercept_, Xtr, ytr, ours.classes_, 1.0,
                                    kwargs.get("intercept_scaling", 1.0), kwargs.get("fit_intercept", True))
        r = squared_hinge_objective(ref.coef_, ref.intercept_, Xtr, ytr, ref.classes_, 1.0,
                                    kwargs.get("intercept_scaling", 1.0), kwargs.get("fit_intercept", True))
        assert o <= r * (1 + 1e-6) and o >= r * (1 - 1e-3)
        if not kwargs.get("fit_intercept", True):
            assert not ours.intercept_.any()


def test_fast_linear_svc_float64_and_sparse_give_the_same_model(digits_codes):
    Xtr, _, ytr, _ = digits_codes
    a = FastLinearSVC().fit(Xtr, ytr)
    b = FastLinearSVC().fit(Xtr.astype(np.float64), ytr)
    c = FastLinearSVC().fit(sp.csr_matrix(Xtr), ytr)
    for other in (b, c):
        np.testing.assert_allclose(other.decision_function(Xtr), a.decision_function(Xtr),
                                   rtol=0, atol=2e-3)
    np.testing.assert_array_equal(c.predict(sp.csr_matrix(Xtr)), c.predict(Xtr))


def test_fast_linear_svc_warns_when_max_iter_is_reached(digits_codes):
    Xtr, _, ytr, _ = digits_codes
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        est = FastLinearSVC(max_iter=2).fit(Xtr, ytr)
    assert est.n_iter_ == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        assert FastLinearSVC().fit(Xtr, ytr).n_iter_ < 1000


def test_fast_linear_svc_rejects_bad_parameters(digits):
    Xtr, _, ytr, _ = digits
    for bad in ({"C": 0}, {"tol": -1.0}, {"max_iter": 0}, {"intercept_scaling": 0.0}):
        with pytest.raises(ValueError):
            FastLinearSVC(**bad).fit(Xtr, ytr)


def test_fast_linear_svc_does_not_copy_float32_features():
    """No float64 conversion or copy of X: the fit allocates far less than X itself."""
    rng = np.random.default_rng(0)
    n, d = 16000, 2048
    centers = rng.random((4, d), dtype=np.float32)
    y = rng.integers(0, 4, n)
    X = centers[y] + rng.random((n, d), dtype=np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    tracemalloc.start()
    try:
        est = FastLinearSVC(max_iter=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(X, y)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.6 * X.nbytes, (peak, X.nbytes)
    assert est.coef_.shape == (4, d)


def test_squared_hinge_objective_by_hand():
    X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = np.array([0, 1, 1])
    coef, intercept = np.array([[0.5, 1.0]]), np.array([0.25])
    # margins y*(x.w + b): -(0.75), 1.25, 1.75 -> hinge^2: 1.75^2, 0, 0; reg 0.5*(0.25+1+0.0625)
    expected = 0.5 * (0.25 + 1.0 + 0.25 ** 2) + 2.0 * 1.75 ** 2
    assert squared_hinge_objective(coef, intercept, X, y, np.array([0, 1]), 2.0) == pytest.approx(expected)
