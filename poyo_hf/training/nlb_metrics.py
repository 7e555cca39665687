"""Neural Latents Benchmark ('21) metrics, reimplemented without ``nlb_tools``.

The definitions follow ``nlb_tools.evaluation`` (nlb-tools 0.0.4 on PyPI, Pei et al. 2021,
"Neural Latents Benchmark '21") and give the same numbers for valid inputs (the tests check
this to 1e-9 against nlb-tools on random data). We keep our own copy because nlb-tools pins
``pandas<=1.3.4`` and pulls h5py/pynwb in just to compute a handful of array metrics; here
only numpy and scipy are needed at import time, scikit-learn only inside
:func:`velocity_r2` / :func:`psth_r2`.

Array conventions (the same as the NLB ``.h5`` tensors):

- spikes / rates: ``(n_trials, n_bins, n_neurons)`` spike counts and predicted rates *in
  counts per bin* (not Hz), e.g. 5 ms bins.
- behaviour: ``(n_trials, n_bins, n_dims)``, e.g. hand velocity (x, y).
- PSTH: ``(n_conditions, n_bins, n_neurons)``, in counts per bin.

Metrics (definitions: the shared NDT/NLB spec, ``ndt-nlb-spec.md`` section 3):

- :func:`poisson_nll` -- sum of ``r - n log r + log n!``.
- :func:`bits_per_spike`, :func:`co_bps`, :func:`fp_bps` -- log-likelihood improvement over a
  per-neuron mean-rate null model, in bits per spike.
- :func:`velocity_r2` -- ridge decoding of behaviour from the rates (alpha by 5-fold CV).
- :func:`psth_r2` -- R^2 between trial-averaged predicted rates and the true PSTH;
  :func:`make_psth` builds the true PSTH the way NLB's ``make_tensors`` does.
- :func:`evaluate_nlb` -- all of the above for one dataset, keyed like
  ``nlb_tools.evaluation.evaluate``.

Where nlb-tools has a quirk that changes numbers, we copy it and say so in a ``NLB quirk``
comment. Where nlb-tools would crash on an ``assert``, return NaN/inf, or silently mutate
its input, we raise a ``ValueError`` that names the argument and the fix instead
(``NLB divergence`` comments); those inputs are invalid anyway.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import gammaln

__all__ = [
    "DEFAULT_ALPHAS",
    "ZERO_RATE_REPLACEMENT",
    "bits_per_spike",
    "co_bps",
    "evaluate_nlb",
    "fp_bps",
    "make_psth",
    "poisson_nll",
    "psth_r2",
    "velocity_r2",
]

#: Rate substituted for exact-zero predictions before taking log(r), as in
#: ``nlb_tools.evaluation.neg_log_likelihood``.
ZERO_RATE_REPLACEMENT: float = 1e-9

#: Ridge penalty grid of ``nlb_tools.evaluation.fit_and_eval_decoder``.
DEFAULT_ALPHAS: NDArray[np.float64] = np.logspace(-4, 0, 9)

FloatArray = NDArray[np.float64]


# --------------------------------------------------------------------------------------------
# input checking
# --------------------------------------------------------------------------------------------


def _as_float(x: ArrayLike, name: str, ndims: Sequence[int] | None = None, what: str = "") -> FloatArray:
    """Return ``x`` as a fresh float64 array, checking it is non-empty and has an allowed ndim.

    A copy is always made so nothing below can modify the caller's array (nlb-tools does:
    its ``neg_log_likelihood`` writes 1e-9 into the caller's rate array in place).
    """
    if x is None:
        raise ValueError(f"{name} is None; pass an array{' of shape ' + what if what else ''}.")
    try:
        arr = np.array(x, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{name} could not be converted to a float array ({err}); pass a numeric array"
            f"{' of shape ' + what if what else ''}."
        ) from err
    if ndims is not None and arr.ndim not in ndims:
        raise ValueError(
            f"{name} must have {' or '.join(str(d) for d in ndims)} dimensions"
            f"{' (' + what + ')' if what else ''}, got shape {arr.shape}."
        )
    if arr.size == 0:
        raise ValueError(
            f"{name} is empty (shape {arr.shape}); pass at least one entry along every axis"
            f"{' (' + what + ')' if what else ''}."
        )
    return arr


def _check_same_shape(a: np.ndarray, a_name: str, b: np.ndarray, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{a_name} has shape {a.shape} but {b_name} has shape {b.shape}; they must match "
            f"entry for entry (same trials, bins and neurons, in the same order)."
        )


def _check_spikes(spikes: FloatArray, name: str) -> None:
    # NLB divergence: nlb-tools does not check spike counts at all; negative or infinite
    # counts make the Poisson likelihood meaningless, so we refuse them.
    finite = spikes[~np.isnan(spikes)]
    if np.any(np.isinf(finite)):
        raise ValueError(f"{name} contains infinite values; spike counts must be finite (NaN marks missing).")
    if np.any(finite < 0):
        raise ValueError(f"{name} contains negative values; spike counts must be >= 0 (NaN marks missing).")


# --------------------------------------------------------------------------------------------
# Poisson likelihood and bits per spike
# --------------------------------------------------------------------------------------------


def _nll(rates: FloatArray, spikes: FloatArray, rates_name: str, warn_zero: bool) -> float:
    """Summed Poisson NLL of already-validated, same-shape float arrays (see poisson_nll)."""
    # NLB: entries with NaN spikes (missing data, e.g. outside DMFC_RSG's set-go window) are
    # dropped from both arrays *before* the rates are checked, so NaN/negative rates there
    # are tolerated (NLB quirk, kept).
    valid = ~np.isnan(spikes)
    r = rates[valid]
    n = spikes[valid]
    if np.any(np.isnan(r)):
        raise ValueError(
            f"{rates_name} contains {int(np.isnan(r).sum())} NaN value(s) where the spikes are "
            f"observed; predict a finite rate >= 0 for every observed (non-NaN) spike count."
        )
    if np.any(r < 0):
        raise ValueError(
            f"{rates_name} contains {int((r < 0).sum())} negative value(s); rates are Poisson "
            f"means and must be >= 0 (exponentiate log-rates, or clip at 0)."
        )
    # NLB divergence: nlb-tools lets +inf through (NLL becomes inf or NaN); we refuse it.
    if np.any(np.isinf(r)):
        raise ValueError(
            f"{rates_name} contains infinite value(s); rates must be finite (check for an "
            f"overflowing exp() of log-rates)."
        )
    zero = r == 0
    if np.any(zero):
        # NLB: log(0) is -inf, so exact zeros are replaced by 1e-9. nlb-tools logs a warning
        # for the model but not for the null model (zero_warning=False); we do the same with
        # warnings.warn.
        if warn_zero:
            warnings.warn(
                f"{rates_name}: {int(zero.sum())} zero rate prediction(s) replaced with "
                f"{ZERO_RATE_REPLACEMENT:g} (as nlb_tools does)",
                RuntimeWarning,
                stacklevel=3,
            )
        r[zero] = ZERO_RATE_REPLACEMENT  # r is a copy (boolean indexing), the caller's array is untouched
    # -log(e^-r r^n / n!) = r - n log r + log n!   (log n! = gammaln(n + 1), as in NLB)
    return float(np.sum(r - n * np.log(r) + gammaln(n + 1.0)))


def poisson_nll(spikes: ArrayLike, rates: ArrayLike) -> float:
    """Poisson negative log-likelihood summed over all entries.

    ``sum(r - n * log(r) + log(n!))``, the NLB definition (``nlb_tools.evaluation
    .neg_log_likelihood``), natural log.

    Args:
        spikes: observed counts ``n``, any shape, e.g. ``(n_trials, n_bins, n_neurons)``.
            NaN entries mean "not observed" and are dropped together with their rates.
        rates: predicted Poisson means ``r`` (counts per bin), same shape as ``spikes``.

    Returns:
        The summed NLL in nats (a Python float).

    Raises:
        ValueError: shapes differ, an array is empty, every spike is NaN, a rate at an
            observed entry is NaN, negative or infinite, or a spike count is negative/infinite.

    Warns:
        RuntimeWarning: when exact-zero rates are replaced by 1e-9 (as NLB does).
    """
    s = _as_float(spikes, "spikes")
    r = _as_float(rates, "rates")
    _check_same_shape(r, "rates", s, "spikes")
    _check_spikes(s, "spikes")
    if np.all(np.isnan(s)):
        raise ValueError("spikes is all NaN; there is no observed count to score.")
    return _nll(r, s, "rates", warn_zero=True)


def bits_per_spike(rates: ArrayLike, spikes: ArrayLike) -> float:
    """Bits per spike of rate predictions, exactly as ``nlb_tools.evaluation.bits_per_spike``.

    ``(NLL_null - NLL_model) / total_spikes / ln 2``. The null model predicts, for each
    neuron (last axis), the mean count over all trials and bins of *the evaluated spikes
    themselves* (an in-sample mean, NLB's definition), ignoring NaNs.

    Args:
        rates: predicted counts per bin, shape ``(..., n_neurons)``, normally
            ``(n_trials, n_bins, n_neurons)``; at least 2-D.
        spikes: observed counts, same shape; NaN marks unobserved entries (dropped from
            both likelihoods and from the spike total).

    Returns:
        Bits per spike (float); 0 for rates equal to the null model, > 0 when better.

    Raises:
        ValueError: bad shapes / empty arrays, NaN / negative / infinite rates at observed
            entries, negative spikes, or no spikes at all (the metric divides by the count).
    """
    r = _as_float(rates, "rates", ndims=None)
    s = _as_float(spikes, "spikes", ndims=None)
    for arr, name in ((r, "rates"), (s, "spikes")):
        if arr.ndim < 2:
            raise ValueError(
                f"{name} must be at least 2-D with neurons on the last axis "
                f"(e.g. (n_trials, n_bins, n_neurons)), got shape {arr.shape}."
            )
    _check_same_shape(r, "rates", s, "spikes")
    _check_spikes(s, "spikes")
    total = np.nansum(s)
    if not total > 0:
        # NLB divergence: nlb-tools divides by zero here and returns inf/NaN.
        raise ValueError(
            "spikes contains no spikes (total count 0 after dropping NaNs); bits/spike is "
            "undefined. Evaluate on more trials or neurons."
        )
    nll_model = _nll(r, s, "rates", warn_zero=True)
    # NLB: null rate = per-neuron nanmean over every axis but the last, broadcast back to the
    # full shape. A neuron whose counts are all NaN gets a NaN null rate, but all its entries
    # are then dropped as unobserved; a silent neuron gets 0, which the NLL replaces by 1e-9
    # *without* a warning (NLB quirk: zero_warning=False for the null model).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice" for all-NaN neurons
        null = np.nanmean(s, axis=tuple(range(s.ndim - 1)), keepdims=True)
    null_rates = np.array(np.broadcast_to(null, s.shape))
    nll_null = _nll(null_rates, s, "null rates", warn_zero=False)
    # Same operation order as NLB: (null - model) / nansum(spikes) / log(2).
    return float((nll_null - nll_model) / total / np.log(2))


def co_bps(eval_rates_heldout: ArrayLike, eval_spikes_heldout: ArrayLike) -> float:
    """Co-smoothing bits per spike (NLB's primary metric, ``"co-bps"``).

    Bits per spike of the predicted rates of the *held-out* neurons on the eval trials, as
    ``nlb_tools.evaluation.evaluate`` computes ``result_dict["co-bps"]``.

    Args:
        eval_rates_heldout: ``(n_eval_trials, n_bins, n_heldout_neurons)`` predicted counts/bin.
        eval_spikes_heldout: same shape, true held-out counts (NaN = unobserved).
    """
    r = _as_float(eval_rates_heldout, "eval_rates_heldout", (3,), "n_trials, n_bins, n_heldout_neurons")
    s = _as_float(eval_spikes_heldout, "eval_spikes_heldout", (3,), "n_trials, n_bins, n_heldout_neurons")
    _check_same_shape(r, "eval_rates_heldout", s, "eval_spikes_heldout")
    return bits_per_spike(r, s)


def fp_bps(eval_rates_forward: ArrayLike, eval_spikes_forward: ArrayLike) -> float:
    """Forward-prediction bits per spike (NLB ``"fp-bps"``).

    NLB stacks held-in and held-out neurons of the forward bins along the neuron axis
    (``np.dstack([heldin, heldout])``) and scores them together with one null model per
    neuron, so pass the concatenation, e.g. ``np.concatenate([heldin, heldout], axis=-1)``.

    Args:
        eval_rates_forward: ``(n_eval_trials, n_forward_bins, n_heldin + n_heldout)``
            predicted counts per bin for the bins after the observed window (40 x 5 ms in NLB).
        eval_spikes_forward: same shape, the true counts.
    """
    r = _as_float(eval_rates_forward, "eval_rates_forward", (3,), "n_trials, n_forward_bins, n_neurons")
    s = _as_float(eval_spikes_forward, "eval_spikes_forward", (3,), "n_trials, n_forward_bins, n_neurons")
    _check_same_shape(r, "eval_rates_forward", s, "eval_spikes_forward")
    return bits_per_spike(r, s)


# --------------------------------------------------------------------------------------------
# behaviour decoding
# --------------------------------------------------------------------------------------------


def _fit_and_score_ridge(
    x_train: FloatArray,
    y_train: FloatArray,
    x_eval: FloatArray,
    y_eval: FloatArray,
    alphas: FloatArray,
    n_folds: int,
) -> float:
    """Mirror of ``nlb_tools.evaluation.fit_and_eval_decoder`` (grid_search=True), 2-D inputs."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV

    # NLB quirk: rows are dropped when behaviour *column 0* is NaN (the other columns are not
    # looked at); the rates of those rows may be NaN.
    keep_train = ~np.isnan(y_train[:, 0])
    keep_eval = ~np.isnan(y_eval[:, 0])
    x_train, y_train = x_train[keep_train], y_train[keep_train]
    x_eval, y_eval = x_eval[keep_eval], y_eval[keep_eval]
    if np.isnan(x_train).any():
        raise ValueError(
            "train_rates contains NaN in bins where train_behavior is defined; predict finite "
            "rates for every bin that has behaviour (or set that behaviour to NaN)."
        )
    if np.isnan(x_eval).any():
        raise ValueError(
            "eval_rates contains NaN in bins where eval_behavior is defined; predict finite "
            "rates for every bin that has behaviour (or set that behaviour to NaN)."
        )
    # NLB divergence: nlb-tools would crash inside sklearn on these.
    for y, name in ((y_train, "train_behavior"), (y_eval, "eval_behavior")):
        if np.isnan(y).any():
            raise ValueError(
                f"{name} has NaN in a column other than 0 on a row whose column 0 is defined; "
                f"NLB drops rows by column 0 only, so mark a missing sample NaN in every column."
            )
    if len(y_eval) == 0:
        raise ValueError("eval_behavior is NaN everywhere (column 0); there is nothing to score.")
    if len(y_train) < n_folds:
        raise ValueError(
            f"train_behavior has {len(y_train)} usable (non-NaN) samples, fewer than "
            f"n_folds={n_folds}; pass more training trials or lower n_folds."
        )
    # NLB: GridSearchCV(Ridge(), {"alpha": logspace(-4, 0, 9)}) with sklearn defaults, i.e.
    # Ridge(fit_intercept=True), cv=5 -> unshuffled KFold over the flattened (trial, bin)
    # rows (so folds are contiguous blocks of trials), scoring=None -> Ridge.score = r2_score
    # with multioutput="uniform_average", refit on all train rows with the best mean-fold
    # score (first alpha on ties), then .score on eval = R^2 averaged uniformly over dims.
    decoder = GridSearchCV(Ridge(), {"alpha": alphas}, cv=n_folds)
    decoder.fit(x_train, y_train)
    return float(decoder.score(x_eval, y_eval))


def velocity_r2(
    train_rates: ArrayLike,
    train_behavior: ArrayLike,
    eval_rates: ArrayLike,
    eval_behavior: ArrayLike,
    alphas: ArrayLike = DEFAULT_ALPHAS,
    n_folds: int = 5,
    *,
    train_decode_mask: ArrayLike | None = None,
    eval_decode_mask: ArrayLike | None = None,
) -> float:
    """Behaviour (e.g. hand velocity) decoding R^2 from rates, NLB's ``"vel R2"``.

    Matches ``nlb_tools.evaluation.velocity_decoding`` + ``fit_and_eval_decoder``: a ridge
    regression (with intercept) from the rates of one bin to the behaviour of the same bin,
    all trials and bins flattened into rows; alpha from ``alphas`` chosen by ``n_folds``-fold
    unshuffled CV on the train rows (sklearn ``GridSearchCV``, R^2 scoring); the refit model
    is scored on the eval rows with R^2 averaged uniformly over behaviour dimensions. Rows
    whose behaviour column 0 is NaN are dropped. NLB's behaviour tensors are already lagged
    (e.g. +100 ms for MC_Maze), so no lag is applied here.

    Args:
        train_rates: ``(n_train_trials, n_bins, n_neurons)`` (or already flat
            ``(n_samples, n_neurons)``) predicted rates, held-in and held-out neurons together.
        train_behavior: ``(n_train_trials, n_bins, n_dims)`` (or ``(n_samples, n_dims)``).
        eval_rates: ``(n_eval_trials, n_bins, n_neurons)`` (or flat), same neurons as train.
        eval_behavior: ``(n_eval_trials, n_bins, n_dims)`` (or flat).
        alphas: ridge penalties to search, default ``np.logspace(-4, 0, 9)`` as NLB.
        n_folds: CV folds, default 5 as NLB (sklearn's default ``cv``).
        train_decode_mask: optional bool ``(n_train_trials, n_masks)``: NLB (Area2_Bump) fits
            a separate decoder per mask column (active / passive trials) and averages the
            R^2s. Default: one decoder on all trials.
        eval_decode_mask: bool ``(n_eval_trials, n_masks)``, required with train_decode_mask.

    Returns:
        R^2 (float), averaged over dims and then over decode masks.
    """
    tr = _as_float(train_rates, "train_rates", (2, 3), "n_trials, n_bins, n_neurons")
    tb = _as_float(train_behavior, "train_behavior", (2, 3), "n_trials, n_bins, n_dims")
    er = _as_float(eval_rates, "eval_rates", (2, 3), "n_trials, n_bins, n_neurons")
    eb = _as_float(eval_behavior, "eval_behavior", (2, 3), "n_trials, n_bins, n_dims")
    for rates, beh, rn, bn in ((tr, tb, "train_rates", "train_behavior"), (er, eb, "eval_rates", "eval_behavior")):
        if rates.shape[:-1] != beh.shape[:-1]:
            raise ValueError(
                f"{rn} has shape {rates.shape} but {bn} has shape {beh.shape}; they must have "
                f"the same trials and bins (all axes but the last)."
            )
    if tr.shape[-1] != er.shape[-1]:
        raise ValueError(
            f"train_rates has {tr.shape[-1]} neurons but eval_rates has {er.shape[-1]}; pass the "
            f"same neurons (held-in + held-out) in the same order for both splits."
        )
    if tb.shape[-1] != eb.shape[-1]:
        raise ValueError(
            f"train_behavior has {tb.shape[-1]} dims but eval_behavior has {eb.shape[-1]}; pass "
            f"the same behaviour variables for both splits."
        )
    alpha_grid = _as_float(alphas, "alphas", (1,), "n_alphas")
    if np.any(~np.isfinite(alpha_grid)) or np.any(alpha_grid < 0):
        raise ValueError(f"alphas must be finite and >= 0, got {alpha_grid}.")
    if not isinstance(n_folds, (int, np.integer)) or isinstance(n_folds, bool) or n_folds < 2:
        raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}.")

    if (train_decode_mask is None) != (eval_decode_mask is None):
        raise ValueError("pass both train_decode_mask and eval_decode_mask, or neither.")
    if train_decode_mask is None:
        # NLB: evaluate() uses a single all-True mask when the target file has none.
        tmask = np.ones((tr.shape[0], 1), dtype=bool)
        emask = np.ones((er.shape[0], 1), dtype=bool)
    else:
        tmask = np.asarray(train_decode_mask)
        emask = np.asarray(eval_decode_mask)
        for m, name, n in ((tmask, "train_decode_mask", tr.shape[0]), (emask, "eval_decode_mask", er.shape[0])):
            if m.dtype != bool or m.ndim != 2 or m.shape[0] != n:
                raise ValueError(
                    f"{name} must be a bool array of shape (n_trials={n}, n_masks), got "
                    f"dtype {m.dtype} and shape {m.shape}."
                )
        if tmask.shape[1] != emask.shape[1] or tmask.shape[1] == 0:
            raise ValueError(
                f"train_decode_mask and eval_decode_mask must have the same, non-zero number of "
                f"mask columns, got {tmask.shape[1]} and {emask.shape[1]}."
            )

    def flat(x: FloatArray) -> FloatArray:
        # NLB: flatten3d = reshape(-1, x.shape[2]) -> rows ordered trial-major, bin-minor.
        return x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x

    r2s = []
    for i in range(tmask.shape[1]):
        if not tmask[:, i].any() or not emask[:, i].any():
            raise ValueError(f"decode mask column {i} selects no train or no eval trials.")
        r2s.append(
            _fit_and_score_ridge(
                flat(tr[tmask[:, i]]), flat(tb[tmask[:, i]]),
                flat(er[emask[:, i]]), flat(eb[emask[:, i]]),
                alpha_grid, int(n_folds),
            )
        )
    # NLB: plain mean of the per-mask R^2s.
    return float(np.mean(r2s))


# --------------------------------------------------------------------------------------------
# PSTH
# --------------------------------------------------------------------------------------------


def _cond_index_list(cond_idx: Any, n_trials: int, name: str) -> list[NDArray[np.intp]]:
    """Validate a per-condition list of trial indices (list of arrays or NLB's object array)."""
    if cond_idx is None:
        raise ValueError(f"{name} is None; pass one array of trial indices per condition.")
    try:
        items = list(cond_idx)
    except TypeError as err:
        raise ValueError(f"{name} must be a sequence with one array of trial indices per condition.") from err
    if len(items) == 0:
        raise ValueError(f"{name} is empty; pass one array of trial indices per condition.")
    out = []
    for c, idx in enumerate(items):
        a = np.asarray(idx).reshape(-1) if np.ndim(idx) <= 1 else None
        if a is None:
            raise ValueError(f"{name}[{c}] must be a 1-D array of trial indices, got shape {np.shape(idx)}.")
        if a.size and not np.issubdtype(a.dtype, np.integer):
            if np.issubdtype(a.dtype, np.floating) and np.all(a == np.round(a)):
                a = a.astype(np.intp)
            else:
                raise ValueError(f"{name}[{c}] must hold integer trial indices, got dtype {a.dtype}.")
        a = a.astype(np.intp)
        if a.size and (a.min() < 0 or a.max() >= n_trials):
            raise ValueError(
                f"{name}[{c}] has trial indices outside [0, {n_trials}); indices refer to the "
                f"trial axis of the rate/spike array."
            )
        out.append(a)
    return out


def _jitter_trials(rates: FloatArray, jitter: NDArray[np.intp]) -> FloatArray:
    """Shift each trial by ``jitter[k]`` bins, filling with NaN (NLB's ``jitter_trial``).

    Positive jitter moves the trial later (NaN rows in front, the last rows fall off),
    negative jitter moves it earlier (NaN rows at the end).
    """
    out = np.full_like(rates, np.nan)
    n_bins = rates.shape[1]
    for k, j in enumerate(jitter):
        if j == 0:
            out[k] = rates[k]
        elif j > 0:
            out[k, j:] = rates[k, : n_bins - j]
        else:
            out[k, : n_bins + j] = rates[k, -j:]
    return out


def psth_r2(
    eval_rates: ArrayLike,
    psth: ArrayLike,
    cond_idx: Sequence[ArrayLike],
    jitter: ArrayLike | None = None,
) -> float:
    """PSTH R^2 of predicted rates (NLB ``"psth R2"``), as ``nlb_tools.evaluation.eval_psth``.

    For each condition ``c``: average the (jittered) predicted rates of the eval trials
    ``cond_idx[c]`` over trials (plain mean), keep the bins where ``psth[c, :, 0]`` is not
    NaN, and stack all conditions' kept bins as rows. The score is
    ``sklearn.metrics.r2_score(true_rows, pred_rows)``: one R^2 per neuron over all
    condition-bins, averaged uniformly over neurons.

    Args:
        eval_rates: ``(n_eval_trials, n_bins, n_neurons)`` predicted counts per bin, held-in
            and held-out neurons together (NLB concatenates them along the last axis).
        psth: ``(n_conditions, n_bins, n_neurons)`` true PSTHs in counts per bin (see
            :func:`make_psth`); NaN bins (padding of short conditions) are skipped.
        cond_idx: ``n_conditions`` integer arrays of indices into the eval trials (NLB's
            ``eval_cond_idx``). Conditions with no eval trial are skipped (NLB behaviour).
        jitter: optional int ``(n_eval_trials,)`` bin shift per trial (NLB ``eval_jitter``,
            used by DMFC_RSG); default no shift.

    Returns:
        R^2 (float).
    """
    from sklearn.metrics import r2_score

    rates = _as_float(eval_rates, "eval_rates", (3,), "n_trials, n_bins, n_neurons")
    true = _as_float(psth, "psth", (3,), "n_conditions, n_bins, n_neurons")
    if true.shape[1:] != rates.shape[1:]:
        raise ValueError(
            f"psth has shape {true.shape} but eval_rates has shape {rates.shape}; the bins and "
            f"neurons (last two axes) must match."
        )
    idx_list = _cond_index_list(cond_idx, rates.shape[0], "cond_idx")
    if len(idx_list) != true.shape[0]:
        # NLB divergence: nlb-tools iterates over cond_idx and silently ignores extra PSTHs.
        raise ValueError(
            f"cond_idx has {len(idx_list)} conditions but psth has {true.shape[0]}; pass one "
            f"index array per PSTH condition, in the same order."
        )
    if jitter is None:
        jit = np.zeros(rates.shape[0], dtype=np.intp)
    else:
        jit_arr = np.asarray(jitter)
        if jit_arr.shape != (rates.shape[0],) or not (
            np.issubdtype(jit_arr.dtype, np.integer)
            or (np.issubdtype(jit_arr.dtype, np.floating) and np.all(jit_arr == np.round(jit_arr)))
        ):
            raise ValueError(
                f"jitter must be integer bin shifts of shape ({rates.shape[0]},), got dtype "
                f"{jit_arr.dtype} and shape {jit_arr.shape}."
            )
        jit = jit_arr.astype(np.intp)
        if np.any(np.abs(jit) > rates.shape[1]):
            raise ValueError(f"jitter has shifts larger than the {rates.shape[1]} bins of a trial.")
    shifted = _jitter_trials(rates, jit) if np.any(jit != 0) else rates

    true_rows, pred_rows = [], []
    for c, idx in enumerate(idx_list):
        if idx.size == 0:
            continue  # NLB: conditions without eval trials are skipped
        pred = np.mean(shifted[idx], axis=0)  # NLB: np.mean, so a NaN in any trial propagates
        # NLB quirk: the valid-bin mask is taken from neuron 0 of the PSTH only.
        keep = ~np.isnan(true[c, :, 0])
        t, p = true[c][keep], pred[keep]
        if np.isnan(p).any():
            raise ValueError(
                f"eval_rates (after jitter) is NaN in bins where psth condition {c} is defined; "
                f"predict finite rates for every bin of every eval trial."
            )
        if np.isnan(t).any():
            raise ValueError(
                f"psth condition {c} has NaN for some neurons in bins where neuron 0 is defined; "
                f"NaN padding must cover all neurons of a bin."
            )
        true_rows.append(t)
        pred_rows.append(p)
    if not true_rows:
        raise ValueError("cond_idx selects no eval trial in any condition; nothing to score.")
    return float(r2_score(np.vstack(true_rows), np.vstack(pred_rows)))


def _gaussian_window(kernel_sd_ms: float) -> FloatArray:
    """NLB's smoothing kernel at 1 ms (``NWBDataset.smooth_spk``).

    ``scipy.signal.windows.gaussian(int(6 * sd), sd, sym=True)`` normalised to sum 1: +-3 SD,
    and NLB quirk: ``int()`` truncation gives an *even* length for integer SDs (420 taps for
    70 ms), so with ``convolve(..., "same")`` the kernel is off-centre by half a ms.
    """
    from scipy.signal import windows

    win_len = int(6 * kernel_sd_ms)
    if not np.isfinite(kernel_sd_ms) or win_len < 1:
        raise ValueError(
            f"kernel_sd_ms={kernel_sd_ms!r} gives an empty kernel (length int(6*sd) = {win_len}); "
            f"pass a standard deviation >= 1/6 ms (NLB uses 40-70 ms)."
        )
    window = windows.gaussian(win_len, kernel_sd_ms, sym=True)
    return window / np.sum(window)


def _smooth_column_with_nans(x: FloatArray, window: FloatArray) -> FloatArray:
    """NLB ``smooth_column(ignore_nans=True)``: smooth each NaN-free run separately."""
    from scipy.signal import convolve

    splits = np.where(np.diff(np.isnan(x)))[0] + 1
    segs = []
    for seg in np.split(x, splits):
        if np.any(np.isnan(seg)):
            segs.append(seg)
        else:
            y = convolve(seg, window, "same")
            y[y < 0] = 0  # NLB: fft convolution can give tiny negatives; rectified (NaN path only)
            segs.append(y)
    return np.concatenate(segs)


def make_psth(
    spikes_1ms: ArrayLike,
    cond_idx: Sequence[ArrayLike],
    bin_width_ms: int,
    kernel_sd_ms: float,
    *,
    margin_ms: int = 0,
) -> FloatArray:
    """Smoothed, trial-averaged PSTHs the way NLB's ``make_tensors._make_psth`` builds them.

    NLB (``make_tensors._make_psth`` -> ``NWBDataset.smooth_spk`` -> ``resample``):

    1. smooth each neuron's 1 ms spike train with a Gaussian kernel of SD ``kernel_sd_ms``
       (``scipy.signal.windows.gaussian(int(6*sd), sd)`` normalised to sum 1, applied with
       ``scipy.signal.convolve(x, w, "same")``, zero-padded ends; NaN runs are left NaN and
       each NaN-free run is smoothed on its own and clipped at 0). NLB's SDs
       (``PARAMS[...]["psth_params"]["kern_sd"]``): MC_Maze 70, DMFC_RSG 70, Area2_Bump 40,
       MC_Maze_Large/Medium/Small 50 ms; MC_RTT has no PSTH;
    2. rebin to ``bin_width_ms`` by *summing* the smoothed values in each bin, so the PSTH is
       in expected counts per bin like the rates (a bin is NaN iff its first ms is NaN,
       other NaNs count as 0, as ``NWBDataset.resample``);
    3. per condition, average the binned trials with NaNs skipped (pandas
       ``groupby(...).mean()`` in NLB).

    NLB smooths the whole continuous session before cutting trials, so the kernel sees spikes
    just outside each trial window. To reproduce that, pass 1 ms windows that extend
    ``margin_ms`` (at least ``int(3 * kernel_sd_ms) + 1``, the kernel's reach) beyond the
    trial on each side; the margins are smoothed and then discarded. With ``margin_ms=0``
    the trial edges are zero-padded instead. The window (after the margin) must start on a
    bin boundary of the session clock, as NLB's bins do. NLB builds the PSTH from *all* trials of a condition that are not ignored
    (train and eval), drops trials shorter than 0.8 x the condition's mean length and pads
    conditions with NaN to a common length; with fixed-length arrays those steps do not arise.

    Args:
        spikes_1ms: ``(n_trials, n_ms, n_neurons)`` spike counts at 1 ms (NaN = no data),
            held-in and held-out neurons together, ``n_ms = n_bins*bin_width_ms + 2*margin_ms``.
        cond_idx: ``n_conditions`` integer arrays of trial indices into ``spikes_1ms``.
        bin_width_ms: output bin width in ms (5 for NLB's main track, 20 for the 20 ms one).
        kernel_sd_ms: Gaussian SD in ms.
        margin_ms: ms to drop at each end after smoothing (default 0).

    Returns:
        ``(n_conditions, n_bins, n_neurons)`` float64 PSTH in counts per bin.
    """
    from scipy.signal import fftconvolve

    s = _as_float(spikes_1ms, "spikes_1ms", (3,), "n_trials, n_ms, n_neurons")
    _check_spikes(s, "spikes_1ms")
    if not isinstance(bin_width_ms, (int, np.integer)) or isinstance(bin_width_ms, bool) or bin_width_ms < 1:
        raise ValueError(f"bin_width_ms must be a positive integer number of ms, got {bin_width_ms!r}.")
    if not isinstance(margin_ms, (int, np.integer)) or isinstance(margin_ms, bool) or margin_ms < 0:
        raise ValueError(f"margin_ms must be a non-negative integer number of ms, got {margin_ms!r}.")
    n_trials, n_ms, n_neurons = s.shape
    n_keep = n_ms - 2 * margin_ms
    if n_keep <= 0 or n_keep % bin_width_ms:
        raise ValueError(
            f"spikes_1ms has {n_ms} ms; after dropping margin_ms={margin_ms} at each end "
            f"{n_keep} ms remain, which must be a positive multiple of bin_width_ms={bin_width_ms}."
        )
    idx_list = _cond_index_list(cond_idx, n_trials, "cond_idx")
    for c, idx in enumerate(idx_list):
        if idx.size == 0:
            raise ValueError(f"cond_idx[{c}] is empty; every PSTH condition needs at least one trial.")
    window = _gaussian_window(float(kernel_sd_ms))

    nan = np.isnan(s)
    # Columns without NaN: one FFT convolution along time for all of them ("same" mode
    # centres exactly like the 1-D scipy.signal.convolve NLB uses; NLB does not rectify these).
    smoothed = fftconvolve(np.nan_to_num(s), window[None, :, None], mode="same", axes=1)
    if nan.any():
        for k, n in zip(*np.nonzero(nan.any(axis=1))):
            smoothed[k, :, n] = _smooth_column_with_nans(s[k, :, n], window)
    smoothed = smoothed[:, margin_ms : n_ms - margin_ms]

    # NLB resample: sum bin_width consecutive ms; NaN iff the bin's first ms is NaN.
    n_bins = n_keep // bin_width_ms
    first_nan = np.isnan(smoothed[:, ::bin_width_ms])
    binned = np.nan_to_num(smoothed).reshape(n_trials, n_bins, bin_width_ms, n_neurons).sum(axis=2)
    binned[first_nan] = np.nan

    out = np.empty((len(idx_list), n_bins, n_neurons))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN bins stay NaN
        for c, idx in enumerate(idx_list):
            out[c] = np.nanmean(binned[idx], axis=0)  # NLB: pandas mean skips NaN
    return out


# --------------------------------------------------------------------------------------------
# all metrics for one dataset
# --------------------------------------------------------------------------------------------


def _concat_neurons(heldin: ArrayLike, heldout: ArrayLike, in_name: str, out_name: str) -> FloatArray:
    a = _as_float(heldin, in_name, (3,), "n_trials, n_bins, n_heldin_neurons")
    b = _as_float(heldout, out_name, (3,), "n_trials, n_bins, n_heldout_neurons")
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(
            f"{in_name} has shape {a.shape} but {out_name} has shape {b.shape}; they must have "
            f"the same trials and bins (first two axes)."
        )
    return np.concatenate([a, b], axis=-1)


def evaluate_nlb(
    *,
    eval_rates_heldin: ArrayLike,
    eval_rates_heldout: ArrayLike,
    eval_spikes_heldout: ArrayLike,
    train_rates_heldin: ArrayLike | None = None,
    train_rates_heldout: ArrayLike | None = None,
    train_behavior: ArrayLike | None = None,
    eval_behavior: ArrayLike | None = None,
    train_decode_mask: ArrayLike | None = None,
    eval_decode_mask: ArrayLike | None = None,
    psth: ArrayLike | None = None,
    eval_cond_idx: Sequence[ArrayLike] | None = None,
    eval_jitter: ArrayLike | None = None,
    eval_rates_heldin_forward: ArrayLike | None = None,
    eval_rates_heldout_forward: ArrayLike | None = None,
    eval_spikes_heldin_forward: ArrayLike | None = None,
    eval_spikes_heldout_forward: ArrayLike | None = None,
    alphas: ArrayLike = DEFAULT_ALPHAS,
    n_folds: int = 5,
) -> dict[str, float]:
    """All NLB metrics of one dataset, keyed like ``nlb_tools.evaluation.evaluate``.

    Argument names are the keys of NLB's submission / eval-target ``.h5`` groups. Returns
    ``{"co-bps", "vel R2", "psth R2", "fp-bps"}`` in that order, each present only when its
    inputs are given (as NLB does per dataset): ``co-bps`` always; ``vel R2`` with
    train/eval rates and behaviour; ``psth R2`` with ``psth`` and ``eval_cond_idx``;
    ``fp-bps`` with all four ``*_forward`` arrays. DMFC_RSG's ``"tp corr"`` (which NLB reports
    instead of ``vel R2`` for that dataset) is not implemented.

    Args:
        eval_rates_heldin: ``(n_eval, n_bins, n_heldin)`` predicted counts per bin.
        eval_rates_heldout: ``(n_eval, n_bins, n_heldout)``.
        eval_spikes_heldout: ``(n_eval, n_bins, n_heldout)`` true counts.
        train_rates_heldin / train_rates_heldout: ``(n_train, n_bins, n_heldin / n_heldout)``.
        train_behavior / eval_behavior: ``(n_train / n_eval, n_bins, n_dims)``.
        train_decode_mask / eval_decode_mask: optional bool ``(n_trials, n_masks)``.
        psth: ``(n_conditions, n_bins, n_heldin + n_heldout)``.
        eval_cond_idx: ``n_conditions`` index arrays into the eval trials.
        eval_jitter: optional int ``(n_eval,)``.
        eval_rates_heldin_forward / eval_rates_heldout_forward /
        eval_spikes_heldin_forward / eval_spikes_heldout_forward:
            ``(n_eval, n_forward_bins, n_heldin / n_heldout)``.
        alphas, n_folds: ridge grid and CV folds for ``vel R2`` (NLB defaults).

    Returns:
        dict of metric name -> float.
    """
    vel_inputs = {
        "train_rates_heldin": train_rates_heldin,
        "train_rates_heldout": train_rates_heldout,
        "train_behavior": train_behavior,
        "eval_behavior": eval_behavior,
    }
    fwd_inputs = {
        "eval_rates_heldin_forward": eval_rates_heldin_forward,
        "eval_rates_heldout_forward": eval_rates_heldout_forward,
        "eval_spikes_heldin_forward": eval_spikes_heldin_forward,
        "eval_spikes_heldout_forward": eval_spikes_heldout_forward,
    }
    # Check that each metric's inputs are complete before computing anything.
    for metric, group in (("vel R2", vel_inputs), ("fp-bps", fwd_inputs)):
        given = [k for k, v in group.items() if v is not None]
        missing = [k for k, v in group.items() if v is None]
        if given and missing:
            raise ValueError(
                f"{metric} needs {', '.join(missing)} as well as {', '.join(given)}; pass all "
                f"{len(group)} or none."
            )
    if (psth is None) != (eval_cond_idx is None):
        raise ValueError("psth R2 needs both psth and eval_cond_idx; pass both or neither.")

    results: dict[str, float] = {}
    # NLB order: co-bps, vel R2, psth R2, fp-bps.
    results["co-bps"] = co_bps(eval_rates_heldout, eval_spikes_heldout)
    eval_rates = _concat_neurons(eval_rates_heldin, eval_rates_heldout, "eval_rates_heldin", "eval_rates_heldout")

    if train_rates_heldin is not None:
        train_rates = _concat_neurons(train_rates_heldin, train_rates_heldout, "train_rates_heldin", "train_rates_heldout")
        results["vel R2"] = velocity_r2(
            train_rates, train_behavior, eval_rates, eval_behavior, alphas, n_folds,
            train_decode_mask=train_decode_mask, eval_decode_mask=eval_decode_mask,
        )

    if psth is not None:
        results["psth R2"] = psth_r2(eval_rates, psth, eval_cond_idx, jitter=eval_jitter)

    if eval_rates_heldin_forward is not None:
        # NLB: np.dstack([heldin, heldout]) of the forward bins, scored together.
        rates_fwd = _concat_neurons(
            eval_rates_heldin_forward, eval_rates_heldout_forward,
            "eval_rates_heldin_forward", "eval_rates_heldout_forward",
        )
        spikes_fwd = _concat_neurons(
            eval_spikes_heldin_forward, eval_spikes_heldout_forward,
            "eval_spikes_heldin_forward", "eval_spikes_heldout_forward",
        )
        results["fp-bps"] = fp_bps(rates_fwd, spikes_fwd)
    return results
