"""The classical baseline: a Wiener filter (ridge regression on lagged binned spike counts).

For a behaviour sample at time t the features are each unit's spike counts in ``n_lags`` bins
of ``bin_size`` seconds ending at t (the history [t - n_lags * bin_size, t)), plus a bias; neural
activity leads behaviour (~100 ms in motor cortex), so the history window is what a causal
decoder may use. Ridge strength is picked on a held-out tail (the last 20 %) of the training
samples from a log grid, then the filter is refit on all of them. Written in numpy because it
is a few lines of linear algebra and must not add scikit-learn to the runtime dependencies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..data.windows import Segment
from .metrics import r2_score

DEFAULT_ALPHAS = tuple(np.logspace(-2, 4, 7))


def lagged_counts(segment: Segment, times: np.ndarray, bin_size: float, n_lags: int) -> np.ndarray:
    """(N, U * n_lags) counts of each unit in the ``n_lags`` bins before each time in ``times``."""
    U = len(segment.unit_ids)
    lo = segment.start - n_lags * bin_size
    n_bins = int(np.ceil((segment.end - lo) / bin_size)) + 1
    b = np.floor((segment.spike_times - lo) / bin_size).astype(np.int64)
    grid = np.zeros((n_bins + 1, U), np.float32)
    np.add.at(grid, (np.clip(b, 0, n_bins), segment.spike_unit_index.astype(np.int64)), 1.0)
    cum = np.concatenate([np.zeros((1, U), np.float32), np.cumsum(grid, 0)])  # counts before bin edge k
    # Bin index of each query time (the bin containing t is excluded: history strictly before t
    # up to bin resolution).
    k = np.floor((np.asarray(times) - lo) / bin_size).astype(np.int64)
    feats = [cum[np.clip(k - j, 0, n_bins + 1)] - cum[np.clip(k - j - 1, 0, n_bins + 1)] for j in range(n_lags)]
    return np.concatenate(feats, axis=1)


@dataclass
class WienerFilter:
    """Ridge regression from lagged counts to behaviour, for one session."""

    bin_size: float = 0.02
    n_lags: int = 10
    alphas: Sequence[float] = DEFAULT_ALPHAS
    max_train_samples: int = 20000
    weights: np.ndarray | None = None
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    alpha: float | None = None

    def _design(self, segments: Sequence[Segment], subsample: bool, rng: np.random.Generator):
        xs, ys = [], []
        for seg in segments:
            keep = np.isfinite(seg.behavior_values).all(1) & (seg.weights > 0)
            t = seg.behavior_timestamps[keep]
            y = seg.behavior_values[keep]
            if t.size == 0:
                continue
            xs.append(lagged_counts(seg, t, self.bin_size, self.n_lags))
            ys.append(y)
        if not xs:
            raise ValueError("no finite behaviour samples to fit the Wiener filter on.")
        X, Y = np.concatenate(xs), np.concatenate(ys).astype(np.float64)
        if subsample and X.shape[0] > self.max_train_samples:
            idx = np.sort(rng.choice(X.shape[0], self.max_train_samples, replace=False))
            X, Y = X[idx], Y[idx]
        return X.astype(np.float64), Y

    @staticmethod
    def _solve(gram: np.ndarray, xty: np.ndarray, alpha: float) -> np.ndarray:
        """Ridge solution from the Gram matrix (computed once for every alpha)."""
        A = gram + alpha * np.eye(gram.shape[0])
        A[-1, -1] -= alpha  # no penalty on the bias column
        return np.linalg.solve(A, xty)

    def fit(self, segments: Sequence[Segment], seed: int = 0) -> "WienerFilter":
        X, Y = self._design(segments, True, np.random.default_rng(seed))
        self.mean = X.mean(0)
        self.scale = X.std(0) + 1e-6
        Xs = np.hstack([(X - self.mean) / self.scale, np.ones((X.shape[0], 1))])
        n_fit = max(2, int(0.8 * Xs.shape[0]))
        best, best_alpha = -np.inf, float(self.alphas[0])
        gram_fit, xty_fit = Xs[:n_fit].T @ Xs[:n_fit], Xs[:n_fit].T @ Y[:n_fit]
        if Xs.shape[0] - n_fit >= 2:
            for a in self.alphas:
                w = self._solve(gram_fit, xty_fit, float(a))
                score = r2_score(Y[n_fit:], Xs[n_fit:] @ w)
                if score > best:
                    best, best_alpha = score, float(a)
        self.alpha = best_alpha
        tail = Xs[n_fit:]
        self.weights = self._solve(gram_fit + tail.T @ tail, xty_fit + tail.T @ Y[n_fit:], best_alpha)
        return self

    def predict(self, segment: Segment, times: np.ndarray) -> np.ndarray:
        if self.weights is None:
            raise ValueError("WienerFilter.predict called before fit().")
        X = lagged_counts(segment, times, self.bin_size, self.n_lags).astype(np.float64)
        Xs = np.hstack([(X - self.mean) / self.scale, np.ones((X.shape[0], 1))])
        return Xs @ self.weights
