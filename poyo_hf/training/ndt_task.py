"""NDT inside the pretraining / evaluation programs: trials from segments, a resumable trial
stream, and the Neural Latents Benchmark evaluation (co-bps, fp-bps, vel R^2).

NDT models one session's neurons (its input is a fixed-width count vector per bin), so an NDT
run uses one session of the corpus (``--session`` picks it when there are several). Its unit ids
are split into held-in inputs and held-out neurons, the held-out ones chosen at random with the
run's seed (NLB holds out a random ~25% of neurons); the split is saved in the processor.

Trials: a trial is ``num_bins`` observed bins followed by ``num_forward_bins`` forward bins of
``bin_size`` seconds, ``L = (num_bins + num_forward_bins) * bin_size`` in all, cut from inside
one segment. Training draws them the way POYO draws its windows (a fresh random offset per
epoch, :func:`poyo_hf.data.windows.training_windows`); evaluation tiles each segment with
back-to-back trials from its start. Each batch is seeded by ``(seed, epoch, batch)``, so a
resumed run replays exactly (the masking draws come from the global torch RNG, which
``Accelerator.save_state`` restores).

Evaluation, NLB style (:mod:`poyo_hf.training.nlb_metrics`): the model runs unmasked on the
eval trials; co-bps scores the held-out neurons' rates over the observed bins, fp-bps all
neurons' rates over the forward bins, and vel R^2 a ridge regression (NLB's alpha grid, 5-fold
CV) from the rates of all neurons in a bin to the behaviour at that bin's centre, fit on train
trials and scored on the eval trials (behaviour samples outside the task's eval epochs are
dropped, as POYO's R^2 drops them). The behaviour is taken ``BEHAVIOR_LAG_S`` = 100 ms after
each bin's centre, as NLB lags MC_Maze's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..data.windows import Segment, training_windows

# NLB lags behaviour behind the rates it is decoded from (MC_Maze: +100 ms, spec sec. 2); our
# simulator's neural activity leads the hand by 100 ms too.
BEHAVIOR_LAG_S = 0.1
MAX_RIDGE_TRIALS = 2000  # train trials used to fit the velocity ridge (enough rows; bounded time)


def ndt_session(corpus: Any, session: str | None) -> dict[str, Any]:
    """The one session an NDT run models (``session`` picks it in a multi-session corpus)."""
    sessions = {s["session_id"]: s for s in corpus.sessions}
    if session is not None:
        if session not in sessions:
            raise ValueError(f"--session {session!r} is not in the datasets; choose one of {sorted(sessions)[:10]}.")
        return sessions[session]
    if len(sessions) != 1:
        raise ValueError(
            f"NDT models one session's neurons, but the datasets hold {len(sessions)} sessions "
            f"({sorted(sessions)[:5]}...); pick one with --session ID."
        )
    return next(iter(sessions.values()))


def split_units(unit_ids: Sequence[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Held-in and held-out unit ids (held-out: a seeded random ``heldout_fraction`` of units, in
    the session's order)."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"--ndt_heldout_fraction must be in [0, 1), got {heldout_fraction}.")
    units = [str(u) for u in unit_ids]
    n_out = int(round(heldout_fraction * len(units)))
    if len(units) - n_out < 1:
        raise ValueError(f"the session has {len(units)} units; at least one must stay held-in.")
    chosen = set(np.random.default_rng([seed, 7]).choice(len(units), size=n_out, replace=False).tolist())
    return [u for i, u in enumerate(units) if i not in chosen], [u for i, u in enumerate(units) if i in chosen]


def build_ndt(args: Any, corpus: Any) -> tuple[Any, Any]:
    """An ``NdtForMaskedModeling`` and its processor for the run's session (or ``init_from``)."""
    import json

    from poyo_hf.models.ndt import NdtConfig, NdtForMaskedModeling, NdtProcessor

    sess = ndt_session(corpus, args.session)
    if args.init_from:
        model = NdtForMaskedModeling.from_pretrained(args.init_from)
        processor = NdtProcessor.from_pretrained(args.init_from)
        processor.check_config(model.config)
        missing = [u for u in processor.heldin_unit_ids + processor.heldout_unit_ids if u not in set(sess["unit_ids"])]
        if missing:
            raise ValueError(
                f"the checkpoint's units {missing[:5]} are not in session {sess['session_id']!r}; NDT needs the same "
                "neurons it was trained on."
            )
        return model, processor
    heldin, heldout = split_units(sess["unit_ids"], args.ndt_heldout_fraction, args.seed)
    overrides = json.loads(args.config_overrides) if args.config_overrides else {}
    for key in ("num_neurons", "num_heldout_neurons"):
        if key in overrides:
            raise ValueError(f"config override {key!r} is set from the data; remove it from --config_overrides.")
    config = NdtConfig(num_neurons=len(heldin), num_heldout_neurons=len(heldout), **overrides)
    processor = NdtProcessor.from_config(config, heldin, heldout)
    return NdtForMaskedModeling(config), processor


def trial_length(processor: Any) -> float:
    return (processor.num_bins + processor.num_forward_bins) * processor.bin_size


def session_segments(segments: Sequence[Segment], session_id: str) -> list[Segment]:
    return [s for s in segments if s.session_id == session_id]


def tiled_trials(segments: Sequence[Segment], length: float) -> list[tuple[Segment, float]]:
    """Back-to-back trials of ``length`` s from each segment's start (evaluation)."""
    out = []
    for seg in segments:
        n = int(np.floor(seg.duration / length + 1e-9))
        out.extend((seg, seg.start + k * length) for k in range(n))
    return out


def bin_trials(processor: Any, trials: Sequence[tuple[Segment, float]]) -> Any:
    """A padded NDT batch (``BatchFeature`` of tensors) of ``(segment, start)`` trials."""
    obs = processor.num_bins * processor.bin_size
    items = [processor.bin_segment(seg, t0, t0 + obs, ignore_unknown_units=True) for seg, t0 in trials]
    return processor.pad(items)


class NdtTrialStream:
    """Batches of binned NDT training trials, epoch after epoch, exactly resumable.

    Epoch ``e`` draws every segment's trial starts (random offset) and their order from
    ``(seed, e)``; ``state_dict`` records the epoch and the batches already consumed, so
    ``load_state_dict`` continues with the same next batch.
    """

    def __init__(
        self, segments: Sequence[Segment], processor: Any, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1
    ):
        self.rank, self.world = int(rank), int(world)
        self.segments = list(segments)
        self.processor = processor
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.length = trial_length(processor)
        usable = [s for s in self.segments if s.duration >= self.length]
        if not usable:
            raise ValueError(
                f"no train segment is as long as one NDT trial ({self.length:.3f} s = num_bins + num_forward_bins "
                "bins); use fewer bins (config_overrides num_bins / num_forward_bins) or longer segments."
            )
        self.segments = usable
        self.epoch = 0
        self._in_epoch = 0
        self._skip = 0
        n = len(self._epoch_trials())  # checked before any training starts
        if n < self.batch_size * self.world:
            raise ValueError(
                f"an epoch has {n} NDT trials, fewer than one batch of {self.batch_size} per process "
                f"({self.world} process(es)); lower --batch_size or use more data."
            )

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_in_epoch": self._in_epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"stream state was saved with seed {state['seed']}, this stream has seed {self.seed}.")
        self.epoch = int(state["epoch"])
        self._skip = int(state["batches_in_epoch"])

    def _epoch_trials(self) -> list[tuple[Segment, float]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        trials = []
        for seg in self.segments:
            # Windows of the full trial length that end inside the segment.
            starts = training_windows(seg, self.length, rng)
            trials.extend((seg, float(t)) for t in starts if t + self.length <= seg.end + 1e-9)
        order = rng.permutation(len(trials))
        return [trials[i] for i in order]

    def epochs(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            trials = self._epoch_trials()
            # Each process takes every world-th batch of the same shuffled epoch.
            n_batches = len(trials) // (self.batch_size * self.world)
            if n_batches == 0:
                raise ValueError(
                    f"an epoch has {len(trials)} NDT trials, fewer than one batch of {self.batch_size} per process; "
                    "lower --batch_size."
                )
            start, self._skip = self._skip, 0
            for i in range(start, n_batches):
                self._in_epoch = i + 1
                j = (i * self.world + self.rank) * self.batch_size
                yield dict(bin_trials(self.processor, trials[j : j + self.batch_size]))
            self.epoch += 1
            self._in_epoch = 0


@torch.no_grad()
def predict_rates(model: Any, processor: Any, trials: Sequence[tuple[Segment, float]], batch_size: int = 64):
    """Unmasked rates (counts per bin) of ``trials``: (n, T + F, N) and the binned targets."""
    was_training = model.training
    model.eval()
    rates, spikes, heldout, forward = [], [], [], []
    device = next(model.parameters()).device
    for i in range(0, len(trials), batch_size):
        batch = bin_trials(processor, trials[i : i + batch_size])
        out = model(spikes=batch["spikes"].to(device), attention_mask=batch["attention_mask"].to(device), mask=False)
        rates.append(out.rates.float().cpu().numpy())
        spikes.append(batch["spikes"].numpy())
        if "heldout_spikes" in batch:
            heldout.append(batch["heldout_spikes"].numpy())
        if "forward_spikes" in batch:
            forward.append(batch["forward_spikes"].numpy())
    model.train(was_training)
    cat = lambda xs: np.concatenate(xs) if xs else None  # noqa: E731
    return cat(rates), cat(spikes), cat(heldout), cat(forward)


def bin_behavior(processor: Any, trials: Sequence[tuple[Segment, float]], lag_s: float = BEHAVIOR_LAG_S) -> np.ndarray:
    """Behaviour ``lag_s`` after each observed bin's centre, (n, T, D); NaN outside the eval epochs."""
    T, w = processor.num_bins, processor.bin_size
    out = []
    for seg, t0 in trials:
        centres = t0 + (np.arange(T) + 0.5) * w + lag_s
        ts = seg.behavior_timestamps
        vals = np.stack(
            [np.interp(centres, ts, seg.behavior_values[:, d]) for d in range(seg.behavior_values.shape[1])], 1
        )
        # Score only bins whose nearest behaviour sample counts in evaluation (task epochs, not NaN).
        nearest = np.clip(np.searchsorted(ts, centres), 0, len(ts) - 1)
        ok = seg.eval_mask[nearest] & (centres >= ts[0]) & (centres <= ts[-1])
        vals[~ok] = np.nan
        out.append(vals)
    return np.stack(out).astype(np.float64)


def evaluate_ndt(
    model: Any,
    processor: Any,
    eval_segments: Sequence[Segment],
    train_segments: Sequence[Segment],
    batch_size: int = 64,
    with_baseline: bool = True,
    lag_s: float = BEHAVIOR_LAG_S,
) -> dict[str, Any]:
    """NLB metrics of an NDT model on one session's eval segments (see the module docstring).

    Returns ``co_bps``, ``fp_bps``, ``vel_r2`` (also as ``r2`` so logs read like POYO's), their
    per-session dicts, trial counts and, with ``with_baseline``, the Wiener filter's R^2 on the
    same session's stitched eval samples (``wiener_r2``) for reference.
    """
    from .nlb_metrics import co_bps, fp_bps, velocity_r2

    sids = {s.session_id for s in eval_segments}
    if len(sids) != 1:
        raise ValueError(f"NDT evaluates one session; the eval segments hold {sorted(sids)}.")
    sid = next(iter(sids))
    length = trial_length(processor)
    eval_trials = tiled_trials(eval_segments, length)
    train_trials = tiled_trials(session_segments(train_segments, sid), length)
    if not eval_trials or not train_trials:
        raise ValueError(
            f"session {sid!r}: no eval or train segment holds a whole {length:.3f} s trial "
            f"({len(eval_trials)} eval, {len(train_trials)} train trials)."
        )
    if len(train_trials) > MAX_RIDGE_TRIALS:
        keep = np.sort(np.random.default_rng(0).choice(len(train_trials), MAX_RIDGE_TRIALS, replace=False))
        train_trials = [train_trials[i] for i in keep]
    T, n_in = processor.num_bins, processor.num_neurons
    rates, _, heldout, forward = predict_rates(model, processor, eval_trials, batch_size)
    train_rates = predict_rates(model, processor, train_trials, batch_size)[0]
    res: dict[str, Any] = {"session_id": sid, "n_eval_trials": len(eval_trials), "n_train_trials": len(train_trials)}
    if heldout is not None:
        res["co_bps"] = co_bps(rates[:, :T, n_in:], heldout[:, :T])
    if forward is not None:
        res["fp_bps"] = fp_bps(rates[:, T:], forward)
    res["vel_r2"] = velocity_r2(
        train_rates[:, :T],
        bin_behavior(processor, train_trials, lag_s),
        rates[:, :T],
        bin_behavior(processor, eval_trials, lag_s),
    )
    res["behavior_lag_s"] = lag_s
    res["r2"] = res["vel_r2"]
    for key in ("co_bps", "fp_bps", "vel_r2"):
        if key in res:
            res[f"{key}_per_session"] = {sid: res[key]}
    res["r2_per_session"] = {sid: res["vel_r2"]}
    if with_baseline:
        from .metrics import r2_score
        from .wiener import WienerFilter

        wf = WienerFilter().fit(session_segments(train_segments, sid))
        ys, ps = [], []
        for seg in eval_segments:
            keep = seg.eval_mask & np.isfinite(seg.behavior_values).all(1)
            if keep.sum():
                ys.append(seg.behavior_values[keep])
                ps.append(wf.predict(seg, seg.behavior_timestamps[keep]))
        if ys:
            res["wiener_r2"] = r2_score(np.concatenate(ys), np.concatenate(ps))
            res["wiener_r2_per_session"] = {sid: res["wiener_r2"]}
    return res


def smoothing_baseline(
    processor: Any,
    eval_segments: Sequence[Segment],
    train_segments: Sequence[Segment],
    kernel_sd_s: float = 0.05,
    alpha: float = 1e-2,
    lag_s: float = BEHAVIOR_LAG_S,
) -> dict[str, float]:
    """NLB's spike-smoothing baseline on the same trials as :func:`evaluate_ndt`: held-in counts
    smoothed with a Gaussian kernel (``kernel_sd_s``), a Poisson GLM per held-out neuron
    (sklearn ``PoissonRegressor``) fit on train trials for co-bps, and the velocity ridge on the
    smoothed rates of all neurons. It tells how much co-smoothing signal the data hold."""
    from scipy.ndimage import gaussian_filter1d
    from sklearn.linear_model import PoissonRegressor

    from .nlb_metrics import co_bps, velocity_r2

    sid = eval_segments[0].session_id
    length = trial_length(processor)
    eval_trials = tiled_trials(eval_segments, length)
    train_trials = tiled_trials(session_segments(train_segments, sid), length)[:MAX_RIDGE_TRIALS]
    T, n_in, n_out = processor.num_bins, processor.num_neurons, processor.num_heldout_neurons
    sd_bins = kernel_sd_s / processor.bin_size
    ev, tr = bin_trials(processor, eval_trials), bin_trials(processor, train_trials)

    def smooth(x: np.ndarray) -> np.ndarray:
        return gaussian_filter1d(x.astype(np.float64), sd_bins, axis=1, mode="nearest")

    xs_tr, xs_ev = smooth(tr["spikes"].numpy()[:, :T]), smooth(ev["spikes"].numpy()[:, :T])  # (n, T, N_in)
    out: dict[str, float] = {"kernel_sd_s": kernel_sd_s}
    if n_out:
        y_tr = tr["heldout_spikes"].numpy()[:, :T].reshape(-1, n_out)
        y_ev = ev["heldout_spikes"].numpy()[:, :T]
        x_tr2, x_ev2 = xs_tr.reshape(-1, n_in), xs_ev.reshape(-1, n_in)
        glms = [PoissonRegressor(alpha=alpha, max_iter=300).fit(x_tr2, y_tr[:, j]) for j in range(n_out)]
        pred_ev = np.stack([g.predict(x_ev2) for g in glms], 1).reshape(y_ev.shape)  # (n, T, N_out)
        pred_tr = np.stack([g.predict(x_tr2) for g in glms], 1).reshape(xs_tr.shape[:2] + (n_out,))
        out["co_bps"] = co_bps(pred_ev, y_ev)
        # As NLB's baseline submits: smoothed held-in rates with the GLM's held-out rates.
        rates_tr = np.concatenate([xs_tr, pred_tr], -1)
        rates_ev = np.concatenate([xs_ev, pred_ev], -1)
    else:
        rates_tr, rates_ev = xs_tr, xs_ev
    out["vel_r2"] = velocity_r2(
        rates_tr, bin_behavior(processor, train_trials, lag_s), rates_ev, bin_behavior(processor, eval_trials, lag_s)
    )
    return out
