"""Converters from common spike-data layouts to :class:`~poyo_hf.data.schema.SessionRecording`.

Every converter returns a *validated* recording; every error is a :class:`ValueError` (usually a
:class:`~poyo_hf.data.schema.SchemaError`) whose message names the file or session and the field.

Sources
-------
:func:`from_nwb`
    A DANDI / Neural Latents Benchmark NWB file (``units`` table with ragged ``spike_times`` and an
    optional ``heldout`` column; behaviour ``TimeSeries`` under ``processing/behavior``; a
    ``trials`` table with ``start_time``, ``stop_time`` and optional ``split`` and
    ``move_onset_time``). Needs ``pip install 'poyo-hf[nwb]'``.
:func:`from_arrays` / :func:`from_npz`
    Event arrays: one spike time and one unit id per spike, plus a sampled behaviour.
:func:`from_binned`
    A (T, N) count matrix, turned back into spike events with a documented placement rule.
:func:`from_mc_maze_csv`
    The two real MC_Maze trials shipped as CSV in ``shared/data/mc_maze_2trials``.

Conventions shared by all converters
------------------------------------
* Unit ids are made globally unique as ``f"{session_id}/{unit}"`` (ids that already start with
  ``f"{session_id}/"`` are kept as they are).
* Spikes are sorted by time, ties broken by unit index (a stable, deterministic order).
* NaN spike times and duplicated spikes (same unit, same time) are errors; NaN *behaviour* is kept
  as NaN and means "missing" (weight 0 and never evaluated downstream, see ``schema.py``).
* When no split is given the whole session is ``train``. The session span is
  ``[first sample, last sample + one behaviour step)`` so that the last behaviour sample and the
  last spike fall inside the half-open split interval.
* Split names ``val`` and ``validation`` (NLB spelling) are mapped to ``valid``. Intervals of one
  split that touch or overlap are merged; intervals of different splits must not overlap (that
  would leak training data into evaluation): explicit ``splits`` that do are an error, and a
  trial-derived split interval is cut where a later trial of another split starts.

Epoch rule for trials with a ``move_onset_time`` (:func:`from_nwb`)
-------------------------------------------------------------------
For every trial with a finite move onset ``m`` inside ``[start_time, stop_time)``:

* ``reach`` = ``[m + reach_window[0], m + reach_window[1])`` clipped to the trial; the default
  ``reach_window=(-0.25, 0.45)`` is the NLB MC_Maze evaluation window (move onset -250..+450 ms),
  so the R^2 reported on ``reach`` epochs is computed on the same samples NLB scores;
* ``hold`` = ``[start_time, reach start)`` when non-empty (the hand rests at the centre during the
  target / delay period; POYO weights it 0.1);
* the rest of the trial (after the reach window) carries no label (weight 1).

Trials without a move onset get no epochs; files without ``move_onset_time`` get no epochs.

Spike placement rule for binned counts (:func:`from_binned`)
------------------------------------------------------------
Bin ``i`` covers ``[t_i, t_i + w)`` with ``t_i = t0 + i * w``. For ``k`` spikes of one unit in a bin:

* ``placement="center"``: ``t_i + (j + 0.5) * w / k`` for ``j = 0..k-1`` (deterministic, evenly
  spaced; ``k = 1`` gives the bin centre);
* ``placement="uniform"``: ``t_i + u_j * w`` with ``u_j`` uniform on ``[0, 1)`` drawn from
  ``numpy.random.default_rng(seed)`` in row-major (bin, unit) order, then sorted inside the bin.

Re-binning the produced spikes with the same edges gives back the input counts exactly.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .schema import EPOCH_LABELS, METADATA_FIELDS, SPLITS, SchemaError, SessionRecording

__all__ = [
    "from_arrays",
    "from_binned",
    "from_mc_maze_csv",
    "from_npz",
    "from_nwb",
    "normalize_split_name",
]

#: Accepted spellings of the split names (NLB writes ``val``).
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "valid",
    "valid": "valid",
    "validation": "valid",
    "test": "test",
}
#: NLB MC_Maze evaluation window around move onset, seconds (spec sec. 2).
NLB_REACH_WINDOW: tuple[float, float] = (-0.25, 0.45)


# --------------------------------------------------------------------------- helpers
def normalize_split_name(name: Any, where: str = "split") -> str:
    """Map ``train``/``val``/``valid``/``validation``/``test`` (any case, bytes ok) to a schema
    split name; raise :class:`SchemaError` otherwise."""
    key = _to_str(name).strip().lower()
    if key not in SPLIT_ALIASES:
        raise SchemaError(f"{where}: split {key!r} unknown; use one of {SPLITS} (or 'val').")
    return SPLIT_ALIASES[key]


def _to_str(x: Any) -> str:
    return x.decode() if isinstance(x, bytes | np.bytes_) else str(x)


def _as_str_array(a: np.ndarray) -> np.ndarray:
    """Unit ids as a numpy unicode array (vectorised for the common dtypes)."""
    a = np.asarray(a)
    if a.dtype.kind == "U":
        return a
    if a.dtype.kind == "S":
        return np.char.decode(a, "utf-8")
    if a.dtype.kind in "iub":
        return a.astype(str)
    return np.asarray([_to_str(x) for x in a.tolist()], dtype=str)


def _merge_intervals(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort intervals and merge the ones that overlap or touch."""
    if starts.size == 0:
        return starts.astype(np.float64), ends.astype(np.float64)
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    out_s, out_e = [float(s[0])], [float(e[0])]
    for a, b in zip(s[1:], e[1:], strict=True):
        if a <= out_e[-1]:
            out_e[-1] = max(out_e[-1], float(b))
        else:
            out_s.append(float(a))
            out_e.append(float(b))
    return np.asarray(out_s), np.asarray(out_e)


def _normalize_splits(
    splits: Mapping[str, Any], where: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Accept ``{name: (starts, ends)}`` or ``{name: [(s, e), ...]}``; alias split names; merge
    intervals per split; refuse overlaps between different splits."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, value in splits.items():
        split = normalize_split_name(name, where)
        arr = value
        if isinstance(value, tuple) and len(value) == 2:
            s, e = (np.asarray(v, dtype=np.float64).reshape(-1) for v in value)
        else:
            pairs = np.asarray(arr, dtype=np.float64)
            if pairs.size == 0:
                s = e = np.zeros(0)
            elif pairs.ndim != 2 or pairs.shape[1] != 2:
                raise SchemaError(
                    f"{where}: splits[{name!r}] must be (starts, ends) or a list of (start, end) "
                    f"pairs; got an array of shape {pairs.shape}."
                )
            else:
                s, e = pairs[:, 0], pairs[:, 1]
        if s.shape != e.shape:
            raise SchemaError(f"{where}: splits[{name!r}] has {s.size} starts but {e.size} ends.")
        if s.size and (not np.all(np.isfinite(s)) or not np.all(np.isfinite(e)) or np.any(e < s)):
            raise SchemaError(
                f"{where}: splits[{name!r}] intervals must be finite with end >= start."
            )
        if split in out:  # e.g. both "val" and "valid" given
            s = np.concatenate([out[split][0], s])
            e = np.concatenate([out[split][1], e])
        out[split] = _merge_intervals(s, e)
    _check_disjoint(out, where)
    return out


def _check_disjoint(splits: Mapping[str, tuple[np.ndarray, np.ndarray]], where: str) -> None:
    items = [(float(a), float(b), name) for name, (s, e) in splits.items() for a, b in zip(s, e)]
    items.sort()
    for (a0, b0, n0), (a1, b1, n1) in itertools.pairwise(items):
        if n0 != n1 and a1 < b0:
            raise SchemaError(
                f"{where}: split {n0!r} interval [{a0}, {b0}) overlaps split {n1!r} interval "
                f"[{a1}, {b1}); splits must be disjoint so evaluation data never leaks into "
                "training."
            )


def _splits_from_trials(
    starts: np.ndarray, ends: np.ndarray, labels: Sequence[Any], where: str
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int, int]:
    """Split intervals = trial spans grouped by their split label.

    Labels outside the known names (NLB writes ``'none'`` for unused trials) are left out. Where
    a trial runs past the start of a later trial of another split, its interval is cut at that
    start (a trial's tail must not leak into another split). Returns (splits, n_dropped,
    n_clipped)."""
    keys = [SPLIT_ALIASES.get(_to_str(lab).strip().lower()) for lab in labels]
    known = np.asarray([k is not None for k in keys], dtype=bool)
    dropped = int((~known).sum())
    if not known.any():
        seen = sorted({_to_str(x) for x in labels})
        raise SchemaError(
            f"{where}: no trial has a known split label (found {seen[:10]}); "
            f"use {SPLITS} or 'val'."
        )
    idx = np.flatnonzero(known)
    idx = idx[np.argsort(starts[idx], kind="stable")]
    s = starts[idx].astype(np.float64)
    e = ends[idx].astype(np.float64).copy()
    lab = [str(keys[i]) for i in idx]
    clipped = 0
    for i in range(s.size):
        k = i + 1
        while k < s.size and s[k] < e[i]:
            if lab[k] != lab[i]:
                e[i] = max(s[k], s[i])
                clipped += 1
                break
            k += 1
    splits = {
        name: (s[[j for j in range(s.size) if lab[j] == name]],
               e[[j for j in range(s.size) if lab[j] == name]])
        for name in dict.fromkeys(lab)
    }
    return _normalize_splits(splits, where), dropped, clipped


def _session_span(
    spike_times: np.ndarray, behavior_timestamps: np.ndarray, where: str
) -> tuple[float, float]:
    """``[first sample, last sample + one behaviour step)``, see the module docstring."""
    bt = behavior_timestamps[np.isfinite(behavior_timestamps)]
    st = spike_times[np.isfinite(spike_times)]
    if bt.size == 0 and st.size == 0:
        raise SchemaError(f"{where}: no spikes and no behaviour samples; the session is empty.")
    lo = min([x.min() for x in (bt, st) if x.size])
    step = float(np.median(np.diff(bt))) if bt.size > 1 else 0.0
    hi_candidates = []
    if bt.size:
        hi_candidates.append(float(bt.max()) + step)
    if st.size:
        hi_candidates.append(float(np.nextafter(st.max(), np.inf)))
    hi = max(hi_candidates)
    if not hi > lo:
        raise SchemaError(
            f"{where}: zero-duration session (all samples at t={lo}); give explicit `splits` "
            "or more than one behaviour sample."
        )
    return float(lo), float(hi)


def _prefix_units(units: np.ndarray, session_id: str, prefix: bool) -> np.ndarray:
    names = [_to_str(u) for u in units.tolist()]
    if prefix:
        head = f"{session_id}/"
        names = [n if n.startswith(head) else head + n for n in names]
    return np.asarray(names, dtype=str)


def _sort_spikes(times: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort by time, ties by unit index (deterministic)."""
    order = np.lexsort((index, times))
    return times[order], index[order]


def _check_spikes(
    times: np.ndarray, index: np.ndarray, unit_ids: np.ndarray, where: str
) -> None:
    """NaN / inf spike times and duplicated (unit, time) pairs are errors; call after sorting."""
    bad = ~np.isfinite(times)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise SchemaError(
            f"{where}: spike_times has {int(bad.sum())} NaN/inf value(s) (first for unit "
            f"{str(unit_ids[index[i]])!r}); drop those spikes first."
        )
    if times.size > 1:
        same = np.flatnonzero((np.diff(times) == 0) & (np.diff(index) == 0))
        if same.size:
            i = int(same[0])
            raise SchemaError(
                f"{where}: spike_times has {same.size} duplicated spike(s), first of unit "
                f"{str(unit_ids[index[i]])!r} at t={float(times[i])!r}; remove duplicated spikes."
            )


def _check_metadata(metadata: Mapping[str, Any], where: str) -> dict[str, str]:
    allowed = set(METADATA_FIELDS) | {"source"}
    unknown = sorted(set(metadata) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown metadata {unknown}; allowed: {sorted(allowed)}.")
    return {k: str(v) for k, v in metadata.items() if v is not None}


def _revalidate(rec: SessionRecording, where: str) -> SessionRecording:
    """Run the schema checks and prefix any failure with ``where`` (e.g. the file name)."""
    try:
        return rec.validate()
    except SchemaError as err:
        raise SchemaError(f"{where}: {err}") from None


def _behavior_array(values: Any, n: int, where: str, field: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    if v.ndim == 1:
        v = v[:, None]
    if v.ndim != 2 or v.shape[0] != n:
        raise SchemaError(
            f"{where}: {field} has shape {np.shape(values)} but there are {n} "
            "behavior_timestamps; expected (T,) or (T, D)."
        )
    return v


# --------------------------------------------------------------------------- arrays
def from_arrays(
    spike_times: Any,
    unit_ids: Any,
    behavior: Any,
    behavior_timestamps: Any,
    *,
    session_id: str,
    splits: Mapping[str, Any] | None = None,
    epochs: Mapping[str, Any] | None = None,
    trials: tuple[Any, Any] | None = None,
    units: Sequence[Any] | None = None,
    position: Any | None = None,
    behavior_name: str = "hand_vel",
    prefix_unit_ids: bool = True,
    **metadata: Any,
) -> SessionRecording:
    """Build a recording from spike events.

    Args:
        spike_times: (S,) spike times in seconds (any order; sorted here).
        unit_ids: (S,) unit id of each spike (strings or ints).
        behavior: (T,) or (T, D) decoding target; NaN = missing.
        behavior_timestamps: (T,) strictly increasing sample times (s).
        session_id: globally unique session id; unit ids become ``f"{session_id}/{unit}"``.
        splits: ``{split: (starts, ends)}`` or ``{split: [(s, e), ...]}``; ``val`` -> ``valid``.
            Default: the whole session is ``train``.
        epochs: ``{label: (starts, ends)}`` with labels from ``EPOCH_LABELS``.
        trials: ``(starts, ends)`` of the trials, or None.
        units: the full, ordered unit list (keeps units that never spike). Default: the sorted
            unique values of ``unit_ids``.
        position: optional (T, D') position sampled at ``behavior_timestamps``.
        behavior_name: name of the target stream.
        prefix_unit_ids: prefix unit ids with the session id (default True).
        **metadata: ``subject_id``, ``task``, ``brain_region``, ``lab``, ``species``, ``source``.
    """
    where = f"session {session_id!r}"
    meta = _check_metadata(metadata, where)
    t = np.asarray(spike_times, dtype=np.float64).reshape(-1)
    u_raw = np.asarray(unit_ids).reshape(-1)
    if t.shape != u_raw.shape:
        raise SchemaError(
            f"{where}: spike_times has {t.size} entries but unit_ids has {u_raw.size}; give one "
            "unit id per spike."
        )
    if units is None:
        vocab = np.unique(u_raw)
        if vocab.size == 0:
            raise SchemaError(
                f"{where}: zero units (spike_times is empty and no `units` list was given)."
            )
    else:
        vocab = np.asarray(list(units)).reshape(-1)
        if vocab.size == 0:
            raise SchemaError(f"{where}: `units` is empty; a session needs at least one unit.")
    # Map every spike to its row of the vocabulary (compare as strings: 3 and "3" are one unit).
    vocab_str = _as_str_array(vocab)
    if np.unique(vocab_str).size != vocab_str.size:
        uniq, cnt = np.unique(vocab_str, return_counts=True)
        raise SchemaError(f"{where}: duplicate unit ids {uniq[cnt > 1][:5].tolist()} in `units`.")
    spike_str = _as_str_array(u_raw) if u_raw.size else vocab_str[:0]
    order = np.argsort(vocab_str)
    pos_in_sorted = np.searchsorted(vocab_str[order], spike_str)
    pos_in_sorted = np.minimum(pos_in_sorted, vocab_str.size - 1)
    found = vocab_str[order][pos_in_sorted] == spike_str
    if not np.all(found):
        missing = np.unique(spike_str[~found])[:5].tolist()
        raise SchemaError(f"{where}: spikes of unit(s) {missing} not in the `units` list.")
    index = order[pos_in_sorted].astype(np.int64)
    names = _prefix_units(vocab_str, session_id, prefix_unit_ids)
    t, index = _sort_spikes(t, index)
    _check_spikes(t, index, names, where)

    bt = np.asarray(behavior_timestamps, dtype=np.float64).reshape(-1)
    bv = _behavior_array(behavior, bt.size, where, "behavior")
    pos = None if position is None else _behavior_array(position, bt.size, where, "position")
    if splits is None:
        lo, hi = _session_span(t, bt, where)
        split_map = {"train": (np.array([lo]), np.array([hi]))}
    else:
        split_map = _normalize_splits(splits, where)
    ep = {}
    for label, value in (epochs or {}).items():
        if label not in EPOCH_LABELS:
            raise SchemaError(f"{where}: epoch label {label!r} unknown; use one of {EPOCH_LABELS}.")
        s, e = value
        ep[label] = (np.asarray(s, np.float64).reshape(-1), np.asarray(e, np.float64).reshape(-1))
    tr = None
    if trials is not None:
        tr = tuple(np.asarray(x, np.float64).reshape(-1) for x in trials)
    rec = SessionRecording(
        session_id=session_id,
        unit_ids=names,
        spike_times=t,
        spike_unit_index=index,
        behavior_timestamps=bt,
        behavior_values=bv,
        behavior_name=behavior_name,
        position_values=pos,
        splits=split_map,
        epochs=ep,
        trials=tr,  # type: ignore[arg-type]
        **meta,
    )
    return rec.validate()


def from_npz(
    path: str | Path,
    *,
    session_id: str | None = None,
    behavior_name: str | None = None,
    **metadata: Any,
) -> SessionRecording:
    """Read a ``.npz`` archive of spike events (loaded with ``allow_pickle=False``: never unpickles).

    Keys (arrays; strings must be saved as numpy unicode arrays, not objects):

    ==========================  =========================================================
    ``spike_times``             (S,) float spike times (s)
    ``spike_units``             (S,) unit id per spike (``unit_ids`` accepted as alias)
    ``behavior``                (T,) or (T, D) decoding target, NaN = missing
    ``behavior_timestamps``     (T,) sample times (s)
    ``units`` (optional)        (N,) full ordered unit list (keeps silent units)
    ``position`` (optional)     (T, D') position at ``behavior_timestamps``
    ``trial_start``/``trial_end`` (optional) (K,) trial spans
    ``split`` (optional)        (K,) split per trial: train / val / valid / test
    ``behavior_name`` (opt.)    0-d string, default ``hand_vel``
    ==========================  =========================================================

    Without ``split`` the whole session is ``train``. ``session_id`` defaults to the file stem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except ValueError as err:  # object arrays need pickle, which we refuse
        raise ValueError(
            f"{path}: cannot read without unpickling ({err}); save string arrays as numpy "
            "unicode (e.g. np.asarray(ids, dtype=str)), not as Python objects."
        ) from None
    except Exception as err:  # noqa: BLE001 - zipfile / format errors of any kind
        raise ValueError(f"{path}: not a readable .npz archive ({err}).") from None
    where = str(path)
    for key in ("spike_times", "behavior", "behavior_timestamps"):
        if key not in data:
            raise SchemaError(f"{where}: missing key {key!r}; keys present: {sorted(data)}.")
    units_key = "spike_units" if "spike_units" in data else "unit_ids" if "unit_ids" in data else None
    if units_key is None:
        raise SchemaError(
            f"{where}: missing key 'spike_units' (or 'unit_ids'), the unit of each spike; keys "
            f"present: {sorted(data)}."
        )
    sid = session_id or path.stem
    splits = None
    trials = None
    if ("trial_start" in data) != ("trial_end" in data):
        raise SchemaError(f"{where}: give both 'trial_start' and 'trial_end', or neither.")
    if "trial_start" in data:
        ts = np.asarray(data["trial_start"], np.float64).reshape(-1)
        te = np.asarray(data["trial_end"], np.float64).reshape(-1)
        if ts.shape != te.shape:
            raise SchemaError(
                f"{where}: 'trial_start' has {ts.size} entries but 'trial_end' has {te.size}."
            )
        trials = (ts, te)
        if "split" in data:
            labels = np.asarray(data["split"]).reshape(-1)
            if labels.size != ts.size:
                raise SchemaError(
                    f"{where}: 'split' has {labels.size} entries but there are {ts.size} trials."
                )
            splits, _, _ = _splits_from_trials(ts, te, labels.tolist(), where)
    elif "split" in data:
        raise SchemaError(f"{where}: 'split' is given per trial; add 'trial_start'/'trial_end'.")
    name = behavior_name or (str(data["behavior_name"]) if "behavior_name" in data else "hand_vel")
    metadata.setdefault("source", f"npz:{path.name}")
    try:
        return from_arrays(
            data["spike_times"],
            data[units_key],
            data["behavior"],
            data["behavior_timestamps"],
            session_id=sid,
            splits=splits,
            trials=trials,
            units=data["units"].tolist() if "units" in data else None,
            position=data.get("position"),
            behavior_name=name,
            **metadata,
        )
    except SchemaError as err:
        raise SchemaError(f"{where}: {err}") from None


# --------------------------------------------------------------------------- binned
def from_binned(
    counts: Any,
    bin_width: float,
    *,
    t0: float = 0.0,
    unit_ids: Sequence[Any] | None = None,
    placement: str = "uniform",
    seed: int = 0,
    session_id: str = "binned",
    behavior: Any | None = None,
    behavior_timestamps: Any | None = None,
    behavior_name: str = "hand_vel",
    splits: Mapping[str, Any] | None = None,
    epochs: Mapping[str, Any] | None = None,
    trials: tuple[Any, Any] | None = None,
    **metadata: Any,
) -> SessionRecording:
    """Turn a binned count matrix into spike events (placement rule: module docstring).

    Args:
        counts: (T, N) non-negative integer counts (integral floats accepted), bin i covering
            ``[t0 + i * bin_width, t0 + (i + 1) * bin_width)``.
        bin_width: bin width in seconds, > 0.
        t0: start of the first bin (s).
        unit_ids: (N,) unit names (default ``0..N-1``); prefixed with ``session_id``.
        placement: ``"uniform"`` (seeded random, sorted in the bin) or ``"center"``.
        seed: RNG seed of the uniform placement.
        behavior: (T,) or (T, D) target, one row per bin, or sampled at ``behavior_timestamps``.
            Default: all-NaN (no behaviour; spikes-only sessions), one dimension.
        behavior_timestamps: sample times of ``behavior``; default the bin starts
            ``t0 + i * bin_width`` (the NLB / pandas convention for a binned row).
        splits, epochs, trials, **metadata: as in :func:`from_arrays`. Default split: the whole
            span ``[t0, t0 + T * bin_width)`` is ``train``.
    """
    where = f"session {session_id!r}"
    w = float(bin_width)
    if not np.isfinite(w) or w <= 0:
        raise ValueError(f"{where}: bin_width must be a finite number > 0 seconds, got {bin_width!r}.")
    if not np.isfinite(float(t0)):
        raise ValueError(f"{where}: t0 must be finite, got {t0!r}.")
    c = np.asarray(counts)
    if c.ndim != 2:
        raise SchemaError(f"{where}: counts must be 2-D (T bins, N units), got shape {c.shape}.")
    n_bins, n_units = c.shape
    if n_units == 0:
        raise SchemaError(f"{where}: counts has zero units (shape {c.shape}).")
    if n_bins == 0:
        raise SchemaError(f"{where}: counts has zero bins (shape {c.shape}); zero-duration session.")
    if c.dtype == bool:
        c = c.astype(np.int64)
    if np.issubdtype(c.dtype, np.floating):
        if not np.all(np.isfinite(c)):
            raise SchemaError(f"{where}: counts contains NaN or inf.")
        if np.any(c != np.round(c)):
            i, j = np.argwhere(c != np.round(c))[0]
            raise SchemaError(
                f"{where}: counts must be integers; counts[{i}, {j}] = {c[i, j].item()!r} is not "
                "(rates or smoothed data cannot be turned into spikes)."
            )
    elif not np.issubdtype(c.dtype, np.integer):
        raise SchemaError(f"{where}: counts must be numeric integers, got dtype {c.dtype}.")
    if np.any(c < 0):
        i, j = np.argwhere(c < 0)[0]
        raise SchemaError(f"{where}: counts must be >= 0; counts[{i}, {j}] = {c[i, j].item()!r}.")
    c = c.astype(np.int64)
    if unit_ids is None:
        unit_ids = list(range(n_units))
    units = list(unit_ids)
    if len(units) != n_units:
        raise SchemaError(
            f"{where}: {len(units)} unit_ids for {n_units} count columns; give one id per column."
        )
    if placement not in ("uniform", "center"):
        raise ValueError(f"{where}: placement must be 'uniform' or 'center', got {placement!r}.")

    # One entry per (bin, unit) with k > 0, in row-major order; then one per spike.
    bins, cols = np.nonzero(c)
    k = c[bins, cols]
    rep_bin = np.repeat(bins, k)
    rep_col = np.repeat(cols, k)
    starts = t0 + rep_bin.astype(np.float64) * w  # (S,) bin start of each spike
    if placement == "center":
        first = np.repeat(np.cumsum(k) - k, k)
        j = np.arange(rep_bin.size) - first  # rank of the spike inside its (bin, unit)
        kk = np.repeat(k, k).astype(np.float64)
        times = starts + (j + 0.5) * w / kk
    else:
        rng = np.random.default_rng(seed)
        offs = rng.random(rep_bin.size)
        group = np.repeat(np.arange(k.size), k)
        offs = offs[np.lexsort((offs, group))]  # sort inside each (bin, unit), groups stay put
        times = starts + offs * w
        # u * w can round up to the next bin edge; keep every spike inside its own bin.
        ends = t0 + (rep_bin.astype(np.float64) + 1.0) * w
        times = np.minimum(times, np.nextafter(ends, -np.inf))

    if behavior_timestamps is None:
        bt = t0 + np.arange(n_bins, dtype=np.float64) * w
    else:
        bt = np.asarray(behavior_timestamps, np.float64).reshape(-1)
    if behavior is None:
        bv = np.full((bt.size, 1), np.nan, np.float32)
        metadata.setdefault("source", "binned counts; no behaviour given (all NaN)")
    else:
        bv = behavior
    metadata.setdefault("source", f"binned counts, bin_width={w} s, placement={placement}")
    if splits is None:
        splits = {"train": (np.array([float(t0)]), np.array([t0 + n_bins * w]))}
    return from_arrays(
        times,
        _as_str_array(np.asarray(units))[rep_col],
        bv,
        bt,
        session_id=session_id,
        splits=splits,
        epochs=epochs,
        trials=trials,
        units=units,
        behavior_name=behavior_name,
        **metadata,
    )


# --------------------------------------------------------------------------- NWB
def _import_pynwb() -> Any:
    try:
        import pynwb
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Reading NWB files needs pynwb and h5py: pip install 'poyo-hf[nwb]'"
        ) from err
    return pynwb


def _timeseries_in(container: Any, prefix: str = "") -> dict[str, Any]:
    """All TimeSeries under a processing module, by name (nested ones also as ``parent/name``)."""
    from pynwb import TimeSeries

    found: dict[str, Any] = {}
    for name, obj in getattr(container, "data_interfaces", {}).items():
        if isinstance(obj, TimeSeries):
            found[prefix + name] = obj
        else:  # e.g. Position / BehavioralTimeSeries holding SpatialSeries / TimeSeries
            for child in getattr(obj, "children", []) or []:
                if isinstance(child, TimeSeries):
                    found.setdefault(child.name, child)
                    found[f"{name}/{child.name}"] = child
    return found


def _read_timeseries(ts: Any) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(ts.data[:], dtype=np.float64)
    if ts.timestamps is not None:
        t = np.asarray(ts.timestamps[:], dtype=np.float64).reshape(-1)
    else:
        start = float(ts.starting_time or 0.0)
        t = start + np.arange(data.shape[0], dtype=np.float64) / float(ts.rate)
    return t, data


def _column(table: Any, name: str) -> np.ndarray:
    return np.asarray(table[name].data[:])


def from_nwb(
    path: str | Path,
    *,
    behavior: str = "hand_vel",
    session_id: str | None = None,
    include_heldout: bool = True,
    position: str | None = "auto",
    reach_window: tuple[float, float] = NLB_REACH_WINDOW,
    subject_id: str | None = None,
    task: str | None = None,
    brain_region: str | None = None,
    lab: str | None = None,
    species: str | None = None,
) -> SessionRecording:
    """Read one NWB file in the DANDI / NLB layout (DANDI:000128 MC_Maze and friends).

    * ``nwb.units``: ragged ``spike_times`` (required); ``heldout`` (bool, optional: the NLB
      held-out units, dropped when ``include_heldout=False``); unit id = the table's ``id`` (or a
      ``unit_name`` / ``name`` column when present), prefixed with ``session_id``.
    * ``processing/behavior``: the TimeSeries named ``behavior`` (``hand_vel``, ``cursor_pos``,
      ...; also found inside ``Position``-like containers). If ``X_vel`` is requested and only
      ``X_pos`` exists, velocity is ``np.gradient(X_pos, t)`` and ``source`` says so. Values are
      the stored data (the TimeSeries ``conversion`` factor is not applied; its unit is noted in
      ``source``). NaN samples are kept: they mean "missing" (weight 0 downstream).
    * ``position="auto"``: for a ``X_vel`` target, ``X_pos`` sampled at the same timestamps is
      stored as ``position_values``; pass a TimeSeries name to pick one, None for none.
    * ``trials``: ``start_time``/``stop_time`` become ``trials``; the ``split`` column (``train``,
      ``val`` -> ``valid``, ``test``; other labels such as NLB's ``none`` are left out) gives the
      split intervals (trial spans, merged). Without a ``split`` column, or without a trials
      table, the whole session span is ``train``. ``move_onset_time`` gives epochs (rule in the
      module docstring; ``reach_window`` in seconds relative to move onset).
    * Metadata: ``subject_id`` / ``species`` from ``nwb.subject``, ``lab`` from ``nwb.lab`` or
      ``nwb.institution``, ``brain_region`` from the electrodes' ``location`` column; each can be
      overridden. ``nwb.session_description`` goes into ``source``.

    Spike times are sorted per unit, then globally; NaN spike times and duplicated spikes are
    errors naming the file, unit and time.
    """
    pynwb = _import_pynwb()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such NWB file.")
    where = str(path)
    try:
        io = pynwb.NWBHDF5IO(str(path), "r")
    except Exception as err:  # noqa: BLE001 - h5py/hdmf raise many types for non-NWB files
        raise ValueError(f"{where}: cannot open as NWB/HDF5 ({type(err).__name__}: {err}).") from None
    with io:
        try:
            nwb = io.read()
        except Exception as err:  # noqa: BLE001 - same: report one clear error
            raise ValueError(f"{where}: cannot read as NWB ({type(err).__name__}: {err}).") from None
        sid = session_id or path.stem
        where = f"{path} (session {sid!r})"

        # ---- units
        units = nwb.units
        if units is None:
            raise SchemaError(
                f"{where}: no units table (nwb.units is empty); spike-sorted units with "
                "spike_times are required."
            )
        if "spike_times" not in units.colnames:
            raise SchemaError(
                f"{where}: the units table has no 'spike_times' column (columns: "
                f"{list(units.colnames)})."
            )
        n_units = len(units.id)
        if n_units == 0:
            raise SchemaError(f"{where}: the units table has zero units.")
        col = units["spike_times"]
        ends = np.asarray(col.data[:], dtype=np.int64)  # VectorIndex: end offset per unit
        flat = np.asarray(col.target.data[:], dtype=np.float64)
        counts = np.diff(np.concatenate([[0], ends]))
        names_col = next((c for c in ("unit_name", "name") if c in units.colnames), None)
        raw_ids = _column(units, names_col) if names_col else np.asarray(units.id[:])
        unit_names = _prefix_units(raw_ids, sid, True)
        keep = np.ones(n_units, bool)
        n_heldout = 0
        if "heldout" in units.colnames:
            heldout = _column(units, "heldout").astype(bool)
            n_heldout = int(heldout.sum())
            if not include_heldout:
                keep = ~heldout
        if not keep.any():
            raise SchemaError(f"{where}: all {n_units} units are held out and include_heldout=False.")
        index_all = np.repeat(np.arange(n_units), counts)
        sel = keep[index_all]
        remap = np.cumsum(keep) - 1
        times = flat[sel]
        index = remap[index_all[sel]]
        unit_names = unit_names[keep]
        if np.unique(unit_names).size != unit_names.size:
            uniq, cnt = np.unique(unit_names, return_counts=True)
            raise SchemaError(f"{where}: duplicate unit ids {uniq[cnt > 1][:5].tolist()}.")
        # Sort per unit then globally: one lexsort on (time, unit) does both.
        times, index = _sort_spikes(times, index)
        _check_spikes(times, index, unit_names, where)

        # ---- behaviour
        notes: list[str] = []
        module = nwb.processing.get("behavior") if "behavior" in nwb.processing else None
        series = _timeseries_in(module) if module is not None else {}
        if not series:
            there = {name: list(m.data_interfaces) for name, m in nwb.processing.items()}
            raise SchemaError(
                f"{where}: no behaviour under processing/behavior (processing modules and their "
                f"contents: {there}). NLB test files carry no behaviour: convert the train file."
            )
        pos_name = None
        if behavior in series:
            bt, bv = _read_timeseries(series[behavior])
            unit = getattr(series[behavior], "unit", "")
            notes.append(f"{behavior} [{unit}] from processing/behavior")
        elif behavior.endswith("_vel") and behavior[:-4] + "_pos" in series:
            pos_name = behavior[:-4] + "_pos"
            bt, p = _read_timeseries(series[pos_name])
            if bt.size < 2:
                raise SchemaError(f"{where}: {pos_name} has {bt.size} sample(s); cannot derive velocity.")
            bv = np.gradient(p, bt, axis=0)
            unit = getattr(series[pos_name], "unit", "")
            notes.append(
                f"{behavior} derived as np.gradient({pos_name}, t) [{unit}/s]: the file has no "
                f"{behavior}"
            )
        else:
            raise SchemaError(
                f"{where}: behaviour {behavior!r} not found under processing/behavior; "
                f"available: {sorted(series)}."
            )
        n_nan = int(np.sum(~np.isfinite(bv).all(axis=-1))) if bv.ndim > 1 else int(np.sum(~np.isfinite(bv)))
        if n_nan:
            notes.append(f"{n_nan} behaviour samples NaN (kept; weight 0 downstream)")
        pos_values = None
        if position == "auto":
            cand = pos_name or (behavior[:-4] + "_pos" if behavior.endswith("_vel") else None)
        else:
            cand = position
        if cand is not None:
            if cand in series:
                pt, pv = _read_timeseries(series[cand])
                if pt.shape == bt.shape and np.array_equal(pt, bt):
                    pos_values = pv
                elif position not in (None, "auto"):
                    raise SchemaError(
                        f"{where}: position {cand!r} is not sampled at the {behavior!r} timestamps."
                    )
            elif position not in (None, "auto"):
                raise SchemaError(
                    f"{where}: position {cand!r} not found under processing/behavior; "
                    f"available: {sorted(series)}."
                )

        # ---- trials, splits, epochs
        trials = None
        splits: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        epochs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        tt = nwb.trials
        if tt is not None and len(tt.id) > 0:
            ts = _column(tt, "start_time").astype(np.float64)
            te = _column(tt, "stop_time").astype(np.float64)
            trials = (ts, te)
            if "split" in tt.colnames:
                labels = [_to_str(x) for x in _column(tt, "split").tolist()]
                splits, dropped, clipped = _splits_from_trials(ts, te, labels, where)
                if dropped:
                    notes.append(f"{dropped} trials without a train/val/test split left out")
                if clipped:
                    notes.append(
                        f"{clipped} trials cut where the next trial of another split starts"
                    )
                is_test = np.asarray([SPLIT_ALIASES.get(x.strip().lower()) == "test" for x in labels])
                if is_test.any():
                    no_beh = 0
                    for a, b in zip(ts[is_test], te[is_test]):
                        j0, j1 = np.searchsorted(bt, [a, b])
                        if not np.isfinite(bv[j0:j1]).any():
                            no_beh += 1
                    if no_beh:
                        notes.append(
                            f"{no_beh} test trials have no behaviour (NLB hides it): spikes only"
                        )
            if "move_onset_time" in tt.colnames:
                mo = _column(tt, "move_onset_time").astype(np.float64)
                lo_off, hi_off = float(reach_window[0]), float(reach_window[1])
                if not hi_off > lo_off:
                    raise ValueError(f"reach_window must be (lo, hi) with hi > lo, got {reach_window}.")
                ok = np.isfinite(mo) & (mo >= ts) & (mo < te)
                r0 = np.maximum(ts[ok], mo[ok] + lo_off)
                r1 = np.minimum(te[ok], mo[ok] + hi_off)
                good = r1 > r0
                epochs["reach"] = (r0[good], r1[good])
                h0, h1 = ts[ok][good], r0[good]
                hold = h1 > h0
                epochs["hold"] = (h0[hold], h1[hold])
                notes.append(
                    f"epochs: reach = move onset {lo_off:+g}..{hi_off:+g} s, hold = trial start to "
                    f"reach ({int(good.sum())} trials with a move onset)"
                )
        if splits is None:
            lo, hi = _session_span(times, bt, where)
            splits = {"train": (np.array([lo]), np.array([hi]))}
            notes.append("no split column: whole session is train")

        subj = nwb.subject
        meta = {
            "subject_id": subject_id
            or (getattr(subj, "subject_id", None) if subj is not None else None)
            or "unknown",
            "species": species
            or _slug(getattr(subj, "species", None) if subj is not None else None)
            or "unknown",
            "lab": lab or _slug(nwb.lab) or _slug(nwb.institution) or "unknown",
            "brain_region": brain_region or _electrode_regions(nwb) or "unknown",
            "task": task or "unknown",
        }
        desc = (nwb.session_description or "").strip()
        if n_heldout:
            notes.append(
                f"{n_heldout} NLB held-out units "
                + ("included" if include_heldout else "dropped")
            )
        source = f"NWB file {path.name}" + (f" ({desc})" if desc else "") + "; " + "; ".join(notes)

    rec = SessionRecording(
        session_id=sid,
        unit_ids=unit_names,
        spike_times=times,
        spike_unit_index=index,
        behavior_timestamps=bt,
        behavior_values=bv,
        behavior_name=behavior,
        position_values=pos_values,
        splits=splits,
        epochs={k: v for k, v in epochs.items() if v[0].size},
        trials=trials,  # type: ignore[arg-type]
        source=source,
        **meta,
    )
    return _revalidate(rec, where)


def _slug(text: Any) -> str | None:
    if text is None:
        return None
    s = re.sub(r"\s+", "_", _to_str(text).strip().lower())
    return s or None


def _electrode_regions(nwb: Any) -> str | None:
    try:
        table = nwb.electrodes
        if table is None or "location" not in table.colnames:
            return None
        locs = sorted({_to_str(x).strip() for x in table["location"].data[:]} - {"", "unknown"})
        return ",".join(locs) or None
    except Exception:  # noqa: BLE001 - electrodes are optional metadata; never fail the conversion on them
        return None


# --------------------------------------------------------------------------- MC_Maze CSV
#: Split of the two shared MC_Maze trials (trial 748 trains, trial 1356 is held out).
MC_MAZE_CSV_SPLITS: dict[int, str] = {748: "train", 1356: "test"}


def read_mc_maze_csv(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Header names and the (rows, columns) float64 table of one MC_Maze CSV trial."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        header = fh.readline().strip().split(",")
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    if table.shape[1] != len(header):
        raise SchemaError(
            f"{path}: {len(header)} header columns but {table.shape[1]} data columns."
        )
    return header, table


def from_mc_maze_csv(
    paths: Sequence[str | Path] | str | Path,
    *,
    session_id: str = "mc_maze_jenkins",
    splits: Mapping[int, str] | None = None,
) -> SessionRecording:
    """The shared MC_Maze CSV trials (``trial_<id>_data.csv``, 1 ms rows) as one session.

    Spike times of unit ``u`` are ``timestamp[unit_u > 0]`` (one spike per non-zero bin), the
    behaviour is ``hand_vel_x/y`` at 1 kHz with ``hand_pos_x/y`` as position, each file is one
    trial spanning ``[first timestamp, last timestamp + 1 ms)``, and its split comes from
    ``splits`` (trial id -> split; default :data:`MC_MAZE_CSV_SPLITS`, unknown trials train).
    ``paths`` may be a folder: all ``trial_*_data.csv`` in it are read.
    """
    if isinstance(paths, str | Path) and Path(paths).is_dir():
        files = sorted(Path(paths).glob("trial_*_data.csv"))
        if not files:
            raise FileNotFoundError(f"{paths}: no trial_*_data.csv files.")
    elif isinstance(paths, str | Path):
        files = [Path(paths)]
    else:
        files = [Path(p) for p in paths]
    split_of = dict(MC_MAZE_CSV_SPLITS if splits is None else splits)
    trials: list[tuple[float, float, str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    unit_cols: list[str] | None = None
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no such file.")
        header, table = read_mc_maze_csv(f)
        need = ["timestamp", "hand_vel_x", "hand_vel_y", "hand_pos_x", "hand_pos_y"]
        missing = [c for c in need if c not in header]
        if missing:
            raise SchemaError(f"{f}: missing column(s) {missing}.")
        ucols = [c for c in header if c.startswith("unit_")]
        if not ucols:
            raise SchemaError(f"{f}: no unit_XXXX spike columns.")
        if unit_cols is None:
            unit_cols = ucols
        elif ucols != unit_cols:
            raise SchemaError(f"{f}: unit columns differ from {files[0].name}'s.")
        col = {c: i for i, c in enumerate(header)}
        t = table[:, col["timestamp"]]
        vel = table[:, [col["hand_vel_x"], col["hand_vel_y"]]]
        pos = table[:, [col["hand_pos_x"], col["hand_pos_y"]]]
        spikes = table[:, [col[c] for c in ucols]]
        m = re.search(r"trial_(\d+)", f.name)
        trial_id = int(m.group(1)) if m else -1
        step = float(np.median(np.diff(t))) if t.size > 1 else 0.001
        trials.append(
            (float(t[0]), float(t[-1]) + step, split_of.get(trial_id, "train"), t, vel, pos, spikes)
        )
    assert unit_cols is not None
    trials.sort(key=lambda x: x[0])
    t_all = np.concatenate([x[3] for x in trials])
    st_list, si_list = [], []
    for _, _, _, t, _, _, spikes in trials:
        rows, units = np.nonzero(spikes > 0)
        st_list.append(t[rows])
        si_list.append(units)
    split_map: dict[str, list[tuple[float, float]]] = {}
    for a, b, sp, *_ in trials:
        split_map.setdefault(sp, []).append((a, b))
    names = [c[len("unit_"):] for c in unit_cols]
    return from_arrays(
        np.concatenate(st_list),
        np.asarray(names)[np.concatenate(si_list)],
        np.concatenate([x[4] for x in trials]),
        t_all,
        session_id=session_id,
        splits=split_map,
        trials=(np.array([x[0] for x in trials]), np.array([x[1] for x in trials])),
        units=names,
        position=np.concatenate([x[5] for x in trials]),
        behavior_name="hand_vel",
        subject_id="jenkins",
        task="maze_reaching",
        brain_region="M1,PMd",
        lab="shenoy",
        species="macaca_mulatta",
        source=(
            "MC_Maze (Churchland, Kaufman & Shenoy; NLB MC_Maze, DANDI:000128, CC-BY-4.0), trials "
            + ", ".join(f.name for f in files)
            + " via github.com/MaryamOstadsharif/HiSDE CSV export; spike times quantised to 1 ms"
        ),
    )
