"""Decoding metrics: R^2 and stitching of overlapping evaluation windows.

POYO evaluates on 1 s windows tiled with a 0.5 s step; a behaviour sample covered by several
windows gets the average of their predictions ("stitching"), and R^2 is computed per session
(uniform average over output dims, as sklearn's ``r2_score``), then averaged over sessions
(Azabou et al. 2023; spec sec. 6).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

# Stitching groups predictions by timestamp; windows built from the same float64 session
# clock give bit-identical times, this tolerance only absorbs float32 round trips.
_TIME_QUANTUM = 1e-6


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Coefficient of determination, uniform average over dims (sklearn's default).

    y_true, y_pred: (N, D). A dimension with zero variance scores 1.0 if predicted exactly and
    0.0 otherwise (sklearn's convention).
    """
    y_true = np.asarray(y_true, np.float64)
    y_pred = np.asarray(y_pred, np.float64)
    if y_true.ndim == 1:
        y_true, y_pred = y_true[:, None], y_pred[:, None]
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must have the same shape.")
    if y_true.shape[0] < 2:
        raise ValueError(f"R^2 needs at least 2 samples, got {y_true.shape[0]}.")
    ss_res = ((y_true - y_pred) ** 2).sum(0)
    ss_tot = ((y_true - y_true.mean(0)) ** 2).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_dim = np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), np.where(ss_res == 0, 1.0, 0.0))
    return float(per_dim.mean())


@dataclass
class StitchedSession:
    """Stitched predictions of one session, sorted by time."""

    timestamps: np.ndarray  # (N,) float64, session clock
    predictions: np.ndarray  # (N, D) mean over the windows covering each sample
    targets: np.ndarray  # (N, D)
    eval_mask: np.ndarray  # (N,) bool
    coverage: np.ndarray  # (N,) how many windows covered the sample


@dataclass
class Stitcher:
    """Accumulates window predictions and averages those of the same (session, timestamp)."""

    _parts: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]] = field(default_factory=dict)

    def add(
        self,
        session_ids: list[str],
        window_start: np.ndarray,
        output_timestamps: np.ndarray,
        output_mask: np.ndarray,
        predictions: np.ndarray,
        targets: np.ndarray,
        eval_mask: np.ndarray,
    ) -> None:
        """Add a batch: (B,) sessions and window starts; (B, N_out[, D]) arrays."""
        for b, sid in enumerate(session_ids):
            m = np.asarray(output_mask[b], bool)
            t = float(window_start[b]) + np.asarray(output_timestamps[b], np.float64)[m]
            self._parts.setdefault(sid, []).append(
                (t, np.asarray(predictions[b])[m], np.asarray(targets[b])[m], np.asarray(eval_mask[b], bool)[m])
            )

    def sessions(self) -> dict[str, StitchedSession]:
        out = {}
        for sid, parts in self._parts.items():
            t = np.concatenate([p[0] for p in parts])
            pred = np.concatenate([p[1] for p in parts]).astype(np.float64)
            tgt = np.concatenate([p[2] for p in parts]).astype(np.float64)
            em = np.concatenate([p[3] for p in parts])
            key = np.round(t / _TIME_QUANTUM).astype(np.int64)
            uniq, first, inverse, counts = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
            sums = np.zeros((uniq.size, pred.shape[1]))
            np.add.at(sums, inverse, pred)
            out[sid] = StitchedSession(
                timestamps=t[first],
                predictions=sums / counts[:, None],
                targets=tgt[first],
                eval_mask=em[first],
                coverage=counts,
            )
        return out


def session_r2(stitched: Mapping[str, StitchedSession]) -> dict[str, float]:
    """R^2 of every session on its eval samples (finite targets only)."""
    out = {}
    for sid, s in stitched.items():
        keep = s.eval_mask & np.isfinite(s.targets).all(1)
        if keep.sum() >= 2:
            out[sid] = r2_score(s.targets[keep], s.predictions[keep])
    return out


def mean_r2(per_session: Mapping[str, float]) -> float:
    return float(np.mean(list(per_session.values()))) if per_session else float("nan")
