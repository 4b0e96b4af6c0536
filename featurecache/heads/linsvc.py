"""FastLinearSVC: scikit-learn's LinearSVC optimum for big dense float32 feature matrices.

The estimator (the ``linsvc`` head) and :func:`squared_hinge_objective`, the primal objective it
shares with ``sklearn.svm.LinearSVC`` (used by tests and the heads benchmark to compare the two).
The solver itself is in :mod:`featurecache.heads._newton`.
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import LabelEncoder
from sklearn.utils._param_validation import Interval
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featurecache.errors import FeatureCacheError

from ._newton import Augmented, SquaredHingeOvR, blas_thread_contexts, solve_ovr, subspace_rank

__all__ = ["FastLinearSVC", "squared_hinge_objective"]


def _plain(value):
    """numpy scalar -> Python scalar, for readable messages."""
    return value.item() if isinstance(value, np.generic) else value


class FastLinearSVC(ClassifierMixin, BaseEstimator):
    """Linear SVM (squared hinge, L2 penalty, one-vs-rest), built for big dense float32 features.

    Solves exactly the problem of ``sklearn.svm.LinearSVC(penalty="l2", loss="squared_hinge",
    multi_class="ovr")``; for every class k (y = +1 for class k, -1 for the rest)::

        min_{w,b}  0.5 (|w|^2 + b^2) + C sum_i max(0, 1 - y_i (x_i . w + intercept_scaling b))^2

    i.e. the intercept is liblinear's: the weight of an extra constant feature of value
    ``intercept_scaling``, regularised like the others (``intercept_ = intercept_scaling * b``).
    All K problems are solved together by a truncated Newton method (conjugate gradient on the
    generalised Hessian ``I + 2C X_I^T X_I`` restricted to the margin violators, then a line
    search), like liblinear's primal solver, but each Hessian product is one float32 BLAS product
    ``X @ V`` and one ``X.T @ R`` for all classes at once. X is never copied or converted: float32
    stays float32 (float64 is used for the small parameter vectors and n x K margins only).

    Parameters
    ----------
    C : float, default=1.0
        Inverse regularisation strength, as in LinearSVC.
    tol : float, default=1e-4
        Stop when ``|grad_k| <= tol * max(min(#pos_k, #neg_k), 1) / n * |grad_k(0)|`` for every
        class k (liblinear's rule for this solver), or when float32 arithmetic can no longer
        measure a decrease of the objective.
    max_iter : int, default=1000
        Maximum number of Newton iterations (those of the warm start included); reaching it warns
        with ``ConvergenceWarning``.
    intercept_scaling : float, default=1.0
        Value of the constant feature that carries the intercept (see above).
    fit_intercept : bool, default=True
        Whether to fit an intercept at all.
    verbose : int, default=0
        Print one line per Newton iteration when > 0.

    Attributes
    ----------
    coef_ : ndarray of shape (1, n_features) for two classes, else (n_classes, n_features)
    intercept_ : ndarray of shape (1,) or (n_classes,)
    classes_ : ndarray of shape (n_classes,)
    n_iter_ : int, number of Newton iterations run (warm start included)
    n_features_in_ : int
    """

    def __init__(
        self, C=1.0, *, tol=1e-4, max_iter=1000, intercept_scaling=1.0, fit_intercept=True, verbose=0
    ):
        self.C = C
        self.tol = tol
        self.max_iter = max_iter
        self.intercept_scaling = intercept_scaling
        self.fit_intercept = fit_intercept
        self.verbose = verbose

    # Declared like scikit-learn's own estimators: checked by _fit_context before every fit, and
    # errors are InvalidParameterError (a ValueError and a TypeError) naming the parameter.
    _parameter_constraints: dict = {
        "C": [Interval(Real, 0.0, None, closed="neither")],
        "tol": [Interval(Real, 0.0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "intercept_scaling": [Interval(Real, 0.0, None, closed="neither")],
        "fit_intercept": ["boolean"],
        "verbose": ["verbose"],
    }

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y):
        """Fit the K one-vs-rest problems; returns self."""
        X, y = validate_data(self, X, y, accept_sparse="csr", dtype=[np.float32, np.float64])
        check_classification_targets(y)
        encoder = LabelEncoder()
        y_ind = encoder.fit_transform(y)
        self.classes_ = encoder.classes_
        n_classes = len(self.classes_)
        if n_classes < 2:
            raise _OneClassError(
                f"the train split has only one class ({_plain(self.classes_[0])!r}); a classifier needs "
                "samples of at least two classes"
            )
        n, d = X.shape
        if n_classes == 2:
            Y = np.where(y_ind == 1, 1.0, -1.0)[:, None]
        else:
            Y = np.where(y_ind[:, None] == np.arange(n_classes)[None, :], 1.0, -1.0)
        pos = (Y > 0).sum(axis=0)
        tol_k = self.tol * np.maximum(np.minimum(pos, n - pos), 1) / n
        s = float(self.intercept_scaling) if self.fit_intercept else 0.0
        narrow, wide = blas_thread_contexts()
        aug = Augmented(X, s, wide)
        problem = SquaredHingeOvR(aug, Y, self.C)
        rank = subspace_rank(X, self.C)
        with narrow():
            W, n_iter, converged = solve_ovr(
                problem, tol_k, int(self.max_iter), rank, 4096, self.verbose
            )
        if not converged:
            warnings.warn(
                f"FastLinearSVC did not converge in max_iter={self.max_iter} Newton iterations; "
                "increase max_iter.",
                ConvergenceWarning,
            )
        self.coef_ = np.ascontiguousarray(W[:-1].T)
        self.intercept_ = s * W[-1] if self.fit_intercept else np.zeros(Y.shape[1])
        self.n_iter_ = n_iter
        return self

    def decision_function(self, X):
        """Signed distance scores: shape (n,) for two classes, else (n, n_classes)."""
        check_is_fitted(self)
        X = validate_data(
            self, X, accept_sparse="csr", dtype=[np.float32, np.float64], reset=False
        )
        coef = self.coef_.T.astype(X.dtype, copy=False)
        scores = np.asarray(X @ coef, dtype=np.float64) + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores

    def predict(self, X):
        scores = self.decision_function(X)
        if scores.ndim == 1:
            return self.classes_[(scores > 0).astype(int)]
        return self.classes_[np.argmax(scores, axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags


class _OneClassError(FeatureCacheError, ValueError):
    """Raised by fit when y holds one class: a FeatureCacheError for users, a ValueError for sklearn."""


def squared_hinge_objective(coef, intercept, X, y, classes, C, intercept_scaling=1.0,
                            fit_intercept=True):
    """Primal objective of LinearSVC(loss="squared_hinge", penalty="l2"), summed over classes.

    Works for the ``coef_``/``intercept_`` of both :class:`FastLinearSVC` and sklearn's
    ``LinearSVC`` (whose intercept is ``intercept_scaling`` times a regularised weight).
    """
    coef = np.atleast_2d(np.asarray(coef, dtype=np.float64))
    intercept = np.asarray(intercept, dtype=np.float64).ravel()
    classes = np.asarray(classes)
    y = np.asarray(y)
    if len(classes) == 2:
        Y = np.where(y == classes[1], 1.0, -1.0)[:, None]
    else:
        Y = np.where(y[:, None] == classes[None, :], 1.0, -1.0)
    Z = np.asarray(X, dtype=np.float64) @ coef.T + intercept
    wb = intercept / intercept_scaling if fit_intercept else np.zeros_like(intercept)
    m = np.maximum(1.0 - Y * Z, 0.0)
    return float(0.5 * (np.sum(coef * coef) + np.sum(wb * wb)) + C * np.sum(m * m))
