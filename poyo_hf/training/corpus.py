"""A training corpus: one or many poyo_hf datasets (local folders or Hub repo ids).

Reads each dataset's ``poyo_dataset.json`` summary (sessions, unit ids, behaviour statistics),
builds the model config and the processor vocabularies from them, and gives the segment
streams and the in-memory evaluation segments.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data.stream import iter_segments, load_segments_dataset
from ..data.windows import Segment

SUMMARY_FILE = "poyo_dataset.json"


def _dataset_pretty_name(src: str, local: bool) -> str | None:
    """``pretty_name`` from a dataset's card (README.md YAML), if it has one."""
    try:
        from huggingface_hub import DatasetCard

        card = DatasetCard.load(Path(src) / "README.md" if local else src, repo_type="dataset")
        return getattr(card.data, "pretty_name", None)
    except Exception:  # a card is optional; provenance comes from poyo_dataset.json
        return None


def read_summary(source: str | os.PathLike) -> dict[str, Any]:
    """The summary of a dataset folder or Hub dataset repo."""
    src = str(source)
    if Path(src).is_dir():
        path = Path(src) / SUMMARY_FILE
        if not path.is_file():
            raise ValueError(f"{src!r} is a folder but has no {SUMMARY_FILE}; convert the data with `poyo-hf data convert`.")
        return json.loads(path.read_text())
    if os.path.exists(src):
        raise ValueError(f"dataset {src!r} is a file; give a dataset folder or a Hub dataset repo id.")
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(src, SUMMARY_FILE, repo_type="dataset")
    except Exception as err:  # RepositoryNotFound, EntryNotFound, offline, ...
        raise ValueError(f"cannot read {SUMMARY_FILE} of dataset {src!r}: {err}") from err
    return json.loads(Path(path).read_text())


@dataclass
class Corpus:
    sources: list[str]
    summaries: list[dict[str, Any]]

    @classmethod
    def from_sources(cls, sources: Sequence[str]) -> "Corpus":
        if not sources:
            raise ValueError("no dataset given; pass one or more dataset folders or Hub repo ids.")
        summaries = [read_summary(s) for s in sources]
        seen: dict[str, str] = {}
        for src, summ in zip(sources, summaries):
            for sess in summ["sessions"]:
                if sess["session_id"] in seen:
                    raise ValueError(
                        f"session {sess['session_id']!r} appears in both {seen[sess['session_id']]!r} and {src!r}; "
                        "session ids must be unique across datasets."
                    )
                seen[sess["session_id"]] = src
        return cls([str(s) for s in sources], summaries)

    @property
    def sessions(self) -> list[dict[str, Any]]:
        return [s for summ in self.summaries for s in summ["sessions"]]

    def provenance(self, session_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """``training_info.json``'s ``datasets`` entries: one per source holding any of
        ``session_ids`` (all sessions when None), counted over those sessions.

        Provenance is read from each source's ``poyo_dataset.json`` (the per-session ``source``
        strings the converters and the simulator write) and its dataset card, never typed here;
        a dataset counts as synthetic when every session says so (lab/species ``synthetic`` or a
        ``source`` naming the simulator).
        """
        keep = None if session_ids is None else set(session_ids)
        out = []
        for src, summ in zip(self.sources, self.summaries):
            sessions = [s for s in summ["sessions"] if keep is None or s["session_id"] in keep]
            if not sessions:
                continue
            synthetic = all(
                "synthetic" in (str(s.get("lab")), str(s.get("species"))) or "synthetic" in str(s.get("source", "")).lower()
                for s in sessions
            )
            local = Path(src).is_dir()
            out.append(
                {
                    "source": src,
                    "repo_id": None if local else src,
                    "name": _dataset_pretty_name(src, local) or Path(src).name,
                    "provenance": "; ".join(sorted({str(s.get("source") or "not stated") for s in sessions})),
                    "synthetic": synthetic,
                    "n_sessions": len(sessions),
                    "n_units": sum(int(s["n_units"]) for s in sessions),
                    "n_spikes": sum(int(s["n_spikes"]) for s in sessions),
                    "duration_s": float(sum(float(s["duration_s"]) for s in sessions)),
                    "session_ids": [s["session_id"] for s in sessions],
                    "subjects": sorted({str(s.get("subject_id")) for s in sessions}),
                    "tasks": sorted({str(s.get("task")) for s in sessions}),
                }
            )
        return out

    def readouts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sessions:
            name, dim = s["behavior_name"], int(s["behavior_dim"])
            if out.setdefault(name, dim) != dim:
                raise ValueError(f"behaviour {name!r} has dims {out[name]} and {dim} in different sessions.")
        return out

    def target_stats(self) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        """Per-readout mean / std over the train splits (sample-count weighted across datasets)."""
        mean: dict[str, list[float]] = {}
        std: dict[str, list[float]] = {}
        acc: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        for summ in self.summaries:
            b = summ["behavior"]
            name = b["name"] if isinstance(b["name"], str) else None
            if name is None:
                raise ValueError("datasets mixing several behaviour names in one folder are not supported yet.")
            st = b["stats"]
            m = np.array([np.nan if x is None else x for x in st["mean"]], float)
            s = np.array([np.nan if x is None else x for x in st["std"]], float)
            n = np.array(st["n_samples"], float)
            acc.setdefault(name, []).append((m, s, n))
        for name, parts in acc.items():
            n = sum(p[2] for p in parts)
            if np.any(n == 0):
                raise ValueError(f"behaviour {name!r} has no finite train samples; the train split is empty or all NaN.")
            mu = sum(np.nan_to_num(p[0]) * p[2] for p in parts) / n
            var = sum((np.nan_to_num(p[1]) ** 2 + (np.nan_to_num(p[0]) - mu) ** 2) * p[2] for p in parts) / n
            mean[name] = [float(x) for x in mu]
            std[name] = [float(max(np.sqrt(v), 1e-6)) for v in var]
        return mean, std

    def split_sources(self, split: str) -> list[str]:
        return [src for src, summ in zip(self.sources, self.summaries) if summ["splits"].get(split)]

    def streaming(self, split: str) -> list[Any]:
        srcs = self.split_sources(split)
        if not srcs:
            raise ValueError(f"no dataset has a {split!r} split; the {split!r} split is empty.")
        return [load_segments_dataset(s, split, streaming=True) for s in srcs]

    @property
    def local(self) -> bool:
        return all(Path(s).is_dir() for s in self.sources)

    @property
    def n_spikes(self) -> int:
        return int(sum(summ.get("n_spikes", 0) for summ in self.summaries))

    def segments(self, split: str) -> list[Segment]:
        """All segments of ``split`` in memory (evaluation, small corpora).

        Local folders are read with pyarrow directly: ``datasets``' streaming iterator sleeps
        5 s whenever a pass over parquet files ends (a guard for apache/arrow#45214), which
        costs more than the whole read of a small corpus. Hub repos stream.
        """
        import pyarrow.parquet as pq

        from ..data.windows import segments_from_arrow

        out: list[Segment] = []
        for src, summ in zip(self.sources, self.summaries):
            files = summ["splits"].get(split) or []
            if not files:
                continue
            if Path(src).is_dir():
                for rel in files:
                    out.extend(segments_from_arrow(pq.read_table(Path(src) / rel)))
            else:
                out.extend(iter_segments(load_segments_dataset(src, split, streaming=True), rows_per_batch=64))
        return out
