"""L2Normalizer: rows to unit Euclidean norm, in place on float arrays (the heads' default first step)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils.validation import validate_data

__all__ = ["L2Normalizer"]


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

    blocks : tuple of int or None, default=None
        Widths of consecutive column blocks (the taps of a multi-tap fit, in order). Each block is
        first scaled to unit norm on its own, so that a wide tap does not drown a narrow one, and
        then the whole row is; ``None`` scales only the whole row.

    Rows of norm zero are left as they are. The transform is stateless (``fit`` only records the
    number of features; ``transform`` works unfitted too) and idempotent, so applying it twice to
    the same cached array is harmless.
    """

    _parameter_constraints: dict = {"copy": ["boolean"], "blocks": [tuple, list, None]}
    blocks = None  # what runs pickled before this parameter existed read: whole rows only

    def __init__(self, copy=False, blocks=None):
        self.copy = copy
        self.blocks = blocks

    @_fit_context(prefer_skip_nested_validation=True)
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
        edges = np.cumsum([0, *self.blocks]) if self.blocks else None
        if edges is not None and edges[-1] != X.shape[1]:
            raise ValueError(f"blocks {tuple(self.blocks)} add up to {edges[-1]} columns, X has {X.shape[1]}")
        for start in range(0, X.shape[0], 8192):  # bounded temporaries, whatever n is
            rows = X[start : start + 8192]
            for lo, hi in zip(edges[:-1], edges[1:]) if edges is not None else ():
                _unit_rows(rows[:, lo:hi])
            _unit_rows(rows)
        return X

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.requires_fit = False
        return tags


def _unit_rows(block: np.ndarray) -> None:
    """Scale the rows of a (view of a) float array to unit norm, in place; zero rows stay."""
    norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
    norms[norms == 0.0] = 1.0
    block /= norms.astype(block.dtype)[:, None]
