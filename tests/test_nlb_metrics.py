"""Tests for poyo_hf.training.nlb_metrics.

(a) small cases worked out by hand, (b) randomized cross-checks against nlb-tools 0.0.4
(the reference implementation of the Neural Latents Benchmark; CI installs it with
``pip install --no-deps nlb-tools==0.0.4``), (c) bad-input errors.

nlb_tools.evaluation imports and runs unchanged under numpy 2 / pandas 2.x / sklearn 1.x, so
the cross-checks call its public functions (``bits_per_spike``, ``fit_and_eval_decoder``,
``velocity_decoding``, ``eval_psth`` and the whole ``evaluate`` with in-memory dicts instead
of .h5 files). The PSTH builder is checked against ``NWBDataset.smooth_spk`` + ``resample``
run on a bare ``NWBDataset`` whose ``data`` frame we fill ourselves (no NWB file needed).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from poyo_hf.training import nlb_metrics as nm

SEEDS = [0, 1, 2]
ATOL = 1e-9


def _nlb_evaluation():
    pytest.importorskip(
        "nlb_tools",
        reason="nlb-tools is the reference implementation; install with "
        "`pip install --no-deps nlb-tools==0.0.4`",
    )
    pytest.importorskip("sklearn", reason="nlb_tools.evaluation needs scikit-learn")
    from nlb_tools import evaluation

    return evaluation


def _hand_nll(n: float, r: float) -> float:
    return r - n * math.log(r) + math.lgamma(n + 1.0)


# --------------------------------------------------------------------------------------------
# (a) hand-computed cases
# --------------------------------------------------------------------------------------------


def test_poisson_nll_single_entry_by_hand():
    n, r = 3.0, 2.0
    got = nm.poisson_nll(np.array([[[n]]]), np.array([[[r]]]))
    assert got == pytest.approx(_hand_nll(n, r), abs=1e-12)
    # 2 - 3 ln 2 + ln 6
    assert got == pytest.approx(2.0 - 3.0 * math.log(2.0) + math.log(6.0), abs=1e-12)


def test_poisson_nll_drops_nan_spikes_and_tolerates_rates_there():
    spikes = np.array([[[1.0], [np.nan], [0.0]]])
    rates = np.array([[[0.5], [np.nan], [0.25]]])  # NaN rate where the spike is NaN: allowed (NLB)
    expected = _hand_nll(1.0, 0.5) + _hand_nll(0.0, 0.25)
    assert nm.poisson_nll(spikes, rates) == pytest.approx(expected, abs=1e-12)


def test_zero_rates_are_replaced_with_warning_and_input_untouched():
    spikes = np.array([[[0.0, 2.0]]])
    rates = np.array([[[0.0, 1.0]]])
    with pytest.warns(RuntimeWarning, match="zero rate"):
        got = nm.poisson_nll(spikes, rates)
    assert got == pytest.approx(1e-9 + _hand_nll(2.0, 1.0), abs=1e-12)
    assert rates[0, 0, 0] == 0.0  # nlb_tools would have written 1e-9 into the caller's array


def test_bits_per_spike_by_hand():
    # one trial, two bins, one neuron: spikes 1 and 3, so the null rate is their mean, 2
    spikes = np.array([[[1.0], [3.0]]])
    rates = np.array([[[1.5], [2.5]]])
    nll_model = _hand_nll(1.0, 1.5) + _hand_nll(3.0, 2.5)
    nll_null = _hand_nll(1.0, 2.0) + _hand_nll(3.0, 2.0)
    expected = (nll_null - nll_model) / 4.0 / math.log(2.0)
    assert nm.bits_per_spike(rates, spikes) == pytest.approx(expected, abs=1e-12)
    assert nm.co_bps(rates, spikes) == pytest.approx(expected, abs=1e-12)
    assert nm.fp_bps(rates, spikes) == pytest.approx(expected, abs=1e-12)


def test_bits_per_spike_single_entry_is_zero():
    # 1x1x1: the null model is the spike count itself, so a rate equal to it scores 0
    assert nm.bits_per_spike(np.array([[[2.0]]]), np.array([[[2.0]]])) == pytest.approx(0.0, abs=1e-12)
    n, r = 2.0, 3.0
    expected = (_hand_nll(n, n) - _hand_nll(n, r)) / n / math.log(2.0)
    assert nm.bits_per_spike(np.array([[[r]]]), np.array([[[n]]])) == pytest.approx(expected, abs=1e-12)


def test_null_model_rates_give_zero_bits_per_spike():
    rng = np.random.default_rng(3)
    spikes = rng.poisson(0.4, size=(7, 11, 5)).astype(float)
    spikes[:, :, 2] = 0.0  # a silent neuron: null rate 0 -> 1e-9 silently (NLB)
    spikes[0, 0, 0] = np.nan
    null = np.nanmean(spikes, axis=(0, 1), keepdims=True) * np.ones_like(spikes)
    with pytest.warns(RuntimeWarning, match="zero rate"):  # the model's zeros do warn
        got = nm.bits_per_spike(null, spikes)
    assert got == pytest.approx(0.0, abs=1e-12)


def test_velocity_r2_perfect_linear_behaviour():
    rng = np.random.default_rng(4)
    weights = rng.normal(size=(6, 2))
    train_rates = rng.normal(scale=10.0, size=(30, 8, 6))
    eval_rates = rng.normal(scale=10.0, size=(10, 8, 6))
    train_beh = train_rates @ weights + 0.5  # deterministic, with an intercept
    eval_beh = eval_rates @ weights + 0.5
    assert nm.velocity_r2(train_rates, train_beh, eval_rates, eval_beh) == pytest.approx(1.0, abs=1e-6)


def test_velocity_r2_drops_rows_with_nan_behaviour():
    rng = np.random.default_rng(5)
    tr, er = rng.normal(size=(20, 6, 4)), rng.normal(size=(8, 6, 4))
    w = rng.normal(size=(4, 2))
    tb, eb = tr @ w + rng.normal(size=(20, 6, 2)), er @ w + rng.normal(size=(8, 6, 2))
    tb_nan, eb_nan, er_nan = tb.copy(), eb.copy(), er.copy()
    tb_nan[3, 2:] = np.nan
    eb_nan[1, :3] = np.nan
    er_nan[1, :3] = np.nan  # NaN rates are fine where the behaviour is NaN (NLB)
    keep_t = ~np.isnan(tb_nan.reshape(-1, 2)[:, 0])
    keep_e = ~np.isnan(eb_nan.reshape(-1, 2)[:, 0])
    expected = nm.velocity_r2(
        tr.reshape(-1, 4)[keep_t], tb.reshape(-1, 2)[keep_t], er.reshape(-1, 4)[keep_e], eb.reshape(-1, 2)[keep_e]
    )
    assert nm.velocity_r2(tr, tb_nan, er_nan, eb_nan) == pytest.approx(expected, abs=1e-12)


def test_psth_r2_by_hand():
    # 2 conditions x 2 bins x 2 neurons; condition 0 has trials 0 and 1, condition 1 trial 2
    psth = np.array([[[1.0, 0.0], [3.0, 1.0]], [[2.0, 2.0], [4.0, 1.0]]])
    rates = np.array([[[0.0, 0.0], [2.0, 1.0]], [[2.0, 1.0], [4.0, 1.0]], [[2.0, 2.0], [5.0, 0.0]]])
    cond_idx = [np.array([0, 1]), np.array([2])]
    # trial means: cond 0 -> [[1, .5], [3, 1]], cond 1 -> [[2, 2], [5, 0]]
    # neuron 0: true 1,3,2,4 (mean 2.5, SS_tot 5), pred 1,3,2,5 -> SS_res 1 -> R2 0.8
    # neuron 1: true 0,1,2,1 (mean 1, SS_tot 2), pred .5,1,2,0 -> SS_res .25+1=1.25 -> R2 0.375
    expected = (0.8 + 0.375) / 2
    assert nm.psth_r2(rates, psth, cond_idx) == pytest.approx(expected, abs=1e-12)


def test_psth_r2_skips_nan_bins_empty_conditions_and_applies_jitter():
    psth = np.array([[[np.nan], [1.0], [2.0], [4.0]], [[0.0], [0.0], [0.0], [0.0]]])
    rates = np.array([[[9.0], [1.0], [2.0], [np.nan]]])
    # jitter +1: trial becomes [nan, 9, 1, 2]; vs psth bins 1..3 -> pred 9, 1, 2 vs true 1, 2, 4
    ss_tot = sum((t - 7.0 / 3.0) ** 2 for t in (1.0, 2.0, 4.0))
    ss_res = (9 - 1) ** 2 + (1 - 2) ** 2 + (2 - 4) ** 2
    got = nm.psth_r2(rates, psth, [np.array([0]), np.array([], dtype=int)], jitter=np.array([1]))
    assert got == pytest.approx(1.0 - ss_res / ss_tot, abs=1e-12)


def test_make_psth_single_spike_is_the_rebinned_kernel():
    sd, bw = 4.0, 5
    spikes = np.zeros((1, 100, 1))
    spikes[0, 50, 0] = 1.0
    got = nm.make_psth(spikes, [np.array([0])], bw, sd)
    win = nm._gaussian_window(sd)
    assert len(win) == 24  # int(6 * sd): even length, NLB quirk
    # "same" convolution: output[t] = sum_k x[t + len(win)//2 - k] * win[k]
    full = np.zeros(100)
    for t in range(100):
        k = 50 - t + len(win) // 2
        if 0 <= k < len(win):
            full[t] = win[k]
    assert got.shape == (1, 20, 1)
    np.testing.assert_allclose(got[0, :, 0], full.reshape(20, 5).sum(axis=1), atol=1e-12)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)  # the kernel is normalised


def test_make_psth_averages_trials_per_condition():
    spikes = np.zeros((3, 10, 2))
    spikes[0, 2, 0] = spikes[2, 5, 1] = 1.0
    psth = nm.make_psth(spikes, [np.array([0, 1]), np.array([2])], 5, 1.0)
    single = nm.make_psth(spikes[:1], [np.array([0])], 5, 1.0)
    np.testing.assert_allclose(psth[0], single[0] / 2, atol=1e-15)
    assert psth[1, :, 0].sum() == 0.0 and psth[1, :, 1].sum() == pytest.approx(1.0, abs=1e-12)


def test_evaluate_nlb_keys():
    rng = np.random.default_rng(6)
    data = _random_nlb_dataset(rng)
    with pytest.warns(RuntimeWarning, match="zero rate"):
        out = nm.evaluate_nlb(**data)
    assert list(out) == ["co-bps", "vel R2", "psth R2", "fp-bps"]
    assert all(isinstance(v, float) for v in out.values())
    with pytest.warns(RuntimeWarning, match="zero rate"):
        only_co = nm.evaluate_nlb(
            eval_rates_heldin=data["eval_rates_heldin"],
            eval_rates_heldout=data["eval_rates_heldout"],
            eval_spikes_heldout=data["eval_spikes_heldout"],
        )
    assert list(only_co) == ["co-bps"] and only_co["co-bps"] == out["co-bps"]


# --------------------------------------------------------------------------------------------
# (b) randomized cross-checks against nlb_tools
# --------------------------------------------------------------------------------------------


def _random_nlb_dataset(rng: np.random.Generator, decode_masks: bool = False) -> dict:
    """Random arrays shaped like one NLB dataset (small), true rates + noisy predictions."""
    n_train, n_eval, n_bins, n_fwd, n_in, n_out, n_cond = 24, 12, 20, 6, 7, 4, 3
    n_all = n_in + n_out
    cond = rng.integers(0, n_cond, size=n_train + n_eval)
    templates = rng.normal(size=(n_cond, n_bins + n_fwd, 3)).cumsum(axis=1) * 0.3
    lat = templates[cond] + rng.normal(size=(n_train + n_eval, n_bins + n_fwd, 3)).cumsum(axis=1) * 0.1
    true_rates = np.exp(lat @ rng.normal(scale=0.5, size=(3, n_all)) - 1.5)
    true_rates[:, :, n_in + 1] *= 0.02  # a nearly silent held-out neuron
    spikes = rng.poisson(true_rates).astype(float)
    pred = true_rates * rng.gamma(20.0, 1 / 20.0, size=true_rates.shape)
    pred[(rng.random(pred.shape) < 0.02) & (spikes == 0)] = 0.0  # exact zeros -> 1e-9 with a warning
    beh = lat[:, :n_bins, :2] @ rng.normal(size=(2, 2)) + rng.normal(scale=0.3, size=(n_train + n_eval, n_bins, 2))
    beh[1, :4] = np.nan  # missing behaviour rows
    beh[n_train + 2, -3:] = np.nan
    tr, ev = slice(0, n_train), slice(n_train, None)
    eval_cond_idx = np.empty(n_cond, dtype=object)  # NLB stores an object array of index arrays
    for c in range(n_cond):
        eval_cond_idx[c] = np.where(cond[ev] == c)[0]
    psth = np.stack([true_rates[cond == c, :n_bins].mean(axis=0) for c in range(n_cond)])
    psth[0, -2:] = np.nan  # a shorter condition, NaN-padded
    out = {
        "eval_rates_heldin": pred[ev, :n_bins, :n_in],
        "eval_rates_heldout": pred[ev, :n_bins, n_in:],
        "eval_spikes_heldout": spikes[ev, :n_bins, n_in:],
        "train_rates_heldin": pred[tr, :n_bins, :n_in],
        "train_rates_heldout": pred[tr, :n_bins, n_in:],
        "train_behavior": beh[tr],
        "eval_behavior": beh[ev],
        "psth": psth,
        "eval_cond_idx": eval_cond_idx,
        "eval_rates_heldin_forward": pred[ev, n_bins:, :n_in],
        "eval_rates_heldout_forward": pred[ev, n_bins:, n_in:],
        "eval_spikes_heldin_forward": spikes[ev, n_bins:, :n_in],
        "eval_spikes_heldout_forward": spikes[ev, n_bins:, n_in:],
    }
    if decode_masks:
        side = rng.random(n_train + n_eval) < 0.5
        masks = np.stack([side, ~side]).T
        out["train_decode_mask"], out["eval_decode_mask"] = masks[tr], masks[ev]
    return out


_TARGET_KEYS = [
    "eval_spikes_heldout", "train_behavior", "eval_behavior", "psth", "eval_cond_idx",
    "eval_spikes_heldin_forward", "eval_spikes_heldout_forward", "train_decode_mask", "eval_decode_mask",
]


@pytest.mark.parametrize("seed", SEEDS)
def test_bits_per_spike_matches_nlb(seed):
    ev = _nlb_evaluation()
    rng = np.random.default_rng(seed)
    spikes = rng.poisson(rng.gamma(1.0, 0.3, size=(1, 1, 9)), size=(15, 25, 9)).astype(float)
    rates = rng.gamma(2.0, 0.2, size=spikes.shape)
    spikes[rng.random(spikes.shape) < 0.05] = np.nan  # unobserved entries
    spikes[:, :, 4] = np.nan  # an entirely unobserved neuron
    spikes[:, :, 5] = 0.0  # a silent neuron
    rates[np.isnan(spikes)] = np.nan if seed % 2 else -1.0  # ignored where spikes are NaN (NLB)
    rates[(rng.random(spikes.shape) < 0.02) & (spikes == 0)] = 0.0  # -> 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # ours (zero rates) and numpy's (nanmean)
        ours = nm.bits_per_spike(rates, spikes)
        theirs = ev.bits_per_spike(rates.copy(), spikes.copy())
    assert np.isfinite(ours)
    assert abs(ours - theirs) <= ATOL


@pytest.mark.parametrize("seed", SEEDS)
def test_decoder_matches_nlb_fit_and_eval_decoder(seed):
    ev = _nlb_evaluation()
    rng = np.random.default_rng(seed)
    x_tr, x_ev = rng.gamma(2.0, 0.3, size=(400, 10)), rng.gamma(2.0, 0.3, size=(150, 10))
    w = rng.normal(size=(10, 2))
    y_tr = x_tr @ w + rng.normal(scale=2.0, size=(400, 2))
    y_ev = x_ev @ w + rng.normal(scale=2.0, size=(150, 2))
    y_tr[rng.random(400) < 0.1] = np.nan
    y_ev[rng.random(150) < 0.1] = np.nan
    theirs = ev.fit_and_eval_decoder(x_tr, y_tr, x_ev, y_ev)
    assert abs(nm.velocity_r2(x_tr, y_tr, x_ev, y_ev) - theirs) <= ATOL


@pytest.mark.parametrize("seed", SEEDS)
def test_velocity_r2_with_decode_masks_matches_nlb(seed):
    ev = _nlb_evaluation()
    d = _random_nlb_dataset(np.random.default_rng(seed), decode_masks=True)
    tr = np.concatenate([d["train_rates_heldin"], d["train_rates_heldout"]], axis=-1)
    er = np.concatenate([d["eval_rates_heldin"], d["eval_rates_heldout"]], axis=-1)
    theirs = ev.velocity_decoding(
        tr, d["train_behavior"], d["train_decode_mask"], er, d["eval_behavior"], d["eval_decode_mask"]
    )
    ours = nm.velocity_r2(
        tr, d["train_behavior"], er, d["eval_behavior"],
        train_decode_mask=d["train_decode_mask"], eval_decode_mask=d["eval_decode_mask"],
    )
    assert abs(ours - theirs) <= ATOL


@pytest.mark.parametrize("seed", SEEDS)
def test_psth_r2_matches_nlb_eval_psth(seed):
    ev = _nlb_evaluation()
    rng = np.random.default_rng(seed)
    n_trials, n_bins, n_neurons, n_cond = 30, 25, 6, 4
    rates = rng.gamma(2.0, 0.2, size=(n_trials, n_bins, n_neurons))
    psth = rng.gamma(2.0, 0.2, size=(n_cond, n_bins, n_neurons))
    jitter = rng.integers(-3, 4, size=n_trials)
    psth[:, :3] = np.nan  # jittered trials are only compared where every trial has data
    psth[:, -3:] = np.nan
    psth[1, -6:] = np.nan
    cond = rng.integers(0, n_cond - 1, size=n_trials)  # the last condition has no eval trial
    cond_idx = [np.where(cond == c)[0] for c in range(n_cond)]
    for jit in (None, jitter):
        theirs = ev.eval_psth(psth, rates, cond_idx, jitter=jit)
        assert abs(nm.psth_r2(rates, psth, cond_idx, jitter=jit) - theirs) <= ATOL


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dataset", ["mc_maze", "area2_bump"])
def test_evaluate_nlb_matches_nlb_evaluate(seed, dataset):
    ev = _nlb_evaluation()
    d = _random_nlb_dataset(np.random.default_rng(seed), decode_masks=dataset == "area2_bump")
    target = {dataset: {k: v for k, v in d.items() if k in _TARGET_KEYS}}
    user = {dataset: {k: v for k, v in d.items() if k not in _TARGET_KEYS}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ours = nm.evaluate_nlb(**d)
        theirs = ev.evaluate(target, user)[0][f"{dataset}_split"]
    assert list(ours) == list(theirs) == ["co-bps", "vel R2", "psth R2", "fp-bps"]
    for key in ours:
        assert abs(ours[key] - theirs[key]) <= ATOL, key
    # predictions are noisy true rates, so every metric should be clearly positive
    assert min(ours.values()) > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_make_psth_matches_nlb_smoothing_and_rebinning(seed):
    pytest.importorskip(
        "nlb_tools", reason="nlb-tools is the reference implementation; `pip install --no-deps nlb-tools==0.0.4`"
    )
    pd = pytest.importorskip("pandas")
    from nlb_tools.nwb_interface import NWBDataset

    rng = np.random.default_rng(seed)
    n_ms, n_neurons, bw, sd = 4000, 3, 5, [70.0, 40.0, 50.0][seed]
    session = rng.poisson(0.04, size=(n_ms, n_neurons)).astype(float)
    session[1500:1550] = np.nan  # a gap in the recording
    # NLB path: a bare NWBDataset holding our 1 ms session; smooth_spk + resample as _make_psth
    ds = NWBDataset.__new__(NWBDataset)
    ds.data = pd.DataFrame(
        session.copy(),
        index=pd.timedelta_range(0, periods=n_ms, freq="1ms", name="clock_time"),
        columns=pd.MultiIndex.from_product([["spikes"], range(n_neurons)], names=("signal_type", "channel")),
    )
    ds.bin_width = 1
    ds.smooth_spk(sd, signal_type=["spikes"], overwrite=True, ignore_nans=True, parallelized=False)
    ds.resample(bw)
    binned = ds.data["spikes"].to_numpy()
    trial_ms, margin = 300, int(3 * sd) + 5
    starts = np.arange(margin, n_ms - trial_ms - margin, 230) // bw * bw  # on bin boundaries
    cond = rng.integers(0, 3, size=len(starts))
    cond[:3] = [0, 1, 2]
    cond_idx = [np.where(cond == c)[0] for c in range(3)]
    nlb_psth = []
    for idx in cond_idx:  # NLB averages with pandas groupby(align_time).mean() (skips NaN)
        trials = [binned[s // bw : (s + trial_ms) // bw] for s in starts[idx]]
        frame = pd.DataFrame(np.concatenate(trials))
        frame["align_time"] = np.tile(np.arange(trial_ms // bw), len(trials))
        nlb_psth.append(frame.groupby("align_time").mean().to_numpy())
    windows = np.stack([session[s - margin : s + trial_ms + margin] for s in starts])
    ours = nm.make_psth(windows, cond_idx, bw, sd, margin_ms=margin)
    np.testing.assert_allclose(ours, np.stack(nlb_psth), rtol=0, atol=ATOL)


# --------------------------------------------------------------------------------------------
# (c) bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [nm.bits_per_spike, nm.co_bps, nm.fp_bps, lambda r, s: nm.poisson_nll(s, r)])
def test_nan_negative_infinite_rates_raise(fn):
    spikes = np.ones((2, 3, 4))
    for bad, word in ((np.nan, "NaN"), (-0.1, "negative"), (np.inf, "infinite")):
        rates = np.ones((2, 3, 4))
        rates[1, 2, 3] = bad
        with pytest.raises(ValueError, match=word):
            fn(rates, spikes)


def test_shape_and_empty_errors():
    with pytest.raises(ValueError, match=r"rates has shape \(2, 3, 4\) but spikes has shape \(2, 3, 5\)"):
        nm.bits_per_spike(np.ones((2, 3, 4)), np.ones((2, 3, 5)))
    with pytest.raises(ValueError, match="eval_rates_heldout.*eval_spikes_heldout"):
        nm.co_bps(np.ones((2, 3, 4)), np.ones((2, 4, 4)))
    with pytest.raises(ValueError, match="eval_rates_forward must have 3 dimensions"):
        nm.fp_bps(np.ones((3, 4)), np.ones((3, 4)))
    with pytest.raises(ValueError, match="spikes is empty"):
        nm.poisson_nll(np.ones((0, 3, 4)), np.ones((0, 3, 4)))
    with pytest.raises(ValueError, match="no spikes"):
        nm.bits_per_spike(np.ones((2, 3, 4)), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="negative"):
        nm.poisson_nll(-np.ones((1, 1, 1)), np.ones((1, 1, 1)))


def test_velocity_r2_errors():
    r, b = np.ones((5, 4, 3)), np.ones((5, 4, 2))
    with pytest.raises(ValueError, match="train_rates has shape .* train_behavior"):
        nm.velocity_r2(r, np.ones((5, 3, 2)), r, b)
    with pytest.raises(ValueError, match="train_rates has 3 neurons but eval_rates has 2"):
        nm.velocity_r2(r, b, np.ones((5, 4, 2)), b)
    bad = r.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="eval_rates contains NaN"):
        nm.velocity_r2(r, b, bad, b)
    with pytest.raises(ValueError, match="n_folds"):
        nm.velocity_r2(r, b, r, b, n_folds=1)
    with pytest.raises(ValueError, match="both train_decode_mask and eval_decode_mask"):
        nm.velocity_r2(r, b, r, b, train_decode_mask=np.ones((5, 1), bool))


def test_psth_errors():
    rates, psth = np.ones((4, 5, 2)), np.ones((2, 5, 2))
    with pytest.raises(ValueError, match="psth has shape"):
        nm.psth_r2(rates, np.ones((2, 6, 2)), [np.array([0]), np.array([1])])
    with pytest.raises(ValueError, match="cond_idx has 1 conditions but psth has 2"):
        nm.psth_r2(rates, psth, [np.array([0])])
    with pytest.raises(ValueError, match="outside"):
        nm.psth_r2(rates, psth, [np.array([0]), np.array([4])])
    bad = rates.copy()
    bad[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="eval_rates .*NaN"):
        nm.psth_r2(bad, psth, [np.array([0, 1]), np.array([2])])
    with pytest.raises(ValueError, match="multiple of bin_width_ms"):
        nm.make_psth(np.zeros((2, 12, 1)), [np.array([0, 1])], 5, 2.0)
    with pytest.raises(ValueError, match="kernel_sd_ms"):
        nm.make_psth(np.zeros((2, 10, 1)), [np.array([0, 1])], 5, 0.1)


def test_evaluate_nlb_partial_inputs_raise():
    d = _random_nlb_dataset(np.random.default_rng(0))
    base = {k: d[k] for k in ("eval_rates_heldin", "eval_rates_heldout", "eval_spikes_heldout")}
    with pytest.raises(ValueError, match="vel R2 needs .*eval_behavior"):
        nm.evaluate_nlb(**base, train_rates_heldin=d["train_rates_heldin"],
                        train_rates_heldout=d["train_rates_heldout"], train_behavior=d["train_behavior"])
    with pytest.raises(ValueError, match="psth and eval_cond_idx"):
        nm.evaluate_nlb(**base, psth=d["psth"])
    with pytest.raises(ValueError, match="fp-bps needs"):
        nm.evaluate_nlb(**base, eval_rates_heldin_forward=d["eval_rates_heldin_forward"])
