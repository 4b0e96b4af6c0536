"""Heads: light scikit-learn classifiers trained on cached feature matrices.

A *head* is a named recipe for a classifier (``linsvc``, ``svc``, ``logreg``, ``mlp``, ``ridge``,
``sgd``, ``knn``, ``rf``). :func:`make_head` builds one from the CLI options the user actually set,
:func:`make_pipeline` puts it behind a normalisation step (and an optional PCA), :func:`parse_grid`
and :func:`grid_search` tune it, and :func:`scores` turns a fitted pipeline into per-class scores.

Everything here follows the scikit-learn estimator contract, so ``clone``, ``GridSearchCV`` and
``Pipeline`` work on it. The two custom estimators are:

* :class:`FastLinearSVC` -- the ``linsvc`` head: the same optimisation problem as scikit-learn's
  ``LinearSVC(loss="squared_hinge", penalty="l2")`` (one-vs-rest, L2 penalty, intercept as an extra
  regularised constant feature of value ``intercept_scaling``, exactly as liblinear does), solved by a
  truncated Newton method on all one-vs-rest problems at once, with float32 BLAS products on the
  feature matrix as the only heavy operations and no copy of it.
* :class:`L2Normalizer` -- row-wise unit L2 norm, in place on float arrays (no copy of a
  50,000 x 2,048 matrix).

Option names (shared with the CLI): ``C``, ``kernel``, ``gamma``, ``hidden``, ``max_iter``, ``seed``,
``max_depth``, ``k``, ``n_estimators``, ``alpha``, ``calibrate``. Regularisation choice for
``ridge``: it keeps scikit-learn's own ``alpha`` (larger = stronger, default 1.0) rather than a
translated ``C``; to compare with the ``C`` of the hinge/logistic heads, ``alpha`` is about
``1 / (2 C)`` (``0.5 ||w||^2 + C sum loss`` has the same minimiser as ``sum loss + ||w||^2 / (2C)``).
``sgd`` and ``mlp`` also take ``alpha`` in scikit-learn's meaning.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import numbers
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featurecache.errors import FeatureCacheError

__all__ = [
    "HEADS",
    "OPTIONS",
    "Option",
    "option_flag",
    "Head",
    "FastLinearSVC",
    "L2Normalizer",
    "Scores",
    "check_train_labels",
    "fit_pipeline",
    "grid_search",
    "head_names",
    "make_head",
    "make_pipeline",
    "parse_grid",
    "scores",
    "squared_hinge_objective",
]


# --------------------------------------------------------------------------------------------
# L2 normalisation in place
# --------------------------------------------------------------------------------------------


class L2Normalizer(TransformerMixin, BaseEstimator):
    """Scale each row of X to unit Euclidean norm; in place on writable float arrays.

    Parameters
    ----------
    copy : bool, default=False
        ``False`` (the default) rescales a writable float32/float64 ndarray (or CSR matrix) in place
        and returns that same object: no second copy of a large feature matrix. Other inputs (ints,
        lists, read-only arrays) are converted to a new float array first (float32 stays float32,
        everything else becomes float64) and that new array is rescaled. ``True`` always works on a
        copy and leaves the input alone.

    Rows of norm zero are left as they are. The transform is stateless (``fit`` only records the
    number of features; ``transform`` works unfitted too) and idempotent, so applying it twice to
    the same cached array is harmless.
    """

    def __init__(self, copy=False):
        self.copy = copy

    def fit(self, X, y=None):
        validate_data(self, X, accept_sparse="csr", dtype=[np.float32, np.float64])
        return self

    def transform(self, X):
        X = validate_data(
            self,
            X,
            accept_sparse="csr",
            dtype=[np.float32, np.float64],
            copy=bool(self.copy),
            force_writeable=True,
            reset=False,
        )
        if sp.issparse(X):
            sq = np.asarray(X.multiply(X).sum(axis=1), dtype=np.float64).ravel()
            norms = np.sqrt(sq)
            norms[norms == 0.0] = 1.0
            X.data /= np.repeat(norms, np.diff(X.indptr)).astype(X.dtype, copy=False)
            return X
        for start in range(0, X.shape[0], 8192):  # bounded temporaries, whatever n is
            block = X[start : start + 8192]
            norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
            norms[norms == 0.0] = 1.0
            block /= norms.astype(X.dtype)[:, None]
        return X

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.requires_fit = False
        return tags


# --------------------------------------------------------------------------------------------
# FastLinearSVC
# --------------------------------------------------------------------------------------------


class _Augmented:
    """The design matrix X~ = [X, s] (a constant column of value s) without building it.

    ``dot(V)`` is ``X~ @ V`` and ``rdot(T)`` is ``X~.T @ T`` for small dense V (d+1, k) and
    T (n, k): one float32 BLAS product over X each (in X's own dtype; results in float64). X is
    neither copied nor converted. ``passes`` counts the products (one streaming read of X each).
    """

    def __init__(self, X, s, wide=contextlib.nullcontext):
        self.X, self.s = X, float(s)
        self.n, self.d = X.shape
        self.passes = 0
        self.wide = wide  # context in which the big products run (all BLAS threads)

    def dot(self, V):
        self.passes += 1
        with self.wide():
            Z = np.asarray(self.X @ V[:-1].astype(self.X.dtype, copy=False), dtype=np.float64)
        if self.s:
            Z += self.s * V[-1]
        return Z

    def rdot(self, T):
        self.passes += 1
        out = np.empty((self.d + 1, T.shape[1]))
        with self.wide():
            out[:-1] = self.X.T @ T.astype(self.X.dtype, copy=False)
        out[-1] = self.s * T.sum(axis=0) if self.s else 0.0
        return out


_THREADPOOL_CONTROLLER = None


def _blas_thread_contexts():
    """(narrow, wide) context factories: one BLAS thread, and the default number of threads.

    Everything but the products with X is small (n x K, r x r, (d+1) x r); multi-threaded
    OpenBLAS on such sizes can be 10-100x slower than one thread on a busy 2-core machine (QR of
    a 2049 x 144 matrix: 2 s vs 0.03 s measured), so the solver runs single-threaded except for
    the products with X.
    """
    global _THREADPOOL_CONTROLLER
    try:
        from threadpoolctl import ThreadpoolController

        if _THREADPOOL_CONTROLLER is None:
            _THREADPOOL_CONTROLLER = ThreadpoolController()
        ctl = _THREADPOOL_CONTROLLER
        threads = max([i["num_threads"] for i in ctl.info() if i["user_api"] == "blas"] or [1])
    except Exception:  # threadpoolctl missing or confused: leave BLAS alone
        return contextlib.nullcontext, contextlib.nullcontext
    return (lambda: ctl.limit(limits=1, user_api="blas"),
            lambda: ctl.limit(limits=threads, user_api="blas"))


def _colsum(A, B):
    return np.einsum("ij,ij->j", A, B)


def _top_subspace(aug, r, n_sample, rng):
    """Orthonormal (d+1, r) basis of the top-r right singular subspace of X~ (float64).

    Randomised subspace iteration on a row sample of X (a copy of ``n_sample`` rows only). The
    basis need not be exact: it only shapes the preconditioner and the warm start; the solution
    is that of the full problem whatever it is.
    """
    X, s, n, d = aug.X, aug.s, aug.n, aug.d
    if r >= d + 1:
        return np.eye(d + 1)
    idx = np.sort(rng.choice(n, size=min(n, n_sample), replace=False))
    S = X[idx]
    S = S.toarray() if sp.issparse(S) else np.asarray(S)

    def sdot(Q):  # S~ @ Q
        return (S @ Q[:-1].astype(S.dtype)).astype(np.float64) + s * Q[-1]

    def srdot(T):  # S~.T @ T
        return np.vstack([(S.T @ T.astype(S.dtype)).astype(np.float64), s * T.sum(axis=0)])

    Q = rng.standard_normal((d + 1, min(r + 16, d + 1)))
    for _ in range(3):
        Q, _ = np.linalg.qr(srdot(sdot(Q)))
    _, _, vt = np.linalg.svd(sdot(Q), full_matrices=False)
    return Q @ vt[:r].T


class _SquaredHingeOvR:
    """K independent L2-regularised squared-hinge problems sharing one feature matrix.

    Column k of the (d+1, K) parameter matrix W (last row: weight of the constant feature s)::

        f_k(w) = 0.5 |w|^2 + C sum_i max(0, 1 - y_ik x~_i . w)^2

    which is liblinear's L2R_L2LOSS_SVC primal with bias. Margins Z = X~ W (n, K) are kept up to
    date incrementally, so the function value along a search direction costs O(nK), no pass over X.
    """

    def __init__(self, aug, Y, C):
        self.aug, self.Y, self.C = aug, Y, float(C)

    def value(self, W, Z):
        m = np.maximum(1.0 - self.Y * Z, 0.0)
        return 0.5 * _colsum(W, W) + self.C * _colsum(m, m)

    def residual(self, Z, active):
        """d loss / d Z (n, K)."""
        return np.where(active, 2.0 * self.C * (Z - self.Y), 0.0)

    def hess_dot(self, D, active):
        """Generalised Hessian times D, per column, and X~ D (kept for the line search)."""
        XD = self.aug.dot(D)
        HD = D + self.aug.rdot(np.where(active, 2.0 * self.C * XD, 0.0))
        return HD, XD


def _line_search(problem, W, Z, f, G, P, XP, todo):
    """Backtracking (Armijo) step per column along P; uses Z and X~P only."""
    gp = _colsum(G, P)
    step = np.where(todo, 1.0, 0.0)
    for _ in range(40):
        ft = problem.value(W + step * P, Z + step * XP)
        bad = todo & (ft > f + 0.01 * step * gp)
        if not bad.any():
            return step, ft
        step = np.where(bad, 0.5 * step, step)
    step = np.where(bad, 0.0, step)
    return step, problem.value(W + step * P, Z + step * XP)


class _SubspaceHessians:
    """Per-class Cholesky factors of ``B_k = I + 2C U_Ik^T U_Ik``, the Hessian restricted to span(V).

    U = X~ V is (n, r) and in memory, so no pass over X is needed. ``M_k = U_Ik^T U_Ik`` is kept
    per class and updated with the rows whose active status changed since the last call (a few
    hundred once the active sets settle), or rebuilt from the active rows (or from U^T U minus the
    inactive rows) when that is cheaper. Products are float32, sums float64.
    """

    def __init__(self, U, C, K):
        self.U, self.C = U, C
        self.UtU = (U.T @ U).astype(np.float64)
        self.M = [self.UtU.copy() for _ in range(K)]
        self.active = np.ones((U.shape[0], K), dtype=bool)  # M_k above is for "all active"
        self.eye = np.eye(U.shape[1])

    def _gram(self, rows, sign=None):
        Ur = self.U[rows]
        left = Ur.T if sign is None else Ur.T * sign.astype(np.float32)
        return (left @ Ur).astype(np.float64)

    def factor(self, active):
        out = []
        n = active.shape[0]
        for k in range(active.shape[1]):
            a = active[:, k]
            changed = a != self.active[:, k]
            n_changed = int(changed.sum())
            n_active = int(a.sum())
            if n_changed <= min(n_active, n - n_active):
                if n_changed:
                    self.M[k] += self._gram(changed, np.where(a[changed], 1.0, -1.0))
            elif n_active <= n - n_active:
                self.M[k] = self._gram(a)
            else:
                self.M[k] = self.UtU - self._gram(~a)
            self.active[:, k] = a
            out.append(_cho_factor(self.eye + 2.0 * self.C * self.M[k]))
        return out


def _cho_factor(B):
    import scipy.linalg

    return scipy.linalg.cho_factor(B, lower=True, check_finite=False)


def _cho_solve_cols(factors, Cm):
    import scipy.linalg

    return np.column_stack(
        [scipy.linalg.cho_solve(factors[k], Cm[:, k], check_finite=False) for k in range(len(factors))]
    )


def _solve_ovr(problem, tol_k, max_iter, rank, n_sample, verbose, eta=0.1, sub_rtol=1e-7):
    """Minimise the K problems; returns (W (d+1, K), n_iter, converged).

    1. Subspace: V (d+1, r), an orthonormal basis of the top-r right singular subspace of X~ (a
       randomised range finder on a row sample), and U = X~ V (one pass with r columns). For
       L2-normalised CNN codes this subspace holds nearly all of the Hessian's ill-conditioning
       (one huge eigenvalue along the mean, then a power-law tail).
    2. Warm start: exact Newton on the problem restricted to w = V u (r-dimensional, U in memory:
       no pass over X).
    3. Truncated Newton on the full problem from there, liblinear-style (CG to a 0.1 relative
       residual, then a line search), but with all K columns at once (each Hessian product is one
       ``X @ D`` and one ``X.T @ T`` with K columns) and preconditioned CG with
       ``P_k = (I - V V^T) + V B_k V^T`` where B_k is the exact Hessian of class k in span(V).
       The stopping rule is liblinear's: ``|g_k| <= tol_k |g_k(0)|`` for every class.
    """
    aug, Y, C = problem.aug, problem.Y, problem.C
    n, K = Y.shape
    n_iter = 0
    d1 = aug.d + 1
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    W = np.zeros((d1, K))
    Z = np.zeros((n, K))

    def log(msg):
        if verbose:
            msg = msg() if callable(msg) else msg
            print(f"[FastLinearSVC] {time.perf_counter() - t0:7.2f}s  passes {aug.passes:4d}  {msg}")

    hessians = None
    if rank > 0:
        V = _top_subspace(aug, rank, n_sample, rng)
        U = aug.dot(V).astype(np.float32)
        hessians = _SubspaceHessians(U, C, K)
        log(f"subspace rank {V.shape[1]} ready")
        # -- warm start: Newton on the subspace problem (w = V u)
        Uw = np.zeros((V.shape[1], K))
        f = problem.value(Uw, Z)
        for it in range(min(50, max_iter)):
            active = Y * Z < 1.0
            g = Uw + (U.T @ problem.residual(Z, active).astype(np.float32)).astype(np.float64)
            P = -_cho_solve_cols(hessians.factor(active), g)
            XP = (U @ P.astype(np.float32)).astype(np.float64)
            step, ft = _line_search(problem, Uw, Z, f, g, P, XP, np.ones(K, dtype=bool))
            Uw += step * P
            Z += step * XP
            n_iter += 1
            decrease, f = f - ft, ft
            log(lambda: f"subspace iter {it + 1}  f {f.sum():.8e}")
            if np.all(decrease <= sub_rtol * f):
                break
        W = V @ Uw  # Z = X~ W = U Uw already, up to float32 rounding

    f = problem.value(W, Z)
    active = Y * Z < 1.0
    # gradient at the warm start and at w = 0 (for liblinear's relative rule) in one pass
    both = aug.rdot(np.hstack([problem.residual(Z, active), -2.0 * C * Y]))
    G, G0 = W + both[:, :K], both[:, K:]
    gnorm0 = np.sqrt(_colsum(G0, G0))
    gnorm = np.sqrt(_colsum(G, G))
    todo = gnorm > tol_k * gnorm0
    if hessians is not None and V.shape[1] < d1:
        # The warm start is optimal in span(V) only; its gradient can pass the relative test while
        # the objective is still well above the optimum (large C: |g(0)| grows with C). One full
        # Newton step per class before trusting the test keeps the optimum the same as liblinear's.
        todo[:] = True
    while todo.any():
        log(lambda: f"newton iter {n_iter:3d}  f {f.sum():.8e}  max |g|/|g0| {np.max(gnorm / gnorm0):.2e}")
        if n_iter >= max_iter:
            return W, n_iter, False
        n_iter += 1
        if hessians is not None:
            factors = hessians.factor(active)

            def precondition(R):
                c = V.T @ R
                return R + V @ (_cho_solve_cols(factors, c) - c)
        else:

            def precondition(R):
                return R

        # -- preconditioned CG on H_k p_k = -g_k, all columns at once
        P = np.zeros_like(W)
        XP = np.zeros_like(Z)
        R = -G
        Zr = precondition(R)
        D = Zr.copy()
        rz = _colsum(R, Zr)
        cg_tol = eta * gnorm
        cg_todo = todo.copy()
        n_cg = 0
        for _ in range(max(2 * d1, 100)):
            n_cg += 1
            HD, XD = problem.hess_dot(D, active)
            dhd = _colsum(D, HD)
            alpha = np.where(cg_todo, rz / np.where(dhd > 0, dhd, 1.0), 0.0)
            P += alpha * D
            XP += alpha * XD
            R = R - alpha * HD
            cg_todo &= np.sqrt(_colsum(R, R)) > cg_tol
            if not cg_todo.any():
                break
            Zr = precondition(R)
            rz_new = _colsum(R, Zr)
            beta = np.where(cg_todo, rz_new / np.where(rz > 0, rz, 1.0), 0.0)
            D = Zr + beta * D
            rz = rz_new
        step, ft = _line_search(problem, W, Z, f, G, P, XP, todo)
        stalled = todo & (f - ft <= 1e-13 * np.abs(f))  # float32 products cannot resolve more
        log(lambda: f"  CG {n_cg}  steps {np.array2string(step[todo], precision=2)}  "
            f"active {np.array2string(active.sum(axis=0))}")
        W = W + step * P
        Z = Z + step * XP
        f = np.where(todo, ft, f)
        active = Y * Z < 1.0
        G = W + aug.rdot(problem.residual(Z, active))
        gnorm = np.sqrt(_colsum(G, G))
        todo &= (gnorm > tol_k * gnorm0) & ~stalled
    log(lambda: f"done after {n_iter} iterations  f {f.sum():.8e}  max |g|/|g0| {np.max(gnorm / gnorm0):.2e}")
    return W, n_iter, True


def _subspace_rank(X, C):
    """Rank of the warm-start/preconditioner subspace (0: plain Newton-CG, no subspace).

    256 directions (384 for C > 1, where the Hessian is worse conditioned), at most n/8, and the
    whole space when d + 1 fits (exact Newton) unless U = X~ V would then be a copy of X larger
    than 64 MB. Sparse or very wide X: no subspace.
    """
    n, d = X.shape
    if sp.issparse(X) or d > 16384:
        return 0
    rank = min(256 if C <= 1 else 384, max(64, n // 8))
    if rank >= d + 1 and n * (d + 1) * 4 > 64 * 2**20:
        rank = max(1, d // 2)
    return min(rank, d + 1)


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

    def _check_params(self):
        if not (isinstance(self.C, numbers.Real) and self.C > 0):
            raise ValueError(f"C must be a positive number, got {self.C!r}")
        if not (isinstance(self.tol, numbers.Real) and self.tol > 0):
            raise ValueError(f"tol must be a positive number, got {self.tol!r}")
        if not (isinstance(self.max_iter, numbers.Integral) and self.max_iter >= 1):
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        if self.fit_intercept and not (
            isinstance(self.intercept_scaling, numbers.Real) and self.intercept_scaling > 0
        ):
            raise ValueError(
                f"intercept_scaling must be > 0 when fit_intercept=True, got {self.intercept_scaling!r}"
            )

    def fit(self, X, y):
        """Fit the K one-vs-rest problems; returns self."""
        self._check_params()
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
        narrow, wide = _blas_thread_contexts()
        aug = _Augmented(X, s, wide)
        problem = _SquaredHingeOvR(aug, Y, self.C)
        rank = _subspace_rank(X, self.C)
        with narrow():
            W, n_iter, converged = _solve_ovr(
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


# --------------------------------------------------------------------------------------------
# Options and the registry of heads
# --------------------------------------------------------------------------------------------


def option_flag(name: str) -> str:
    """How the CLI spells option ``name`` in messages: ``max_iter`` -> ``--max-iter``."""
    return "--" + name.replace("_", "-")


def _parse_number(text):
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
    v = _parse_number(value)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
        raise FeatureCacheError(f"{option_flag(name)} must be a positive number, got {value!r}")
    return float(v)


def _positive_int(name, value):
    v = _parse_number(value)
    if isinstance(v, numbers.Real) and not isinstance(v, bool) and float(v).is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise FeatureCacheError(f"{option_flag(name)} must be a positive integer, got {value!r}")
    return int(v)


def _seed(name, value):
    v = _parse_number(value)
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
    v = _parse_number(value)
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
    """A CLI option of the heads: its name, the estimator parameter it sets, its converter."""

    name: str
    param: str | None  # None: handled by make_head itself (calibrate)
    convert: Callable[[str, Any], Any]
    help: str


OPTIONS: dict[str, Option] = {
    o.name: o
    for o in [
        Option("C", "C", _positive_float, "inverse regularisation strength (larger = weaker)"),
        Option("kernel", "kernel", _choice("linear", "poly", "rbf", "sigmoid"), "SVC kernel"),
        Option("gamma", "gamma", _gamma, "RBF/poly/sigmoid kernel width: scale, auto or a number"),
        Option("hidden", "hidden_layer_sizes", _hidden, "MLP hidden layer sizes, e.g. 512,100"),
        Option("max_iter", "max_iter", _positive_int, "iteration limit of the solver"),
        Option("seed", "random_state", _seed, "random seed (default 0: runs are reproducible)"),
        Option("max_depth", "max_depth", _positive_int, "maximum tree depth (default: unlimited)"),
        Option("k", "n_neighbors", _positive_int, "number of neighbours"),
        Option("n_estimators", "n_estimators", _positive_int, "number of trees"),
        Option("alpha", "alpha", _positive_float,
               "regularisation strength (larger = stronger); for ridge about 1/(2C)"),
        Option("calibrate", None, _boolean,
               "give probabilities: CalibratedClassifierCV(sigmoid, 3 folds, ensemble=False)"),
    ]
}


def _sklearn(path: str, **params):
    """Build ``sklearn.<module>.<Class>(**params)``, importing on first use: listing the heads
    should not pay for importing every estimator module."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)(**params)


def _lazy(path: str) -> Callable[..., BaseEstimator]:
    return functools.partial(_sklearn, path)


@dataclass(frozen=True)
class Head:
    """A named classifier recipe: ``factory(**params)`` builds the estimator.

    ``options`` are the CLI options that apply; ``fixed`` are estimator parameters this project
    always sets (e.g. the solver); ``defaults`` are parameters set unless the user gives the
    option (e.g. ``random_state=0`` so that runs are reproducible).
    """

    name: str
    description: str
    factory: Callable[..., BaseEstimator]
    options: tuple[str, ...]
    fixed: tuple[tuple[str, Any], ...] = ()
    defaults: tuple[tuple[str, Any], ...] = ()

    def build(self, values: dict[str, Any]) -> BaseEstimator:
        """Estimator from already converted option values (calibrate excluded)."""
        params = dict(self.defaults)
        params.update({OPTIONS[name].param: v for name, v in values.items()})
        params.update(dict(self.fixed))
        return self.factory(**params)


class _Registry(dict):
    """A dict of heads whose missing keys raise FeatureCacheError listing the valid names."""

    def __missing__(self, name):
        raise FeatureCacheError(f"unknown head {name!r}; choose one of: {', '.join(self)}")


HEADS: dict[str, Head] = _Registry({
    h.name: h
    for h in [
        Head("linsvc", "linear SVM, squared hinge, one-vs-rest (FastLinearSVC: LinearSVC's "
             "optimum, float32 BLAS)", FastLinearSVC, ("C", "max_iter", "calibrate")),
        Head("svc", "kernel SVM (sklearn SVC, libsvm); slow beyond ~20k samples",
             _lazy("sklearn.svm.SVC"), ("C", "kernel", "gamma", "max_iter", "seed", "calibrate"),
             defaults=(("random_state", 0),)),
        Head("logreg", "multinomial logistic regression (lbfgs)",
             _lazy("sklearn.linear_model.LogisticRegression"), ("C", "max_iter"),
             fixed=(("solver", "lbfgs"),)),
        Head("mlp", "multi-layer perceptron (adam)", _lazy("sklearn.neural_network.MLPClassifier"),
             ("hidden", "max_iter", "seed", "alpha"), defaults=(("random_state", 0),)),
        Head("ridge", "ridge regression on +-1 targets (RidgeClassifier); --alpha ~ 1/(2C)",
             _lazy("sklearn.linear_model.RidgeClassifier"), ("alpha", "calibrate")),
        Head("sgd", "linear SVM by stochastic gradient descent (hinge)",
             _lazy("sklearn.linear_model.SGDClassifier"),
             ("alpha", "max_iter", "seed", "calibrate"), fixed=(("loss", "hinge"),),
             defaults=(("random_state", 0), ("n_jobs", -1))),
        Head("knn", "k nearest neighbours", _lazy("sklearn.neighbors.KNeighborsClassifier"), ("k",),
             defaults=(("n_jobs", -1),)),
        Head("rf", "random forest", _lazy("sklearn.ensemble.RandomForestClassifier"),
             ("n_estimators", "max_depth", "seed"),
             defaults=(("random_state", 0), ("n_jobs", -1))),
    ]
})


def head_names() -> list[str]:
    return list(HEADS)


def _heads_with(option: str) -> list[str]:
    return [h.name for h in HEADS.values() if option in h.options]


def _get_head(name: str) -> Head:
    if not isinstance(name, str):
        raise FeatureCacheError(f"unknown head {name!r}; choose one of: {', '.join(HEADS)}")
    return HEADS[name]


def _check_option(head: Head, name: str, what: str | None = None) -> Option:
    what = what or option_flag(name)
    if name not in OPTIONS:
        raise FeatureCacheError(
            f"{what}: unknown option; options of the heads are: "
            f"{', '.join(option_flag(o) for o in OPTIONS)}"
        )
    if name not in head.options:
        hint = "; this head's regularisation is alpha (about 1/(2C))" if (
            name == "C" and "alpha" in head.options) else ""
        raise FeatureCacheError(
            f"{what} does not apply to head {head.name!r} "
            f"(it applies to: {', '.join(_heads_with(name))}){hint}"
        )
    return OPTIONS[name]


def make_head(name: str, options: dict | None = None) -> BaseEstimator:
    """The estimator for head ``name`` with the options the user set.

    ``options`` maps option names (see :data:`OPTIONS`) to values; ``None`` means "not set" and
    ``calibrate=False`` is the same as not set. Values may be typed or strings (as from a command
    line). An option that does not apply to the head, an unknown head or a bad value raises
    :class:`FeatureCacheError` naming the culprit.
    """
    head = _get_head(name)
    values = {}
    calibrate = False
    for opt, raw in (options or {}).items():
        if raw is None:
            continue
        if opt == "calibrate" and raw is False:
            continue
        option = _check_option(head, opt)
        value = option.convert(opt, raw)
        if opt == "calibrate":
            calibrate = value
        else:
            values[opt] = value
    estimator = head.build(values)
    if calibrate:
        from sklearn.calibration import CalibratedClassifierCV

        # Platt scaling fitted on 3-fold out-of-fold decision values, then one model refitted on
        # all of the train split (ensemble=False): what SVC(probability=True) did before
        # scikit-learn 1.9 deprecated it in favour of exactly this wrapper.
        estimator = CalibratedClassifierCV(estimator, method="sigmoid", cv=3, ensemble=False)
    return estimator


def make_pipeline(head_name: str, options: dict | None = None, normalize: str = "l2",
                  pca: int | None = None) -> Pipeline:
    """``normalize -> pca -> head`` as a scikit-learn Pipeline (steps are always present).

    normalize: ``"l2"`` -- :class:`L2Normalizer` (rows to unit norm, IN PLACE on float input:
    the caller's array is rescaled, which is harmless for cached features because the
    operation is idempotent); ``"standard"`` -- StandardScaler (fitted on what ``fit`` gets, i.e.
    the train split; works on a copy); ``"none"`` -- passthrough. ``pca``: number of PCA
    components (fitted on the train split), or None for no PCA.
    """
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    normalizers = {"l2": L2Normalizer, "standard": StandardScaler, "none": lambda: "passthrough"}
    if normalize not in normalizers:
        raise FeatureCacheError(
            f"--normalize must be one of {', '.join(normalizers)}, got {normalize!r}"
        )
    if pca is not None:
        pca = _positive_int("pca", pca)
    head = make_head(head_name, options)
    return Pipeline(
        [
            ("normalize", normalizers[normalize]()),
            ("pca", PCA(n_components=pca, random_state=0) if pca else "passthrough"),
            ("head", head),
        ]
    )


# --------------------------------------------------------------------------------------------
# Training, grid search and scores
# --------------------------------------------------------------------------------------------


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


def parse_grid(specs, target=None, calibrate: bool = False) -> dict:
    """``["C=0.01,0.1,1", "kernel=rbf,linear"]`` -> ``{"C": [0.01, 0.1, 1.0], "kernel": [...]}``.

    Values are parsed as int, float or string and then checked like the option itself (C must be
    positive, ...). Separate values with ``;`` instead of ``,`` when a value holds commas:
    ``hidden=512,100;256`` -> ``[(512, 100), (256,)]``.

    ``target`` maps the names to pipeline parameters and checks them: a pipeline from
    :func:`make_pipeline` (``C`` -> ``head__C``, or ``head__estimator__C`` when the head is
    wrapped for calibration), or a head name (then say ``calibrate=True`` if it is wrapped).
    Without ``target`` the option names are kept. Every error names the culprit.
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
                converted.append(option.convert(name, _parse_number(v)))
            except FeatureCacheError as e:
                raise FeatureCacheError(f"--grid {name}: {e}") from None
        grid[name] = converted
    if target is None:
        return grid
    if isinstance(target, str):
        h = _get_head(target)
        out = {}
        for name, values in grid.items():
            _check_option(h, name, what=f"--grid {name}")
            prefix = "head__estimator__" if calibrate else "head__"
            out[prefix + OPTIONS[name].param] = values
        return out
    return _resolve_grid(target, grid)[0]


def _head_name_of(estimator) -> str:
    """Registry name of a head estimator (looking through a calibration wrapper)."""
    inner = getattr(estimator, "estimator", None) or estimator
    for h in HEADS.values():
        if type(inner) is type(h.factory()):
            return h.name
    return type(inner).__name__


def _resolve_grid(pipeline, grid: dict) -> tuple[dict, dict]:
    """Grid with pipeline parameter names, and the map back to the names shown to users."""
    if not hasattr(pipeline, "get_params"):
        raise TypeError(f"expected a pipeline from make_pipeline, got {type(pipeline).__name__}")
    params = pipeline.get_params()
    head_name = _head_name_of(params.get("head"))
    by_param = {o.param: o.name for o in OPTIONS.values() if o.param is not None}
    resolved, names = {}, {}
    for name, values in grid.items():
        if "__" in name:
            if name not in params:
                raise FeatureCacheError(f"--grid {name}: the pipeline has no parameter {name}")
            resolved[name] = list(values)
            tail = name.rsplit("__", 1)[1]
            is_head = name in (f"head__{tail}", f"head__estimator__{tail}")
            names[name] = by_param[tail] if is_head and tail in by_param else name
            continue
        option = OPTIONS.get(name)
        candidates = []
        if option is not None and option.param is not None:
            candidates = [f"head__{option.param}", f"head__estimator__{option.param}"]
        key = next((c for c in candidates if c in params), None)
        if key is None or (head_name in HEADS and name not in HEADS[head_name].options):
            applies = _heads_with(name)
            hint = f" (it applies to: {', '.join(applies)})" if applies else ""
            raise FeatureCacheError(f"--grid {name}: head {head_name!r} has no parameter {name}{hint}")
        resolved[key], names[key] = list(values), name
    return resolved, names


def grid_search(pipeline, grid: dict, X, y, cv: int = 3, seed: int = 0):
    """Cross-validated grid search on (X, y) -- the train split only -- and refit of the best.

    ``grid`` maps option names (``C``) or pipeline parameters (``head__C``) to lists of values,
    as :func:`parse_grid` returns. Returns ``(best fitted pipeline, [(params, mean, std), ...])``
    with one entry per grid point in grid order, params keyed by the names used in ``grid``,
    scores = accuracy over ``cv`` stratified shuffled folds (``seed``).
    """
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    cv = _positive_int("cv", cv)
    if cv < 2:
        raise FeatureCacheError(f"--cv must be at least 2, got {cv}")
    resolved, names = _resolve_grid(pipeline, grid)
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
    if hasattr(pipeline, "predict_proba"):
        kind, values = "probability", np.asarray(pipeline.predict_proba(X))
    elif hasattr(pipeline, "decision_function"):
        kind, values = "decision", np.asarray(pipeline.decision_function(X))
        if values.ndim == 1:
            values = np.column_stack([-values, values])
    else:
        raise FeatureCacheError("the head gives neither probabilities nor decision values")
    classes = np.asarray(pipeline.classes_)
    k = min(_positive_int("top", top), len(classes))
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    return Scores(kind, classes, values, classes[order], np.take_along_axis(values, order, axis=1))
