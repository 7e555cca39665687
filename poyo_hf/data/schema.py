"""The poyo_hf dataset schema for spiking recordings.

A *recording* (one session) is held in memory as a :class:`SessionRecording` (numpy arrays) and
stored on disk / on the Hub as parquet rows, one row per *segment*: a contiguous stretch of the
session that lies inside exactly one split interval (train, valid or test). Segments are long
(up to ``max_segment_s`` seconds, default 60 s), not pre-cut context windows, so the POYO sampler
can draw 1 s windows at a fresh random offset every epoch (Azabou et al. 2023, sec. 3.4).

Row columns (``datasets`` features, see :func:`segment_features`):

========================  ==========================================  ==============================
column                    type                                        meaning
========================  ==========================================  ==============================
session_id                string                                      globally unique session id
subject_id                string                                      animal / participant
task                      string                                      e.g. ``center_out_reaching``
brain_region              string                                      e.g. ``M1`` or ``M1,PMd``
lab                       string                                      lab / data source
species                   string                                      e.g. ``macaca_mulatta``
split                     string                                      ``train`` / ``valid`` / ``test``
segment_index             int32                                       position of the row in session
start, end                float64                                     segment bounds, session clock (s)
unit_ids                  list<string>                                ALL units of the session, each
                                                                      globally unique (``session/unit``)
spike_times               list<float64>                               sorted, inside [start, end)
spike_unit_index          list<int32>                                 row of ``unit_ids`` per spike
behavior_name             string                                      e.g. ``hand_vel``
behavior_timestamps       list<float64>                               sorted, inside [start, end)
behavior_values           list<fixed_size_list<float32, D>>           (T, D) target, NaN = missing
position_values           list<fixed_size_list<float32, D>>           (T, D) optional position, or []
epoch_start, epoch_end    list<float64>                               behaviour epochs in segment
epoch_label               list<string>                                hold/reach/return/random/invalid
trial_start, trial_end    list<float64>                               trials that start in segment
========================  ==========================================  ==============================

Behaviour epochs drive both the loss weights (:data:`DEFAULT_EPOCH_WEIGHTS`, the POYO recipe:
reach 5.0, hold 0.1, return 1.0, random 1.0, invalid 0.0) and the evaluation mask
(:data:`DEFAULT_EVAL_EPOCHS`). Samples outside every epoch get weight 1.0 and are evaluated;
samples whose behaviour is NaN always get weight 0 and are never evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

EPOCH_LABELS: tuple[str, ...] = ("hold", "reach", "return", "random", "invalid")
#: Loss weight per behaviour epoch (POYO recipe, spec sec. 6).
DEFAULT_EPOCH_WEIGHTS: dict[str, float] = {
    "hold": 0.1,
    "reach": 5.0,
    "return": 1.0,
    "random": 1.0,
    "invalid": 0.0,
}
#: Epochs on which R^2 is reported ("the task's eval intervals": reaches, random-target sequences).
DEFAULT_EVAL_EPOCHS: tuple[str, ...] = ("reach", "random")
SPLITS: tuple[str, ...] = ("train", "valid", "test")
METADATA_FIELDS: tuple[str, ...] = ("subject_id", "task", "brain_region", "lab", "species")


class SchemaError(ValueError):
    """Raised when a recording or a row does not satisfy the schema; the message names the
    session and the field."""


def _intervals(starts: Any, ends: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(starts, dtype=np.float64).reshape(-1)
    e = np.asarray(ends, dtype=np.float64).reshape(-1)
    if s.shape != e.shape:
        raise SchemaError(f"{where}: {s.size} starts but {e.size} ends; give one end per start.")
    if s.size and (not np.all(np.isfinite(s)) or not np.all(np.isfinite(e))):
        raise SchemaError(f"{where}: interval bounds must be finite numbers.")
    if np.any(e < s):
        i = int(np.flatnonzero(e < s)[0])
        raise SchemaError(f"{where}: interval {i} ends ({float(e[i])}) before it starts ({float(s[i])}).")
    return s, e


@dataclass
class SessionRecording:
    """One recording session in memory (all times in seconds on the session clock).

    Args:
        session_id: globally unique id, e.g. ``"perich/c_20131003"``.
        unit_ids: (N,) strings, globally unique across sessions (prefix them with the session).
        spike_times: (S,) float64 spike times, sorted.
        spike_unit_index: (S,) int, row of ``unit_ids`` for each spike.
        behavior_timestamps: (T,) float64 sample times of the behaviour, sorted.
        behavior_values: (T, D) float32 decoding target (e.g. hand velocity); NaN = missing.
        behavior_name: name of the target stream (``hand_vel``, ``cursor_vel``, ...).
        position_values: optional (T, D) position sampled at the same times.
        epochs: dict label -> (starts, ends); labels from :data:`EPOCH_LABELS`.
        trials: (starts, ends) of the trials, or None.
        splits: dict split -> (starts, ends) intervals; split names from :data:`SPLITS`.
        subject_id, task, brain_region, lab, species: session metadata.
    """

    session_id: str
    unit_ids: np.ndarray
    spike_times: np.ndarray
    spike_unit_index: np.ndarray
    behavior_timestamps: np.ndarray
    behavior_values: np.ndarray
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    behavior_name: str = "hand_vel"
    position_values: np.ndarray | None = None
    epochs: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    trials: tuple[np.ndarray, np.ndarray] | None = None
    subject_id: str = "unknown"
    task: str = "unknown"
    brain_region: str = "unknown"
    lab: str = "unknown"
    species: str = "unknown"
    source: str = ""

    def __post_init__(self) -> None:
        self.unit_ids = np.asarray(self.unit_ids, dtype=str).reshape(-1)
        self.spike_times = np.asarray(self.spike_times, dtype=np.float64).reshape(-1)
        self.spike_unit_index = np.asarray(self.spike_unit_index).reshape(-1)
        self.behavior_timestamps = np.asarray(self.behavior_timestamps, dtype=np.float64).reshape(-1)
        values = np.asarray(self.behavior_values, dtype=np.float32)
        self.behavior_values = values[:, None] if values.ndim == 1 else values
        if self.position_values is not None:
            pos = np.asarray(self.position_values, dtype=np.float32)
            self.position_values = pos[:, None] if pos.ndim == 1 else pos

    @property
    def behavior_dim(self) -> int:
        return int(self.behavior_values.shape[1])

    @property
    def duration(self) -> float:
        """Total duration of the split intervals (s)."""
        return float(sum(np.sum(np.asarray(e, float) - np.asarray(s, float)) for s, e in self.splits.values()))

    def validate(self) -> "SessionRecording":
        """Check every field; raise :class:`SchemaError` naming the session and the field."""
        where = f"session {self.session_id!r}"
        if not isinstance(self.session_id, str) or not self.session_id:
            raise SchemaError(f"session_id must be a non-empty string, got {self.session_id!r}.")
        n_units = self.unit_ids.size
        if n_units == 0:
            raise SchemaError(f"{where}: unit_ids is empty; a session needs at least one unit.")
        uniq, counts = np.unique(self.unit_ids, return_counts=True)
        if np.any(counts > 1):
            raise SchemaError(
                f"{where}: unit_ids has duplicates ({[str(u) for u in uniq[counts > 1][:5]]}); "
                "unit ids must be unique (prefix them with the session id)."
            )
        if self.spike_times.shape != self.spike_unit_index.shape:
            raise SchemaError(
                f"{where}: spike_times has {self.spike_times.size} entries but spike_unit_index "
                f"has {self.spike_unit_index.size}; they must have one entry per spike."
            )
        if self.spike_unit_index.size and not np.issubdtype(self.spike_unit_index.dtype, np.integer):
            raise SchemaError(
                f"{where}: spike_unit_index must be integers, got dtype {self.spike_unit_index.dtype}."
            )
        if not np.all(np.isfinite(self.spike_times)):
            raise SchemaError(f"{where}: spike_times contains NaN or inf; drop those spikes first.")
        if self.spike_times.size > 1 and np.any(np.diff(self.spike_times) < 0):
            raise SchemaError(f"{where}: spike_times is not sorted; sort spikes by time first.")
        if self.spike_unit_index.size and (
            self.spike_unit_index.min() < 0 or self.spike_unit_index.max() >= n_units
        ):
            raise SchemaError(
                f"{where}: spike_unit_index must lie in [0, {n_units}); got range "
                f"[{self.spike_unit_index.min()}, {self.spike_unit_index.max()}]."
            )
        # Duplicate (unit, time) pairs are recording artefacts (double-counted spikes).
        if self.spike_times.size > 1:
            same_t = np.flatnonzero(np.diff(self.spike_times) == 0)
            if same_t.size and np.any(
                self.spike_unit_index[same_t] == self.spike_unit_index[same_t + 1]
            ):
                i = int(same_t[self.spike_unit_index[same_t] == self.spike_unit_index[same_t + 1]][0])
                raise SchemaError(
                    f"{where}: spike_times has a duplicate spike of unit "
                    f"{str(self.unit_ids[self.spike_unit_index[i]])!r} at t={float(self.spike_times[i])}; "
                    "remove duplicated spikes."
                )
        t, v = self.behavior_timestamps, self.behavior_values
        if t.size == 0:
            raise SchemaError(f"{where}: behavior_timestamps is empty; the session has no behaviour.")
        if v.ndim != 2 or v.shape[0] != t.size:
            raise SchemaError(
                f"{where}: behavior_values has shape {v.shape} but there are {t.size} "
                "behavior_timestamps; expected (T, D)."
            )
        if not np.all(np.isfinite(t)) or np.any(np.diff(t) <= 0):
            raise SchemaError(
                f"{where}: behavior_timestamps must be finite and strictly increasing."
            )
        if self.position_values is not None and self.position_values.shape[0] != t.size:
            raise SchemaError(
                f"{where}: position_values has {self.position_values.shape[0]} rows but there "
                f"are {t.size} behavior_timestamps."
            )
        for label, (s, e) in self.epochs.items():
            if label not in EPOCH_LABELS:
                raise SchemaError(f"{where}: epoch label {label!r} unknown; use one of {EPOCH_LABELS}.")
            _intervals(s, e, f"{where}, epochs[{label!r}]")
        if self.trials is not None:
            _intervals(*self.trials, f"{where}, trials")
        if not self.splits:
            raise SchemaError(f"{where}: no split intervals; give at least splits['train'].")
        total = 0.0
        spans: list[tuple[float, float, str]] = []
        for name, (s, e) in self.splits.items():
            if name not in SPLITS:
                raise SchemaError(f"{where}: split {name!r} unknown; use one of {SPLITS}.")
            s, e = _intervals(s, e, f"{where}, splits[{name!r}]")
            total += float(np.sum(e - s))
            spans += [(float(a), float(b), name) for a, b in zip(s, e)]
        if total <= 0:
            raise SchemaError(f"{where}: split intervals have zero total duration.")
        for a, b, name in spans:
            if b <= a:
                raise SchemaError(
                    f"{where}: a splits[{name!r}] interval has zero duration (at {a}); drop empty intervals."
                )
        # Overlapping intervals would put the same spikes in two splits (test data leaking into
        # training); touching intervals are fine.
        spans.sort()
        for (a0, b0, n0), (a1, b1, n1) in zip(spans, spans[1:]):
            if a1 < b0 - 1e-12:
                raise SchemaError(
                    f"{where}: split intervals overlap: {n0} [{a0}, {b0}) and {n1} [{a1}, {b1}); "
                    "make the train / valid / test intervals disjoint."
                )
        return self

    # ------------------------------------------------------------------ rows
    def to_rows(self, max_segment_s: float = 60.0) -> list[dict[str, Any]]:
        """Cut the session into segment rows (one split each, at most ``max_segment_s`` long)."""
        self.validate()
        if max_segment_s <= 0:
            raise ValueError(f"max_segment_s must be > 0, got {max_segment_s}.")
        rows: list[dict[str, Any]] = []
        pieces: list[tuple[str, float, float]] = []
        for split, (starts, ends) in self.splits.items():
            for s, e in zip(np.asarray(starts, float), np.asarray(ends, float), strict=True):
                n = max(1, int(np.ceil((e - s) / max_segment_s - 1e-9)))
                edges = np.linspace(s, e, n + 1)
                pieces += [(split, float(a), float(b)) for a, b in zip(edges[:-1], edges[1:])]
        pieces.sort(key=lambda p: p[1])
        d = self.behavior_dim
        for k, (split, a, b) in enumerate(pieces):
            i0, i1 = np.searchsorted(self.spike_times, [a, b], side="left")
            j0, j1 = np.searchsorted(self.behavior_timestamps, [a, b], side="left")
            ep_s, ep_e, ep_l = [], [], []
            for label, (s, e) in self.epochs.items():
                s, e = np.asarray(s, float), np.asarray(e, float)
                keep = (e > a) & (s < b)
                ep_s += np.maximum(s[keep], a).tolist()
                ep_e += np.minimum(e[keep], b).tolist()
                ep_l += [label] * int(keep.sum())
            order = np.argsort(ep_s, kind="stable")
            tr_s: list[float] = []
            tr_e: list[float] = []
            if self.trials is not None:
                ts, te = (np.asarray(x, float) for x in self.trials)
                keep = (ts >= a) & (ts < b)
                tr_s, tr_e = ts[keep].tolist(), te[keep].tolist()
            pos = (
                self.position_values[j0:j1]
                if self.position_values is not None
                else np.zeros((0, d), np.float32)
            )
            rows.append(
                {
                    "session_id": self.session_id,
                    "subject_id": self.subject_id,
                    "task": self.task,
                    "brain_region": self.brain_region,
                    "lab": self.lab,
                    "species": self.species,
                    "split": split,
                    "segment_index": k,
                    "start": a,
                    "end": b,
                    "unit_ids": self.unit_ids.tolist(),
                    "spike_times": self.spike_times[i0:i1],
                    "spike_unit_index": self.spike_unit_index[i0:i1].astype(np.int32),
                    "behavior_name": self.behavior_name,
                    "behavior_timestamps": self.behavior_timestamps[j0:j1],
                    "behavior_values": self.behavior_values[j0:j1],
                    "position_values": pos,
                    "epoch_start": [ep_s[i] for i in order],
                    "epoch_end": [ep_e[i] for i in order],
                    "epoch_label": [ep_l[i] for i in order],
                    "trial_start": tr_s,
                    "trial_end": tr_e,
                }
            )
        return rows


def segment_features(behavior_dim: int, position_dim: int | None = None) -> Any:
    """The ``datasets.Features`` of a segment row (see the module docstring)."""
    from datasets import Features, List, Value

    return Features(
        {
            "session_id": Value("string"),
            "subject_id": Value("string"),
            "task": Value("string"),
            "brain_region": Value("string"),
            "lab": Value("string"),
            "species": Value("string"),
            "split": Value("string"),
            "segment_index": Value("int32"),
            "start": Value("float64"),
            "end": Value("float64"),
            "unit_ids": List(Value("string")),
            "spike_times": List(Value("float64")),
            "spike_unit_index": List(Value("int32")),
            "behavior_name": Value("string"),
            "behavior_timestamps": List(Value("float64")),
            "behavior_values": List(List(Value("float32"), length=behavior_dim)),
            "position_values": List(List(Value("float32"), length=position_dim or behavior_dim)),
            "epoch_start": List(Value("float64")),
            "epoch_end": List(Value("float64")),
            "epoch_label": List(Value("string")),
            "trial_start": List(Value("float64")),
            "trial_end": List(Value("float64")),
        }
    )


def epoch_weights(
    timestamps: np.ndarray,
    epoch_start: np.ndarray,
    epoch_end: np.ndarray,
    epoch_label: list[str] | np.ndarray,
    weights: dict[str, float] | None = None,
) -> np.ndarray:
    """Per-sample loss weight from behaviour epochs (later epochs win where they overlap)."""
    weights = DEFAULT_EPOCH_WEIGHTS if weights is None else weights
    w = np.ones(len(timestamps), dtype=np.float32)
    for s, e, lab in zip(epoch_start, epoch_end, epoch_label, strict=True):
        w[(timestamps >= s) & (timestamps < e)] = weights.get(str(lab), 1.0)
    return w


def eval_mask(
    timestamps: np.ndarray,
    epoch_start: np.ndarray,
    epoch_end: np.ndarray,
    epoch_label: list[str] | np.ndarray,
    eval_epochs: tuple[str, ...] = DEFAULT_EVAL_EPOCHS,
) -> np.ndarray:
    """Boolean mask of samples to score: inside an eval epoch, or everywhere if the session
    has no eval epochs at all; ``invalid`` epochs are always excluded."""
    t = np.asarray(timestamps)
    labels = [str(x) for x in epoch_label]
    has_eval = any(lab in eval_epochs for lab in labels)
    m = np.zeros(t.shape, bool) if has_eval else np.ones(t.shape, bool)
    for s, e, lab in zip(epoch_start, epoch_end, labels, strict=True):
        inside = (t >= s) & (t < e)
        if lab in eval_epochs:
            m |= inside
    for s, e, lab in zip(epoch_start, epoch_end, labels, strict=True):
        if lab == "invalid":
            m &= ~((t >= s) & (t < e))
    return m
