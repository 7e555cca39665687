"""POYO spike processor: raw spike windows -> padded model inputs, and the vocabularies.

The processor owns the string vocabularies (unit id -> embedding row, session id -> row), saved
as JSON in ``preprocessor_config.json`` next to ``config.json``; the model only holds plain
embedding tables. Row 0 of each table is reserved for padding.

It is a ``FeatureExtractionMixin`` (not a tokenizer: remote-code saving of a class whose name
contains "Tokenizer" writes a tokenizer auto_map entry that then fails to load). Pure numpy on
the CPU and picklable, so it can run inside ``datasets.map`` workers and DataLoader workers.

A window is a mapping with keys:

=====================  ==============================  =========================================
key                    type                            meaning
=====================  ==============================  =========================================
session_id             str                             session of the window (in the vocabulary)
spike_times            (S,) float                      seconds from the window start, in [0, L]
spike_unit_ids         (S,) str                        unit of each spike, or instead:
spike_unit_index       (S,) int                        row of ``unit_ids`` for each spike
unit_ids               (U,) str, optional              the window's unit table (default: every
                                                       unit registered for the session)
output_timestamps      (N_out,) float                  where to decode, seconds in [0, L]
targets                (N_out, D) float, optional      behaviour in physical units (NaN = missing)
output_weights         (N_out,) float, optional        per-timestep loss weights (default 1)
readout                str, optional                   readout name (default: the first)
=====================  ==============================  =========================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from transformers import BatchFeature
from transformers.feature_extraction_utils import FeatureExtractionMixin

PAD_ID = "<pad>"

# Token types (spec sec. 2): 0 spike, 1 unit start (t = 0), 2 unit end (t = L).
TOKEN_SPIKE, TOKEN_START, TOKEN_END = 0, 1, 2


def _pad_len(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


class PoyoProcessor(FeatureExtractionMixin):
    r"""Tokenizes spike windows for POYO and holds the unit / session vocabularies.

    Args:
        sequence_length: window length in seconds (read from ``PoyoConfig``).
        unit_vocab: ordered unit ids; unit ``unit_vocab[i]`` is embedding row ``i + 1``.
        session_vocab: ordered session ids; session ``session_vocab[i]`` is row ``i + 1``.
        session_units: for each session, its unit ids (the default unit table of a window).
        readout_names: readout names in the config's order (``readout`` key -> index).
        pad_to_multiple_of: pad token and query axes to a multiple of this (8).
    """

    model_input_names = [
        "input_unit_index",
        "input_timestamps",
        "input_token_type",
        "input_mask",
        "session_index",
        "output_timestamps",
        "output_mask",
    ]

    def __init__(
        self,
        sequence_length: float = 1.0,
        unit_vocab: Sequence[str] | None = None,
        session_vocab: Sequence[str] | None = None,
        session_units: Mapping[str, Sequence[str]] | None = None,
        readout_names: Sequence[str] | None = None,
        pad_to_multiple_of: int = 8,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if not (isinstance(sequence_length, (int, float)) and sequence_length > 0):
            raise ValueError(f"sequence_length must be a number > 0, got {sequence_length!r}.")
        if not (isinstance(pad_to_multiple_of, int) and pad_to_multiple_of >= 1):
            raise ValueError(f"pad_to_multiple_of must be an int >= 1, got {pad_to_multiple_of!r}.")
        self.sequence_length = float(sequence_length)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.unit_vocab: list[str] = []
        self.session_vocab: list[str] = []
        self.session_units: dict[str, list[str]] = {}
        self.readout_names: list[str] = list(readout_names or ["hand_vel"])
        self._unit_index: dict[str, int] = {}
        self._session_index: dict[str, int] = {}
        self._add_units(unit_vocab or [], exist_ok=False)
        for sid in session_vocab or []:
            self._add_session_id(sid)
        for sid, units in (session_units or {}).items():
            if sid not in self._session_index:
                self._add_session_id(sid)
            self.session_units[sid] = [str(u) for u in units]

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any, sessions: Mapping[str, Sequence[str]] | None = None, **kwargs) -> "PoyoProcessor":
        """A processor that agrees with ``config`` (window length, readouts), optionally with
        sessions ``{session_id: [unit ids]}`` registered in order."""
        proc = cls(
            sequence_length=config.sequence_length,
            readout_names=list(config.readout_dims),
            **kwargs,
        )
        for sid, units in (sessions or {}).items():
            proc.add_session(sid, units)
        return proc

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in [k for k in out if k.startswith("_")]:
            del out[key]  # lookup caches are rebuilt from the ordered lists
        return out

    # -- vocabularies -------------------------------------------------------------------------
    @property
    def unit_vocab_size(self) -> int:
        """Rows the unit embedding table needs (vocabulary + padding row 0)."""
        return len(self.unit_vocab) + 1

    @property
    def session_vocab_size(self) -> int:
        return len(self.session_vocab) + 1

    def _add_units(self, unit_ids: Iterable[str], exist_ok: bool) -> list[int]:
        rows = []
        for u in unit_ids:
            if not isinstance(u, str):
                raise TypeError(f"unit ids must be strings, got {u!r} of type {type(u).__name__}.")
            if u == PAD_ID:
                raise ValueError(f"{PAD_ID!r} is reserved for padding and cannot be a unit id.")
            if u in self._unit_index:
                if not exist_ok:
                    raise ValueError(
                        f"unit id {u!r} is already in the vocabulary (row {self._unit_index[u]}); unit ids must "
                        "be globally unique: prefix them with the session id, or pass exist_ok=True to reuse the row."
                    )
                rows.append(self._unit_index[u])
                continue
            self.unit_vocab.append(u)
            self._unit_index[u] = len(self.unit_vocab)
            rows.append(len(self.unit_vocab))
        return rows

    def _add_session_id(self, session_id: str) -> int:
        if not isinstance(session_id, str) or not session_id:
            raise TypeError(f"session ids must be non-empty strings, got {session_id!r}.")
        if session_id in self._session_index:
            raise ValueError(f"session id {session_id!r} is already in the vocabulary.")
        self.session_vocab.append(session_id)
        self._session_index[session_id] = len(self.session_vocab)
        return len(self.session_vocab)

    def add_session(self, session_id: str, unit_ids: Sequence[str], exist_ok: bool = False) -> dict[str, Any]:
        """Register a new session and its units (one call per new session).

        Returns ``{"session_index": row, "unit_index": [rows]}``. Then grow the model's tables
        with ``model.grow_vocabularies(processor)``; existing rows stay bit-identical.
        ``exist_ok=True`` lets units already in the vocabulary keep their rows (same neuron
        recorded again); otherwise a collision raises ``ValueError``.
        """
        units = [u for u in unit_ids]
        if len(units) == 0:
            raise ValueError(f"session {session_id!r} has no units; give at least one unit id.")
        if len(set(units)) != len(units):
            dup = sorted({u for u in units if units.count(u) > 1})[:5]
            raise ValueError(f"session {session_id!r} lists duplicate unit ids {dup}.")
        if session_id in self._session_index:
            raise ValueError(
                f"session id {session_id!r} is already in the vocabulary; pick a new id for a new session."
            )
        if not exist_ok:
            clash = [u for u in units if u in self._unit_index]
            if clash:
                raise ValueError(
                    f"unit ids {clash[:5]} of session {session_id!r} collide with units already in the "
                    "vocabulary; prefix them with the session id (e.g. f'{session_id}/{unit}') or pass exist_ok=True."
                )
        rows = self._add_units(units, exist_ok=exist_ok)
        srow = self._add_session_id(session_id)
        self.session_units[session_id] = [str(u) for u in units]
        return {"session_index": srow, "unit_index": rows}

    def unit_rows(self, unit_ids: Sequence[str]) -> np.ndarray:
        """Embedding rows of ``unit_ids``; unknown ids raise ``ValueError`` naming the id."""
        try:
            return np.fromiter((self._unit_index[u] for u in unit_ids), dtype=np.int64, count=len(unit_ids))
        except KeyError as err:
            raise ValueError(
                f"unit id {err.args[0]!r} is not in the processor's vocabulary; register the session's units "
                "with processor.add_session(session_id, unit_ids) and grow the model with "
                "model.grow_vocabularies(processor)."
            ) from None

    def session_row(self, session_id: str) -> int:
        if session_id not in self._session_index:
            raise ValueError(
                f"session id {session_id!r} is not in the processor's vocabulary; register it with "
                "processor.add_session(session_id, unit_ids) and grow the model with model.grow_vocabularies(processor)."
            )
        return self._session_index[session_id]

    def check_config(self, config: Any) -> None:
        """Raise ``ValueError`` if this processor and ``config`` disagree (window, vocab sizes, readouts)."""
        if abs(self.sequence_length - config.sequence_length) > 1e-9:
            raise ValueError(
                f"processor.sequence_length ({self.sequence_length}) != config.sequence_length "
                f"({config.sequence_length}); build the processor with PoyoProcessor.from_config(config)."
            )
        if self.unit_vocab_size != config.unit_vocab_size:
            raise ValueError(
                f"config.unit_vocab_size ({config.unit_vocab_size}) != processor unit vocabulary "
                f"({self.unit_vocab_size} rows incl. padding); call model.grow_vocabularies(processor)."
            )
        if self.session_vocab_size != config.session_vocab_size:
            raise ValueError(
                f"config.session_vocab_size ({config.session_vocab_size}) != processor session vocabulary "
                f"({self.session_vocab_size} rows incl. padding); call model.grow_vocabularies(processor)."
            )
        if list(self.readout_names) != list(config.readout_dims):
            raise ValueError(
                f"processor.readout_names {self.readout_names} != config readouts {list(config.readout_dims)}."
            )

    # -- tokenization -------------------------------------------------------------------------
    def _float_array(self, value: Any, name: str, where: str) -> np.ndarray:
        arr = np.asarray(value)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(f"{where}: {name} must be an array of numbers (seconds), got dtype {arr.dtype}.")
        return arr.astype(np.float64).reshape(-1) if arr.ndim <= 1 else arr.astype(np.float64)

    def tokenize_window(self, window: Mapping[str, Any], index: int = 0) -> dict[str, np.ndarray]:
        """One window -> unpadded arrays (tokens, queries, targets). See the module docstring."""
        where = f"window {index}"
        if not isinstance(window, Mapping):
            raise TypeError(f"{where}: expected a mapping of arrays, got {type(window).__name__}.")
        for key in ("session_id", "spike_times", "output_timestamps"):
            if key not in window:
                raise ValueError(f"{where}: missing key {key!r}; see PoyoProcessor's docstring for the keys.")
        L = self.sequence_length
        session_id = window["session_id"]
        if not isinstance(session_id, str):
            raise TypeError(f"{where}: session_id must be a string, got {type(session_id).__name__}.")
        srow = self.session_row(session_id)

        times = self._float_array(window["spike_times"], "spike_times", where)
        if times.ndim != 1:
            raise ValueError(f"{where}: spike_times must be 1-D, got shape {times.shape}.")
        if times.size and not np.all(np.isfinite(times)):
            raise ValueError(f"{where}: spike_times contains NaN or inf; drop those spikes.")
        if times.size and (times.min() < 0 or times.max() > L):
            raise ValueError(
                f"{where}: spike_times must lie in the window [0, {L}] s (relative to the window start), "
                f"got range [{times.min():.6g}, {times.max():.6g}]; subtract the window start and crop."
            )

        unit_table = window.get("unit_ids")
        if unit_table is None:
            if session_id not in self.session_units:
                raise ValueError(f"{where}: no unit_ids given and session {session_id!r} has no registered units.")
            unit_table = self.session_units[session_id]
        unit_table = list(unit_table)
        if len(unit_table) == 0:
            raise ValueError(f"{where}: the window's unit table is empty; a window needs at least one unit.")
        table_rows = self.unit_rows([str(u) for u in unit_table])  # (U,)

        if "spike_unit_index" in window and window["spike_unit_index"] is not None:
            local = np.asarray(window["spike_unit_index"]).reshape(-1)
            if local.size and not np.issubdtype(local.dtype, np.integer):
                raise TypeError(f"{where}: spike_unit_index must be integers, got dtype {local.dtype}.")
            if local.size and (local.min() < 0 or local.max() >= len(unit_table)):
                raise ValueError(
                    f"{where}: spike_unit_index must lie in [0, {len(unit_table)}) (rows of unit_ids), "
                    f"got range [{local.min()}, {local.max()}]."
                )
            spike_rows = table_rows[local.astype(np.int64)]
        elif "spike_unit_ids" in window:
            ids = np.asarray(window["spike_unit_ids"]).reshape(-1)
            if ids.size and ids.dtype.kind not in "UO":
                raise TypeError(f"{where}: spike_unit_ids must be strings, got dtype {ids.dtype}.")
            if ids.size:
                uniq, inv = np.unique(ids, return_inverse=True)
                spike_rows = self.unit_rows([str(u) for u in uniq])[inv]
            else:
                spike_rows = np.zeros(0, np.int64)
        else:
            raise ValueError(f"{where}: give spike_unit_ids (strings) or spike_unit_index (ints).")
        if spike_rows.shape[0] != times.shape[0]:
            raise ValueError(
                f"{where}: {times.shape[0]} spike_times but {spike_rows.shape[0]} spike units; one unit per spike."
            )

        U = len(table_rows)
        tokens_unit = np.concatenate([np.repeat(table_rows, 2), spike_rows])  # start/end per unit, then spikes
        tokens_type = np.concatenate(
            [np.tile(np.array([TOKEN_START, TOKEN_END], np.int64), U), np.full(times.size, TOKEN_SPIKE, np.int64)]
        )
        tokens_time = np.concatenate([np.tile(np.array([0.0, L]), U), times])

        out_t = self._float_array(window["output_timestamps"], "output_timestamps", where)
        if out_t.ndim != 1:
            raise ValueError(f"{where}: output_timestamps must be 1-D, got shape {out_t.shape}.")
        if out_t.size and (not np.all(np.isfinite(out_t)) or out_t.min() < 0 or out_t.max() > L):
            raise ValueError(
                f"{where}: output_timestamps must be finite and lie in [0, {L}] s from the window start."
            )
        result: dict[str, Any] = {
            "input_unit_index": tokens_unit,
            "input_timestamps": tokens_time,
            "input_token_type": tokens_type,
            "session_index": srow,
            "output_timestamps": out_t,
        }
        readout = window.get("readout")
        if readout is not None:
            if readout not in self.readout_names:
                raise ValueError(f"{where}: readout {readout!r} unknown; choose from {self.readout_names}.")
            result["readout_index"] = self.readout_names.index(readout)
        targets = window.get("targets")
        if targets is not None:
            y = np.asarray(targets, dtype=np.float64)
            y = y[:, None] if y.ndim == 1 else y
            if y.shape[0] != out_t.size:
                raise ValueError(
                    f"{where}: targets has {y.shape[0]} rows but there are {out_t.size} output_timestamps."
                )
            result["labels"] = y
        weights = window.get("output_weights")
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64).reshape(-1)
            if w.size != out_t.size:
                raise ValueError(
                    f"{where}: output_weights has {w.size} values but there are {out_t.size} output_timestamps."
                )
            if not np.all(np.isfinite(w)) or np.any(w < 0):
                raise ValueError(f"{where}: output_weights must be finite and >= 0.")
            result["output_weights"] = w
        return result

    def __call__(
        self,
        windows: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenize one window (a mapping) or many (a sequence of mappings) into a padded batch.

        Returns a ``BatchFeature`` with ``input_unit_index``/``input_timestamps``/
        ``input_token_type``/``input_mask`` (B, N_in), ``session_index`` (B,),
        ``output_timestamps``/``output_mask`` (B, N_out) and, when given, ``labels``
        (B, N_out, D; NaN-padded), ``output_weights`` (B, N_out; 0-padded), ``readout_index`` (B,).
        Token and query axes are padded to a multiple of ``pad_to_multiple_of``.
        """
        if isinstance(windows, Mapping):
            windows = [windows]
        if isinstance(windows, (str, bytes)) or not isinstance(windows, Sequence) or len(windows) == 0:
            raise TypeError("PoyoProcessor expects a window mapping or a non-empty list of window mappings.")
        items = [self.tokenize_window(w, i) for i, w in enumerate(windows)]
        return self.pad(items, return_tensors=return_tensors)

    def pad(self, items: Sequence[dict[str, Any]], return_tensors: str | None = "pt") -> BatchFeature:
        """Pad a list of :meth:`tokenize_window` results into one batch."""
        B = len(items)
        m = self.pad_to_multiple_of
        n_in = _pad_len(max(len(it["input_unit_index"]) for it in items), m)
        n_out = _pad_len(max(len(it["output_timestamps"]) for it in items), m)
        batch: dict[str, np.ndarray] = {
            "input_unit_index": np.zeros((B, n_in), np.int64),
            "input_timestamps": np.zeros((B, n_in), np.float32),
            "input_token_type": np.zeros((B, n_in), np.int64),
            "input_mask": np.zeros((B, n_in), bool),
            "session_index": np.array([it["session_index"] for it in items], np.int64),
            "output_timestamps": np.zeros((B, n_out), np.float32),
            "output_mask": np.zeros((B, n_out), bool),
        }
        has_labels = [("labels" in it) for it in items]
        if any(has_labels) and not all(has_labels):
            raise ValueError("either every window has targets or none does.")
        if all(has_labels):
            D = max(it["labels"].shape[1] for it in items)
            batch["labels"] = np.full((B, n_out, D), np.nan, np.float32)
        if any("output_weights" in it for it in items):
            batch["output_weights"] = np.zeros((B, n_out), np.float32)
        if any("readout_index" in it for it in items):
            batch["readout_index"] = np.array([it.get("readout_index", 0) for it in items], np.int64)
        for b, it in enumerate(items):
            k, q = len(it["input_unit_index"]), len(it["output_timestamps"])
            batch["input_unit_index"][b, :k] = it["input_unit_index"]
            batch["input_timestamps"][b, :k] = it["input_timestamps"]
            batch["input_token_type"][b, :k] = it["input_token_type"]
            batch["input_mask"][b, :k] = True
            batch["output_timestamps"][b, :q] = it["output_timestamps"]
            batch["output_mask"][b, :q] = True
            if "labels" in batch:
                y = it["labels"]
                batch["labels"][b, :q, : y.shape[1]] = y
            if "output_weights" in batch:
                batch["output_weights"][b, :q] = it.get("output_weights", np.ones(q))
        return BatchFeature(batch, tensor_type=return_tensors)


__all__ = ["PoyoProcessor", "TOKEN_SPIKE", "TOKEN_START", "TOKEN_END"]
