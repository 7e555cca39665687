"""NDT processor: spike times (or already-binned counts) -> padded count tensors for NDT.

The processor holds the neuron ordering (held-in unit ids, then held-out unit ids) and the bin
width; it saves them to ``preprocessor_config.json`` next to ``config.json``. It is a
``FeatureExtractionMixin`` (pure numpy, CPU, picklable, so it runs inside ``datasets.map`` and
DataLoader workers) and reads its sizes from :class:`NdtConfig` (:meth:`NdtProcessor.from_config`).

Binning convention: bin ``k`` of a trial starting at ``t0`` holds the spikes with
``t0 + k * bin_size <= t < t0 + (k + 1) * bin_size`` (half-open; times are compared after
rounding ``(t - t0) / bin_size`` to 1e-9 bins, so a spike exactly on an edge lands in the later
bin despite float error). The observed window is ``[t0, t1)``; the ``num_forward_bins`` forward
bins follow it, ``[t1, t1 + F * bin_size)``.

A trial is one of:

* a mapping of **binned counts** (the NLB tensor layout):

  =================  ===================  ==================================================
  key                shape                meaning
  =================  ===================  ==================================================
  spikes             (T, N_in) int        held-in counts of the observed bins
  heldout_spikes     (T, N_out), opt.     held-out counts of the observed bins
  forward_spikes     (F, N), opt.         counts of the forward bins, held-in then held-out
  =================  ===================  ==================================================

* a mapping of **spike times** (seconds from the trial start): ``spike_times`` (S,), and
  ``spike_unit_ids`` (S,) str, or ``spike_unit_index`` (S,) int with ``unit_ids`` (U,) str (or,
  for a processor without unit ids, column indices ``0..N-1`` with held-out columns last);
  ``duration`` (seconds, default ``num_bins * bin_size``) is the observed window; spikes in
  ``[duration, duration + F * bin_size)`` are the forward targets;
* a bare (T, N_in) count array;
* see also :meth:`NdtProcessor.bin_segment` for a window of a ``poyo_hf.data.windows.Segment``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from transformers import BatchFeature
from transformers.feature_extraction_utils import FeatureExtractionMixin

_EDGE_DECIMALS = 9  # (t - t0) / bin_size is rounded to 1e-9 bins before flooring


def _whole_bins(length: float, bin_size: float, what: str) -> int:
    """Number of bins in ``length`` seconds; a ValueError if ``bin_size`` does not divide it."""
    n = length / bin_size
    k = round(n)
    if abs(n - k) > 1e-6 or k < 1:
        lower = max(k, 1) * bin_size
        raise ValueError(
            f"{what} of {length:.9g} s is not a whole number of {bin_size:.9g} s bins ({n:.6g} bins); "
            f"use a window of {lower:.9g} s (or another multiple of bin_size)."
        )
    return k


class NdtProcessor(FeatureExtractionMixin):
    r"""Bins spikes for NDT and holds the neuron ordering.

    Args:
        bin_size: bin width in seconds (default 0.005; read from ``NdtConfig``).
        num_bins: longest observed trial in bins (the config's position table), or None.
        num_forward_bins: zero bins appended after the observed bins (config).
        num_neurons, num_heldout_neurons: held-in / held-out neuron counts (config); when unit ids
            are given they must agree.
        heldin_unit_ids, heldout_unit_ids: the unit ids of the model's input channels and of its
            held-out readout channels, in order.
    """

    model_input_names = ["spikes", "attention_mask"]

    def __init__(
        self,
        bin_size: float = 0.005,
        num_bins: int | None = None,
        num_forward_bins: int = 0,
        num_neurons: int | None = None,
        num_heldout_neurons: int | None = None,
        heldin_unit_ids: Sequence[str] | None = None,
        heldout_unit_ids: Sequence[str] | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        numeric = isinstance(bin_size, (int, float)) and not isinstance(bin_size, bool)
        if not numeric or not np.isfinite(bin_size) or bin_size <= 0:
            raise ValueError(f"bin_size must be a finite number of seconds > 0, got {bin_size!r}.")
        if num_bins is not None and (not isinstance(num_bins, int) or num_bins < 1):
            raise ValueError(f"num_bins must be None or an int >= 1, got {num_bins!r}.")
        if not isinstance(num_forward_bins, int) or num_forward_bins < 0:
            raise ValueError(f"num_forward_bins must be an int >= 0, got {num_forward_bins!r}.")
        self.bin_size = float(bin_size)
        self.num_bins = num_bins
        self.num_forward_bins = num_forward_bins
        self.heldin_unit_ids: list[str] = [self._unit_id(u) for u in (heldin_unit_ids or [])]
        self.heldout_unit_ids: list[str] = [self._unit_id(u) for u in (heldout_unit_ids or [])]
        all_ids = self.heldin_unit_ids + self.heldout_unit_ids
        if len(set(all_ids)) != len(all_ids):
            dup = sorted({u for u in all_ids if all_ids.count(u) > 1})[:5]
            raise ValueError(f"unit ids must be unique across held-in and held-out units; duplicates: {dup}.")
        self.num_neurons = self._count("num_neurons", num_neurons, self.heldin_unit_ids)
        self.num_heldout_neurons = self._count("num_heldout_neurons", num_heldout_neurons, self.heldout_unit_ids)
        if self.num_neurons < 1:
            raise ValueError(
                "NdtProcessor needs num_neurons >= 1 (or heldin_unit_ids); build it with "
                "NdtProcessor.from_config(config)."
            )
        self._column = {u: i for i, u in enumerate(all_ids)}

    @staticmethod
    def _unit_id(u: Any) -> str:
        if not isinstance(u, str):
            raise TypeError(f"unit ids must be strings, got {u!r} of type {type(u).__name__}.")
        return u

    @staticmethod
    def _count(name: str, given: int | None, ids: list[str]) -> int:
        if given is None:
            return len(ids)
        if not isinstance(given, int) or given < 0:
            raise ValueError(f"{name} must be an int >= 0, got {given!r}.")
        if ids and len(ids) != given:
            raise ValueError(f"{name} is {given} but {len(ids)} unit ids were given; they must agree.")
        return given

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        config: Any,
        heldin_unit_ids: Sequence[str] | None = None,
        heldout_unit_ids: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> NdtProcessor:
        """A processor that agrees with ``config`` (bin width, bins, neuron counts), optionally
        with the unit ids of its held-in and held-out channels."""
        if heldin_unit_ids is not None and len(heldin_unit_ids) != config.num_neurons:
            raise ValueError(
                f"{len(heldin_unit_ids)} held-in unit ids given but config.num_neurons is {config.num_neurons}; "
                "give one id per input channel (or build the config with num_neurons=len(heldin_unit_ids))."
            )
        if heldout_unit_ids is not None and len(heldout_unit_ids) != config.num_heldout_neurons:
            raise ValueError(
                f"{len(heldout_unit_ids)} held-out unit ids given but config.num_heldout_neurons is "
                f"{config.num_heldout_neurons}; give one id per held-out channel."
            )
        return cls(
            bin_size=config.bin_size,
            num_bins=config.num_bins,
            num_forward_bins=config.num_forward_bins,
            num_neurons=config.num_neurons,
            num_heldout_neurons=config.num_heldout_neurons,
            heldin_unit_ids=heldin_unit_ids,
            heldout_unit_ids=heldout_unit_ids,
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in [k for k in out if k.startswith("_")]:
            del out[key]  # the column lookup is rebuilt from the ordered lists
        return out

    def check_config(self, config: Any) -> None:
        """Raise ``ValueError`` if this processor and ``config`` disagree."""
        pairs = {
            "bin_size": (self.bin_size, config.bin_size),
            "num_bins": (self.num_bins, config.num_bins),
            "num_forward_bins": (self.num_forward_bins, config.num_forward_bins),
            "num_neurons": (self.num_neurons, config.num_neurons),
            "num_heldout_neurons": (self.num_heldout_neurons, config.num_heldout_neurons),
        }
        for name, (mine, theirs) in pairs.items():
            if mine != theirs and not (isinstance(mine, float) and abs(mine - theirs) < 1e-12):
                raise ValueError(
                    f"processor.{name} ({mine}) != config.{name} ({theirs}); build the processor with "
                    "NdtProcessor.from_config(config)."
                )

    @property
    def num_total_neurons(self) -> int:
        return self.num_neurons + self.num_heldout_neurons

    # -- binning ------------------------------------------------------------------------------
    def _bin_index(self, times: np.ndarray, t0: float) -> np.ndarray:
        return np.floor(np.round((times - t0) / self.bin_size, _EDGE_DECIMALS)).astype(np.int64)

    def bin_spikes(
        self,
        spike_times: np.ndarray,
        spike_columns: np.ndarray,
        t0: float,
        t1: float,
        return_targets: bool = True,
    ) -> dict[str, np.ndarray]:
        """Count spikes per (bin, column) over ``[t0, t1)`` plus the forward window.

        spike_times (S,) seconds; spike_columns (S,) int in ``[0, N)`` (held-in columns first).
        Spikes outside the observed and forward windows are ignored. Returns ``spikes``
        (T, N_in) and, with ``return_targets``, ``heldout_spikes`` (T, N_out) and
        ``forward_spikes`` (F, N), all float32.
        """
        T = _whole_bins(t1 - t0, self.bin_size, f"the window [{t0:.9g}, {t1:.9g})")
        F_ = self.num_forward_bins
        N = self.num_total_neurons
        times = np.asarray(spike_times, dtype=np.float64).reshape(-1)
        cols = np.asarray(spike_columns, dtype=np.int64).reshape(-1)
        k = self._bin_index(times, t0)
        keep = (k >= 0) & (k < T + F_)
        counts = np.zeros((T + F_, N), np.float32)
        np.add.at(counts, (k[keep], cols[keep]), 1.0)
        out = {"spikes": counts[:T, : self.num_neurons]}
        if return_targets:
            if self.num_heldout_neurons:
                out["heldout_spikes"] = counts[:T, self.num_neurons :]
            if F_:
                out["forward_spikes"] = counts[T:]
        return out

    def _columns_of(self, unit_ids: Sequence[Any], where: str, ignore_unknown_units: bool) -> np.ndarray:
        """Column of each unit id (-1 for ignored unknown units)."""
        if not self._column:
            raise ValueError(
                f"{where}: the processor has no unit ids, so unit ids cannot be mapped to channels; build it "
                "with NdtProcessor.from_config(config, heldin_unit_ids, heldout_unit_ids), or pass "
                "spike_unit_index as column indices without unit_ids."
            )
        cols = np.array([self._column.get(str(u), -1) for u in unit_ids], dtype=np.int64)
        unknown = [str(u) for u, c in zip(unit_ids, cols) if c < 0]
        if unknown and not ignore_unknown_units:
            raise ValueError(
                f"{where}: unit ids {unknown[:5]} are not among the processor's held-in / held-out units; "
                "drop them, or pass ignore_unknown_units=True to skip their spikes."
            )
        return cols

    def bin_segment(
        self,
        segment: Any,
        t0: float,
        t1: float,
        return_targets: bool = True,
        ignore_unknown_units: bool = False,
    ) -> dict[str, np.ndarray]:
        """Bin the window ``[t0, t1)`` (session clock, seconds) of a
        ``poyo_hf.data.windows.Segment`` (any object with ``unit_ids``, ``spike_times`` and
        ``spike_unit_index``) into a binned-count trial for :meth:`__call__`.

        Every held-in and held-out unit of the processor must be in ``segment.unit_ids``
        (a missing unit would silently read as silence); segment units the processor does not
        know raise unless ``ignore_unknown_units=True``. The forward targets come from
        ``[t1, t1 + num_forward_bins * bin_size)``.
        """
        where = f"segment {getattr(segment, 'session_id', '?')!r}"
        unit_ids = [str(u) for u in segment.unit_ids]
        if not self._column:
            raise ValueError(f"{where}: bin_segment needs a processor with unit ids; see from_config.")
        present = set(unit_ids)
        missing = [u for u in self._column if u not in present]
        if missing:
            raise ValueError(
                f"{where}: the processor's units {missing[:5]} are not in the segment's unit_ids "
                f"({len(missing)} missing); the model expects the same neurons in the same order."
            )
        cols = self._columns_of(unit_ids, where, ignore_unknown_units)  # (U,)
        times = np.asarray(segment.spike_times, dtype=np.float64)
        index = np.asarray(segment.spike_unit_index, dtype=np.int64)
        horizon = t1 + self.num_forward_bins * self.bin_size
        lo, hi = np.searchsorted(times, [t0 - 1e-9 * self.bin_size, horizon + 1e-9 * self.bin_size])
        times, spike_cols = times[lo:hi], cols[index[lo:hi]]
        known = spike_cols >= 0
        return self.bin_spikes(times[known], spike_cols[known], t0, t1, return_targets)

    # -- trials -------------------------------------------------------------------------------
    def _counts(self, value: Any, name: str, shape_hint: str, where: str) -> np.ndarray:
        arr = np.asarray(value)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise TypeError(f"{where}: {name} must be a numeric array of spike counts, got dtype {arr.dtype}.")
        if arr.ndim != 2:
            raise ValueError(f"{where}: {name} must be 2-D {shape_hint}, got shape {arr.shape}.")
        arr = arr.astype(np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{where}: {name} contains NaN or inf; counts must be finite (drop or zero those bins).")
        if arr.size and arr.min() < 0:
            raise ValueError(f"{where}: {name} has a negative count ({arr.min():g}); spike counts are >= 0.")
        if arr.size and not np.all(arr == np.round(arr)):
            bad = arr[arr != np.round(arr)][0]
            raise ValueError(
                f"{where}: {name} has a non-integer count ({bad:g}); NDT takes raw spike counts, not rates "
                "or smoothed data."
            )
        return arr.astype(np.float32)

    def _trial(self, trial: Any, index: int, return_targets: bool, ignore_unknown_units: bool) -> dict[str, np.ndarray]:
        where = f"trial {index}"
        if isinstance(trial, np.ndarray) or (not isinstance(trial, Mapping) and hasattr(trial, "shape")):
            trial = {"spikes": np.asarray(trial)}
        if not isinstance(trial, Mapping):
            raise TypeError(
                f"{where}: expected a mapping (binned counts or spike times) or a (T, N_in) count array, "
                f"got {type(trial).__name__}."
            )
        if "spikes" in trial:
            out = {"spikes": self._counts(trial["spikes"], "spikes", "(T, N_in)", where)}
            if return_targets and trial.get("heldout_spikes") is not None:
                out["heldout_spikes"] = self._counts(trial["heldout_spikes"], "heldout_spikes", "(T, N_out)", where)
            if return_targets and trial.get("forward_spikes") is not None:
                out["forward_spikes"] = self._counts(trial["forward_spikes"], "forward_spikes", "(F, N)", where)
        elif "spike_times" in trial:
            out = self._bin_trial_times(trial, where, return_targets, ignore_unknown_units)
        else:
            raise ValueError(
                f"{where}: give 'spikes' (binned counts) or 'spike_times' (seconds); see NdtProcessor's docstring."
            )
        self._check_trial(out, where)
        return out

    def _bin_trial_times(
        self, trial: Mapping[str, Any], where: str, return_targets: bool, ignore_unknown_units: bool
    ) -> dict[str, np.ndarray]:
        times = np.asarray(trial["spike_times"])
        if times.size and not np.issubdtype(times.dtype, np.number):
            raise TypeError(f"{where}: spike_times must be numbers (seconds), got dtype {times.dtype}.")
        times = times.astype(np.float64).reshape(-1)
        if times.size and not np.all(np.isfinite(times)):
            raise ValueError(f"{where}: spike_times contains NaN or inf; drop those spikes.")
        duration = trial.get("duration")
        if duration is None:
            if self.num_bins is None:
                raise ValueError(f"{where}: give 'duration' (seconds) or build the processor with num_bins.")
            duration = self.num_bins * self.bin_size
        if "spike_unit_ids" in trial:
            ids = list(np.asarray(trial["spike_unit_ids"]).reshape(-1))
            cols = self._columns_of(ids, where, ignore_unknown_units) if ids else np.zeros(0, np.int64)
        elif "spike_unit_index" in trial:
            local = np.asarray(trial["spike_unit_index"]).reshape(-1)
            if local.size and not np.issubdtype(local.dtype, np.integer):
                raise TypeError(f"{where}: spike_unit_index must be integers, got dtype {local.dtype}.")
            local = local.astype(np.int64)
            if trial.get("unit_ids") is not None:
                table = self._columns_of(list(trial["unit_ids"]), where, ignore_unknown_units)
                if local.size and (local.min() < 0 or local.max() >= len(table)):
                    raise ValueError(
                        f"{where}: spike_unit_index must lie in [0, {len(table)}) (rows of unit_ids), "
                        f"got range [{local.min()}, {local.max()}]."
                    )
                cols = table[local]
            else:
                N = self.num_total_neurons
                if local.size and (local.min() < 0 or local.max() >= N):
                    raise ValueError(
                        f"{where}: spike_unit_index (used as column indices, no unit_ids given) must lie in "
                        f"[0, {N}) but has {local.max() + 1 if local.size and local.max() >= N else local.min()}; "
                        f"the processor holds {self.num_neurons} held-in + {self.num_heldout_neurons} held-out neurons."
                    )
                cols = local
        else:
            raise ValueError(f"{where}: give spike_unit_ids (strings) or spike_unit_index (ints) with the spike_times.")
        if cols.shape[0] != times.shape[0]:
            raise ValueError(f"{where}: {times.shape[0]} spike_times but {cols.shape[0]} spike units; one per spike.")
        horizon = float(duration) + self.num_forward_bins * self.bin_size
        if times.size and (times.min() < 0 or times.max() >= horizon + 1e-9 * self.bin_size):
            raise ValueError(
                f"{where}: spike_times must lie in [0, {horizon:.9g}) s from the trial start (observed window of "
                f"{float(duration):.9g} s plus {self.num_forward_bins} forward bins), got range "
                f"[{times.min():.9g}, {times.max():.9g}]; subtract the trial start and crop."
            )
        known = cols >= 0
        return self.bin_spikes(times[known], cols[known], 0.0, float(duration), return_targets)

    def _check_trial(self, out: dict[str, np.ndarray], where: str) -> None:
        spikes = out["spikes"]
        T, n = spikes.shape
        if n != self.num_neurons:
            more = "more" if n > self.num_neurons else "fewer"
            raise ValueError(
                f"{where}: spikes has {n} neurons (columns), {more} than the {self.num_neurons} held-in neurons the "
                "processor / config hold; select the model's held-in units in order (see heldin_unit_ids), or "
                f"build a config with num_neurons={n}."
            )
        if T < 1:
            raise ValueError(f"{where}: the trial has no bins.")
        if self.num_bins is not None and T > self.num_bins:
            raise ValueError(
                f"{where}: {T} observed bins but the model holds num_bins={self.num_bins}; crop the trial to "
                f"{self.num_bins * self.bin_size:.9g} s or build a config with a larger num_bins."
            )
        h = out.get("heldout_spikes")
        if h is not None and h.shape != (T, self.num_heldout_neurons):
            raise ValueError(
                f"{where}: heldout_spikes has shape {h.shape}, expected (T, N_out) = ({T}, {self.num_heldout_neurons})."
            )
        f = out.get("forward_spikes")
        if f is not None and f.shape != (self.num_forward_bins, self.num_total_neurons):
            raise ValueError(
                f"{where}: forward_spikes has shape {f.shape}, expected (F, N) = "
                f"({self.num_forward_bins}, {self.num_total_neurons}) (held-in then held-out neurons)."
            )

    def __call__(
        self,
        trials: Any,
        return_targets: bool = True,
        ignore_unknown_units: bool = False,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Bin and pad one trial or many into a batch.

        ``trials``: a trial (mapping or (T, N_in) array), a (B, T, N_in) array, or a sequence of
        trials; see the module docstring. Returns a ``BatchFeature`` with ``spikes`` (B, T, N_in)
        float32 (forward and padding bins zero; T = longest observed trial + F),
        ``attention_mask`` (B, T) int64 (1 for observed and forward bins) and, when every trial
        has them and ``return_targets``, ``heldout_spikes`` (B, T, N_out) and ``forward_spikes``
        (B, F, N).
        """
        if isinstance(trials, Mapping) or (isinstance(trials, np.ndarray) and trials.ndim == 2):
            trials = [trials]
        elif isinstance(trials, np.ndarray) and trials.ndim == 3:
            trials = list(trials)
        elif hasattr(trials, "numpy") and hasattr(trials, "dim"):  # a torch tensor
            arr = trials.detach().cpu().numpy()
            trials = [arr] if arr.ndim == 2 else list(arr)
        if isinstance(trials, (str, bytes)) or not isinstance(trials, Sequence) or len(trials) == 0:
            raise TypeError("NdtProcessor expects a trial, a (B, T, N_in) array or a non-empty list of trials.")
        items = [self._trial(t, i, return_targets, ignore_unknown_units) for i, t in enumerate(trials)]
        return self.pad(items, return_tensors=return_tensors)

    def pad(self, items: Sequence[dict[str, np.ndarray]], return_tensors: str | None = "pt") -> BatchFeature:
        """Pad per-trial count dicts (``spikes`` (T_i, N_in), optional targets) into one batch."""
        B = len(items)
        F_ = self.num_forward_bins
        lengths = [it["spikes"].shape[0] for it in items]
        T = max(lengths) + F_
        batch: dict[str, np.ndarray] = {
            "spikes": np.zeros((B, T, self.num_neurons), np.float32),
            "attention_mask": np.zeros((B, T), np.int64),
        }
        has_h = [("heldout_spikes" in it) for it in items]
        has_f = [("forward_spikes" in it) for it in items]
        for name, flags in (("heldout_spikes", has_h), ("forward_spikes", has_f)):
            if any(flags) and not all(flags):
                lacking = [i for i, f in enumerate(flags) if not f][:5]
                raise ValueError(f"either every trial has {name} or none does (trials {lacking} lack it).")
        if all(has_h) and self.num_heldout_neurons:
            batch["heldout_spikes"] = np.zeros((B, T, self.num_heldout_neurons), np.float32)
        if all(has_f) and F_:
            batch["forward_spikes"] = np.zeros((B, F_, self.num_total_neurons), np.float32)
        for b, (it, t) in enumerate(zip(items, lengths)):
            batch["spikes"][b, :t] = it["spikes"]
            batch["attention_mask"][b, : t + F_] = 1
            if "heldout_spikes" in batch:
                batch["heldout_spikes"][b, :t] = it["heldout_spikes"]
            if "forward_spikes" in batch:
                batch["forward_spikes"][b] = it["forward_spikes"]
        return BatchFeature(batch, tensor_type=return_tensors)


__all__ = ["NdtProcessor"]
