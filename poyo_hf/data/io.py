"""Write, read and publish poyo_hf datasets (parquet segment rows + dataset card + summary).

A dataset folder written by :func:`write_dataset` looks like::

    out_dir/
      README.md                       dataset card (YAML: configs -> train / valid / test)
      poyo_dataset.json               summary: sessions, unit ids, behaviour stats, durations
      data/train/<session>.parquet    one file per session per split, rows = segments
      data/valid/<session>.parquet
      data/test/<session>.parquet

Rows follow :func:`poyo_hf.data.schema.segment_features` exactly (the parquet files carry the
``datasets`` features in their metadata, so fixed-size behaviour lists come back as such). The
folder loads with ``datasets.load_dataset(str(out_dir), streaming=True)`` and, once pushed with
:func:`push_dataset_to_hub`, with ``load_dataset("namespace/name", streaming=True)``.

Writes are atomic: everything goes to a hidden sibling folder that is renamed into place at the
end; on any error that folder is removed and ``out_dir`` is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .schema import SPLITS, SchemaError, SessionRecording, segment_features

__all__ = [
    "CARD_FILE",
    "COLUMN_DOCS",
    "SUMMARY_FILE",
    "load_recording_rows",
    "load_recordings",
    "push_dataset_to_hub",
    "read_dataset_summary",
    "write_dataset",
]

SUMMARY_FILE = "poyo_dataset.json"
CARD_FILE = "README.md"
DATA_DIR = "data"
FORMAT = "poyo_hf.segments/v1"
DEFAULT_TAGS: tuple[str, ...] = ("neuroscience", "spikes", "electrophysiology", "neural-decoding", "poyo")
CARD_INFO_KEYS: tuple[str, ...] = ("pretty_name", "license", "description", "citation", "tags")

#: One line per parquet column, rendered into the dataset card (keys == segment_features keys).
COLUMN_DOCS: dict[str, tuple[str, str]] = {
    "session_id": ("string", "globally unique session id"),
    "subject_id": ("string", "animal / participant"),
    "task": ("string", "behavioural task"),
    "brain_region": ("string", "recorded area(s), comma separated"),
    "lab": ("string", "lab / data source"),
    "species": ("string", "species"),
    "split": ("string", "train / valid / test"),
    "segment_index": ("int32", "position of the segment in its session"),
    "start": ("float64", "segment start, session clock (s)"),
    "end": ("float64", "segment end (exclusive), session clock (s)"),
    "unit_ids": ("list<string>", "all units of the session (`session/unit`)"),
    "spike_times": ("list<float64>", "sorted spike times inside [start, end) (s)"),
    "spike_unit_index": ("list<int32>", "row of `unit_ids` for each spike"),
    "behavior_name": ("string", "name of the decoding target, e.g. hand_vel"),
    "behavior_timestamps": ("list<float64>", "behaviour sample times inside [start, end)"),
    "behavior_values": ("list<list<float32>[D]>", "(T, D) decoding target; NaN = missing"),
    "position_values": ("list<list<float32>[D]>", "(T, D) position at the same times, or []"),
    "epoch_start": ("list<float64>", "behaviour epoch starts inside the segment"),
    "epoch_end": ("list<float64>", "behaviour epoch ends"),
    "epoch_label": ("list<string>", "hold / reach / return / random / invalid"),
    "trial_start": ("list<float64>", "starts of the trials that start in the segment"),
    "trial_end": ("list<float64>", "ends of those trials"),
}


# --------------------------------------------------------------------------- write
def _safe_name(session_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", session_id).strip("._-")
    return name or "session"


def _json_num(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


def _check_card_info(card_info: Mapping[str, Any] | None) -> dict[str, Any]:
    info = dict(card_info or {})
    unknown = sorted(set(info) - set(CARD_INFO_KEYS))
    if unknown:
        raise ValueError(f"card_info: unknown key(s) {unknown}; allowed: {list(CARD_INFO_KEYS)}.")
    tags = info.get("tags") or []
    if isinstance(tags, str):
        tags = [tags]
    info["tags"] = list(dict.fromkeys([*DEFAULT_TAGS, *map(str, tags)]))
    info.setdefault("license", "other")
    return info


def _check_recordings(recs: list[SessionRecording]) -> tuple[int, int | None]:
    """Validate every recording and the cross-session rules; return (behaviour dim, position dim)."""
    if not recs:
        raise ValueError("write_dataset: no recordings given.")
    seen_sessions: set[str] = set()
    unit_owner: dict[str, str] = {}
    dims: dict[int, str] = {}
    pos_dims: dict[int, str] = {}
    for i, rec in enumerate(recs):
        if not isinstance(rec, SessionRecording):
            raise TypeError(f"recording {i} is a {type(rec).__name__}, not a SessionRecording.")
        rec.validate()
        if rec.session_id in seen_sessions:
            raise SchemaError(f"session {rec.session_id!r} appears twice; session ids must be unique.")
        seen_sessions.add(rec.session_id)
        for u in rec.unit_ids.tolist():
            if u in unit_owner:
                raise SchemaError(
                    f"session {rec.session_id!r}: unit id {u!r} is also a unit of session "
                    f"{unit_owner[u]!r}; unit ids must be globally unique (prefix the session id)."
                )
            unit_owner[u] = rec.session_id
        dims.setdefault(rec.behavior_dim, rec.session_id)
        if rec.position_values is not None:
            pos_dims.setdefault(int(rec.position_values.shape[1]), rec.session_id)
    if len(dims) > 1:
        seen = ", ".join(f"{d} (first in session {s!r})" for d, s in dims.items())
        raise SchemaError(
            f"sessions have different behaviour dimensions: {seen}; one dataset holds one "
            "target shape: write them to separate datasets."
        )
    if len(pos_dims) > 1:
        seen = ", ".join(f"{d} (first in session {s!r})" for d, s in pos_dims.items())
        raise SchemaError(
            f"sessions have different position dimensions: {seen}; write separate datasets."
        )
    d = next(iter(dims))
    p = next(iter(pos_dims)) if pos_dims else None
    return d, p


def _write_shard(rows: list[dict[str, Any]], features: Any, path: Path) -> None:
    """One parquet file with the exact ``segment_features`` Arrow schema (+ datasets metadata)."""
    import datasets
    import pyarrow.parquet as pq

    table = datasets.Dataset.from_list(rows, features=features).data.table
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _session_summary(
    rec: SessionRecording, rows: list[dict[str, Any]], files: dict[str, str]
) -> dict[str, Any]:
    split_dur = {s: 0.0 for s in SPLITS}
    n_seg = {s: 0 for s in SPLITS}
    n_spikes = 0
    n_beh = 0
    for r in rows:
        split_dur[r["split"]] += r["end"] - r["start"]
        n_seg[r["split"]] += 1
        n_spikes += len(r["spike_times"])
        n_beh += len(r["behavior_timestamps"])
    return {
        "session_id": rec.session_id,
        "subject_id": rec.subject_id,
        "task": rec.task,
        "brain_region": rec.brain_region,
        "lab": rec.lab,
        "species": rec.species,
        "source": rec.source,
        "behavior_name": rec.behavior_name,
        "behavior_dim": rec.behavior_dim,
        "n_units": int(rec.unit_ids.size),
        "unit_ids": rec.unit_ids.tolist(),
        "n_spikes": int(n_spikes),
        "n_behavior_samples": int(n_beh),
        "duration_s": float(sum(split_dur.values())),
        "split_durations_s": split_dur,
        "n_segments": n_seg,
        "n_trials": 0 if rec.trials is None else int(np.asarray(rec.trials[0]).size),
        "epochs": {k: int(np.asarray(v[0]).size) for k, v in rec.epochs.items()},
        "files": files,
    }


def _behavior_stats(train_values: list[np.ndarray], dim: int) -> dict[str, Any]:
    """Per-dimension mean / std (population, ddof=0) over the train split, NaN ignored."""
    v = np.concatenate(train_values, axis=0) if train_values else np.zeros((0, dim), np.float32)
    v = v.astype(np.float64)
    finite = np.isfinite(v)
    n = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, np.where(finite, v, 0.0).sum(axis=0) / np.maximum(n, 1), np.nan)
        var = np.where(finite, (v - mean) ** 2, 0.0).sum(axis=0) / np.maximum(n, 1)
        std = np.where(n > 0, np.sqrt(var), np.nan)
    return {
        "split": "train",
        "mean": [_json_num(x) for x in mean],
        "std": [_json_num(x) for x in std],
        "n_samples": [int(x) for x in n],
    }


def write_dataset(
    recordings: Iterable[SessionRecording],
    out_dir: str | Path,
    *,
    max_segment_s: float = 60.0,
    overwrite: bool = False,
    card_info: Mapping[str, Any] | None = None,
) -> Path:
    """Write recordings as a Hub-ready dataset folder (layout: module docstring).

    Args:
        recordings: the sessions; all are validated before anything is written. Session ids and
            unit ids must be globally unique; all sessions share one behaviour dimension.
        out_dir: target folder. Must not exist or be empty, unless ``overwrite=True``, which
            replaces a folder previously written by this function (one holding
            ``poyo_dataset.json``); any other non-empty folder is refused.
        max_segment_s: longest segment row (s), see ``SessionRecording.to_rows``.
        overwrite: replace an existing dataset folder.
        card_info: optional ``pretty_name``, ``license`` (default ``"other"``; give the data's
            licence, e.g. ``"cc-by-4.0"``), ``description``, ``citation``, extra ``tags``.

    Returns:
        the path of the written folder.
    """
    recs = list(recordings)
    if not (isinstance(max_segment_s, int | float) and math.isfinite(max_segment_s)) or max_segment_s <= 0:
        raise ValueError(f"max_segment_s must be a finite number > 0, got {max_segment_s!r}.")
    info = _check_card_info(card_info)
    bdim, pdim = _check_recordings(recs)
    out = Path(out_dir).expanduser().absolute()
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder.")
        if any(out.iterdir()):
            if not overwrite:
                raise FileExistsError(
                    f"{out} exists and is not empty; pass overwrite=True (--overwrite) to "
                    "replace it, or choose another folder."
                )
            if not (out / SUMMARY_FILE).is_file():
                raise FileExistsError(
                    f"{out} is not empty and holds no {SUMMARY_FILE}; refusing to overwrite a "
                    "folder that write_dataset did not create."
                )
    # Remember which parent folders we create, to remove them again on failure.
    created: list[Path] = []
    p = out.parent
    while not p.exists():
        created.append(p)
        p = p.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_into(tmp, recs, bdim, pdim, float(max_segment_s), info)
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for c in created:  # innermost first
            try:
                c.rmdir()
            except OSError:
                break
        raise
    return out


def _write_into(
    folder: Path,
    recs: list[SessionRecording],
    bdim: int,
    pdim: int | None,
    max_segment_s: float,
    info: dict[str, Any],
) -> None:
    features = segment_features(bdim, pdim)
    names: dict[str, str] = {}
    used: set[str] = set()
    for rec in recs:
        name = _safe_name(rec.session_id)
        if name in used:  # e.g. "a/b" and "a_b": keep file names distinct
            name = f"{name}-{hashlib.sha1(rec.session_id.encode()).hexdigest()[:8]}"
        used.add(name)
        names[rec.session_id] = name
    sessions: list[dict[str, Any]] = []
    train_values: list[np.ndarray] = []
    split_files: dict[str, list[str]] = {s: [] for s in SPLITS}
    for rec in recs:
        rows = rec.to_rows(max_segment_s)
        files: dict[str, str] = {}
        for split in SPLITS:
            part = [r for r in rows if r["split"] == split]
            if not part:
                continue
            rel = f"{DATA_DIR}/{split}/{names[rec.session_id]}.parquet"
            _write_shard(part, features, folder / rel)
            files[split] = rel
            split_files[split].append(rel)
            if split == "train":
                train_values += [np.asarray(r["behavior_values"]) for r in part]
        sessions.append(_session_summary(rec, rows, files))
    behavior_names = sorted({r.behavior_name for r in recs})
    totals = {s: float(sum(x["split_durations_s"][s] for x in sessions)) for s in SPLITS}
    summary = {
        "format": FORMAT,
        "max_segment_s": max_segment_s,
        "n_sessions": len(sessions),
        "n_units": int(sum(x["n_units"] for x in sessions)),
        "n_spikes": int(sum(x["n_spikes"] for x in sessions)),
        "behavior": {
            "name": behavior_names[0] if len(behavior_names) == 1 else behavior_names,
            "dim": bdim,
            "position_dim": pdim,
            "stats": _behavior_stats(train_values, bdim),
        },
        "split_durations_s": totals,
        "splits": {s: f for s, f in split_files.items() if f},
        "columns": list(features.keys()),
        "sessions": sessions,
    }
    with open(folder / SUMMARY_FILE, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2, allow_nan=False)
    _render_card(summary, info).save(str(folder / CARD_FILE))


def _commit(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out`` (replacing an old dataset folder) with renames only."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- card
def _fmt_s(x: float) -> str:
    return f"{x:.1f}" if x else "-"


def _render_card(summary: dict[str, Any], info: dict[str, Any]) -> Any:
    from huggingface_hub import DatasetCard, DatasetCardData

    splits = [s for s in SPLITS if s in summary["splits"]]
    data = DatasetCardData(
        license=info["license"],
        pretty_name=info.get("pretty_name") or "poyo_hf spiking dataset",
        task_categories=["time-series-forecasting"],
        tags=info["tags"],
        configs=[
            {
                "config_name": "default",
                "data_files": [
                    {"split": s, "path": f"{DATA_DIR}/{s}/*.parquet"} for s in splits
                ],
            }
        ],
    )
    beh = summary["behavior"]
    stats = beh["stats"]
    lines = [f"# {data.pretty_name}", ""]
    if info.get("description"):
        lines += [str(info["description"]).strip(), ""]
    lines += [
        f"Spiking recordings in the `poyo_hf` segment format ({summary['format']}): "
        f"{summary['n_sessions']} session(s), {summary['n_units']} units, "
        f"{summary['n_spikes']} spikes; decoding target `{beh['name']}` "
        f"({beh['dim']} dim). Split durations (s): "
        + ", ".join(f"{s} {summary['split_durations_s'][s]:.1f}" for s in SPLITS)
        + ".",
        "",
        "## Sessions",
        "",
        (
            "| session | subject | task | units | spikes | duration (s) | behaviour | "
            "train (s) | valid (s) | test (s) |"
        ),
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for s in summary["sessions"]:
        d = s["split_durations_s"]
        lines.append(
            f"| {s['session_id']} | {s['subject_id']} | {s['task']} | {s['n_units']} | "
            f"{s['n_spikes']} | {s['duration_s']:.1f} | {s['behavior_name']} ({s['behavior_dim']}) | "
            f"{_fmt_s(d['train'])} | {_fmt_s(d['valid'])} | {_fmt_s(d['test'])} |"
        )
    lines += ["", "## Sources", ""]
    lines += [f"- `{s['session_id']}`: {s['source'] or 'not stated'}" for s in summary["sessions"]]
    mean = ", ".join("nan" if m is None else f"{m:.4g}" for m in stats["mean"])
    std = ", ".join("nan" if m is None else f"{m:.4g}" for m in stats["std"])
    lines += [
        "",
        "## Behaviour normalisation",
        "",
        (
            f"Per-dimension mean [{mean}] and std [{std}] of `{beh['name']}` over the train "
            "split (NaN ignored), also in `poyo_dataset.json`."
        ),
        "",
        "## Schema",
        "",
        (
            "One row per *segment*: a contiguous stretch (at most "
            f"{summary['max_segment_s']:g} s) of one session inside one split. Samplers cut "
            "context windows from segments at random offsets. Files: "
            "`data/{split}/{session}.parquet`; `poyo_dataset.json` lists sessions, unit ids, "
            "split durations and behaviour statistics."
        ),
        "",
        "| column | type | meaning |",
        "|---|---|---|",
    ]
    lines += [f"| `{k}` | {t} | {m} |" for k, (t, m) in COLUMN_DOCS.items()]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        'ds = load_dataset("<this repo or folder>", streaming=True)',
        'row = next(iter(ds["train"]))',
        "```",
        "",
    ]
    if info.get("citation"):
        lines += ["## Citation", "", str(info["citation"]).strip(), ""]
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


# --------------------------------------------------------------------------- read
def read_dataset_summary(out_dir: str | Path) -> dict[str, Any]:
    """The ``poyo_dataset.json`` summary of a dataset folder."""
    path = Path(out_dir) / SUMMARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir}: no {SUMMARY_FILE}; not a poyo_hf dataset folder.")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


_ARRAY_COLUMNS = {
    "spike_times": np.float64,
    "spike_unit_index": np.int32,
    "behavior_timestamps": np.float64,
    "epoch_start": np.float64,
    "epoch_end": np.float64,
    "trial_start": np.float64,
    "trial_end": np.float64,
}


def load_recording_rows(
    out_dir: str | Path, *, split: str | None = None, session_id: str | None = None
) -> list[dict[str, Any]]:
    """All segment rows of a dataset folder, sorted by (session_id, segment_index).

    Numeric list columns come back as numpy arrays (``behavior_values`` / ``position_values`` as
    (T, D) float32); string lists as Python lists.
    """
    import pyarrow.parquet as pq

    summary = read_dataset_summary(out_dir)
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    bdim = int(summary["behavior"]["dim"])
    pdim = int(summary["behavior"]["position_dim"] or bdim)
    rows: list[dict[str, Any]] = []
    for s, files in summary["splits"].items():
        if split is not None and s != split:
            continue
        for rel in files:
            for r in pq.read_table(Path(out_dir) / rel).to_pylist():
                if session_id is not None and r["session_id"] != session_id:
                    continue
                for k, dt in _ARRAY_COLUMNS.items():
                    r[k] = np.asarray(r[k], dtype=dt)
                r["behavior_values"] = np.asarray(r["behavior_values"], np.float32).reshape(-1, bdim)
                r["position_values"] = np.asarray(r["position_values"], np.float32).reshape(-1, pdim)
                rows.append(r)
    rows.sort(key=lambda r: (r["session_id"], r["segment_index"]))
    return rows


def load_recordings(out_dir: str | Path) -> list[SessionRecording]:
    """Rebuild the :class:`SessionRecording` of every session from a dataset folder.

    Spikes and behaviour inside the split intervals come back exactly; split intervals of
    adjacent segments and epochs cut at segment borders are merged again.
    """
    summary = read_dataset_summary(out_dir)
    rows = load_recording_rows(out_dir)
    by_session: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_session.setdefault(r["session_id"], []).append(r)
    sources = {s["session_id"]: s.get("source", "") for s in summary["sessions"]}
    out = []
    for s in summary["sessions"]:
        part = by_session.get(s["session_id"], [])
        if not part:
            continue
        first = part[0]
        splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in SPLITS:
            segs = [(r["start"], r["end"]) for r in part if r["split"] == name]
            if segs:
                splits[name] = _merge_touching(segs)
        epochs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        labels = sorted({lab for r in part for lab in r["epoch_label"]})
        for lab in labels:
            segs = [
                (float(a), float(b))
                for r in part
                for a, b, lb in zip(r["epoch_start"], r["epoch_end"], r["epoch_label"])
                if lb == lab
            ]
            epochs[lab] = _merge_touching(segs)
        has_trials = any(r["trial_start"].size for r in part)
        pos = np.concatenate([r["position_values"] for r in part])
        out.append(
            SessionRecording(
                session_id=first["session_id"],
                unit_ids=np.asarray(first["unit_ids"], dtype=str),
                spike_times=np.concatenate([r["spike_times"] for r in part]),
                spike_unit_index=np.concatenate([r["spike_unit_index"] for r in part]),
                behavior_timestamps=np.concatenate([r["behavior_timestamps"] for r in part]),
                behavior_values=np.concatenate([r["behavior_values"] for r in part]),
                behavior_name=first["behavior_name"],
                position_values=pos if len(pos) else None,
                splits=splits,
                epochs=epochs,
                trials=(
                    np.concatenate([r["trial_start"] for r in part]),
                    np.concatenate([r["trial_end"] for r in part]),
                )
                if has_trials
                else None,
                subject_id=first["subject_id"],
                task=first["task"],
                brain_region=first["brain_region"],
                lab=first["lab"],
                species=first["species"],
                source=sources.get(first["session_id"], ""),
            )
        )
    return out


def _merge_touching(segs: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    segs = sorted(segs)
    s, e = [segs[0][0]], [segs[0][1]]
    for a, b in segs[1:]:
        if a <= e[-1]:
            e[-1] = max(e[-1], b)
        else:
            s.append(a)
            e.append(b)
    return np.asarray(s, np.float64), np.asarray(e, np.float64)


# --------------------------------------------------------------------------- Hub
def push_dataset_to_hub(
    out_dir: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
) -> str:
    """Upload a dataset folder to the Hub as a dataset repo; returns the repo URL.

    The repo id is checked before any network call. Old shards under ``data/`` that are not part
    of this upload are deleted in the same commit, so the card's ``data/{split}/*.parquet``
    globs never pick up stale sessions.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

    try:
        if not isinstance(repo_id, str) or not repo_id:
            raise HFValidationError(f"Repo id must be a non-empty string, got {repo_id!r}.")
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(
            f"invalid Hub repo id {repo_id!r}: {err} Use 'namespace/name' (letters, digits, "
            "'-', '_', '.')."
        ) from None
    folder = Path(out_dir)
    read_dataset_summary(folder)  # refuses folders that are not datasets
    if not (folder / CARD_FILE).is_file():
        raise FileNotFoundError(f"{folder}: no {CARD_FILE} dataset card; rewrite the dataset.")
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="dataset",
        commit_message=commit_message or "Upload poyo_hf dataset",
        delete_patterns=[f"{DATA_DIR}/*"],
    )
    return str(url)
