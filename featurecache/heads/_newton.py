"""The numerical core of FastLinearSVC: K squared-hinge problems solved by truncated Newton at once.

Nothing here is public; :mod:`featurecache.heads.linsvc` wraps it in the scikit-learn estimator.
The only heavy operations are the float32 BLAS products with the feature matrix (``_Augmented``);
everything else is small (n x K margins, r x r subspace Hessians, (d+1) x K parameters).
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import scipy.sparse as sp

__all__ = ["Augmented", "SquaredHingeOvR", "blas_thread_contexts", "solve_ovr", "subspace_rank"]


class Augmented:
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


def blas_thread_contexts():
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


class SquaredHingeOvR:
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


def solve_ovr(problem, tol_k, max_iter, rank, n_sample, verbose, eta=0.1, sub_rtol=1e-7):
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


def subspace_rank(X, C):
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

