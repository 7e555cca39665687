"""Evaluation with stitching, beside the Wiener-filter baseline, and the plots.

``evaluate_decoder`` runs a POYO decoder over the 1 s / 0.5 s-step tiling of every segment of an
evaluation split, stitches overlapping predictions, and scores R^2 per session on the task's
eval samples. ``wiener_baseline`` fits one Wiener filter per session on its train split and
scores it on exactly the same stitched samples, so every result is read beside the classical
decoder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.stream import PoyoWindowStream
from ..data.windows import Segment
from .metrics import StitchedSession, Stitcher, mean_r2, r2_score, session_r2
from .wiener import WienerFilter


@torch.no_grad()
def predict_stitched(
    model: Any,
    processor: Any,
    segments: Sequence[Segment],
    batch_size: int = 32,
    step: float = 0.5,
    device: torch.device | str | None = None,
    gather: Any = None,
) -> dict[str, StitchedSession]:
    """Stitched predictions per session over the evaluation tiling of ``segments``."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    stream = PoyoWindowStream(list(segments), processor, batch_size=batch_size, train=False, eval_step=step)
    stitcher = Stitcher()
    inv_session = {processor.session_row(s): s for s in processor.session_vocab}
    for batch in stream:
        inputs = {k: v.to(device) for k, v in batch.items() if k not in ("window_start", "eval_mask", "labels", "output_weights")}
        pred = model(**inputs).predictions.float().cpu()
        stitcher.add(
            [inv_session[int(i)] for i in batch["session_index"]],
            batch["window_start"].numpy(),
            batch["output_timestamps"].numpy(),
            batch["output_mask"].numpy(),
            pred.numpy(),
            batch["labels"].numpy(),
            batch["eval_mask"].numpy(),
        )
    if was_training:
        model.train()
    return stitcher.sessions()


def wiener_baseline(
    train_segments: Sequence[Segment],
    stitched: Mapping[str, StitchedSession],
    eval_segments: Sequence[Segment],
    **filter_kwargs: Any,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Per-session Wiener filters fit on ``train_segments``, scored on the stitched samples."""
    by_session_train: dict[str, list[Segment]] = {}
    for seg in train_segments:
        by_session_train.setdefault(seg.session_id, []).append(seg)
    scores: dict[str, float] = {}
    predictions: dict[str, np.ndarray] = {}
    for sid, s in stitched.items():
        if sid not in by_session_train:
            continue
        wf = WienerFilter(**filter_kwargs).fit(by_session_train[sid])
        pred = np.full_like(s.predictions, np.nan)
        for seg in (x for x in eval_segments if x.session_id == sid):
            inside = (s.timestamps >= seg.start) & (s.timestamps < seg.end)
            if inside.any():
                pred[inside] = wf.predict(seg, s.timestamps[inside])
        keep = s.eval_mask & np.isfinite(s.targets).all(1) & np.isfinite(pred).all(1)
        if keep.sum() >= 2:
            scores[sid] = r2_score(s.targets[keep], pred[keep])
        predictions[sid] = pred
    return scores, predictions


def evaluate_decoder(
    model: Any,
    processor: Any,
    eval_segments: Sequence[Segment],
    train_segments: Sequence[Segment] | None = None,
    batch_size: int = 32,
    step: float = 0.5,
    with_baseline: bool = True,
) -> dict[str, Any]:
    """R^2 per session (stitched) and its mean, plus the Wiener baseline when train segments are given."""
    stitched = predict_stitched(model, processor, eval_segments, batch_size=batch_size, step=step)
    per_session = session_r2(stitched)
    result: dict[str, Any] = {
        "r2": mean_r2(per_session),
        "r2_per_session": per_session,
        "n_eval_samples": {sid: int(s.eval_mask.sum()) for sid, s in stitched.items()},
        "window_length_s": float(processor.sequence_length),
        "window_step_s": step,
    }
    wiener_pred: dict[str, np.ndarray] = {}
    if with_baseline and train_segments:
        wiener, wiener_pred = wiener_baseline(train_segments, stitched, eval_segments)
        result["wiener_r2"] = mean_r2(wiener)
        result["wiener_r2_per_session"] = wiener
    result["_stitched"] = stitched
    result["_wiener_predictions"] = wiener_pred
    return result


def public_results(result: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable part of :func:`evaluate_decoder`'s result."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def write_results(path: str | os.PathLike, results: Mapping[str, Any]) -> Path:
    """Write JSON atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)
    return path


def plot_sessions(
    result: Mapping[str, Any],
    eval_segments: Sequence[Segment],
    out_dir: str | os.PathLike,
    max_sessions: int = 8,
    trials_per_session: int = 3,
) -> list[Path]:
    """PNG per session: decoded (POYO, Wiener) vs true velocity over a few trials / segments."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    stitched: Mapping[str, StitchedSession] = result["_stitched"]
    wiener = result.get("_wiener_predictions", {})
    for sid in sorted(stitched)[:max_sessions]:
        s = stitched[sid]
        segs = [x for x in eval_segments if x.session_id == sid]
        spans = [(a, b) for x in segs for a, b in zip(x.trial_start, x.trial_end)] or [(x.start, x.end) for x in segs]
        spans = spans[:trials_per_session]
        D = s.targets.shape[1]
        fig, axes = plt.subplots(D, len(spans) or 1, figsize=(4 * max(1, len(spans)), 2.2 * D), squeeze=False)
        for j, (a, b) in enumerate(spans):
            m = (s.timestamps >= a) & (s.timestamps < b)
            for d in range(D):
                ax = axes[d, j]
                ax.plot(s.timestamps[m] - a, s.targets[m, d], color="k", lw=1.2, label="true")
                ax.plot(s.timestamps[m] - a, s.predictions[m, d], color="tab:blue", lw=1.0, label="POYO")
                if sid in wiener:
                    ax.plot(s.timestamps[m] - a, wiener[sid][m, d], color="tab:orange", lw=0.8, alpha=0.8, label="Wiener")
                ax.set_xlabel("time in trial (s)")
                if j == 0:
                    ax.set_ylabel(f"dim {d}")
        axes[0, 0].legend(fontsize=7, loc="upper right")
        r2 = result["r2_per_session"].get(sid, float("nan"))
        wr2 = result.get("wiener_r2_per_session", {}).get(sid, float("nan"))
        fig.suptitle(f"{sid}: R^2 POYO {r2:.3f}, Wiener {wr2:.3f}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"decoded_{sid.replace('/', '_')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
