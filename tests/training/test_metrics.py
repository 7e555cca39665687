"""R^2, stitching of overlapping windows, and the Wiener-filter baseline."""

from __future__ import annotations

import numpy as np
import pytest

from poyo_hf.data.schema import SessionRecording, segment_features
from poyo_hf.data.windows import segments_from_arrow
from poyo_hf.training.metrics import Stitcher, mean_r2, r2_score, session_r2
from poyo_hf.training.wiener import WienerFilter, lagged_counts


def test_r2_matches_sklearn_definition():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(50, 2))
    p = y + rng.normal(scale=0.5, size=y.shape)
    per_dim = [1 - ((y[:, d] - p[:, d]) ** 2).sum() / ((y[:, d] - y[:, d].mean()) ** 2).sum() for d in range(2)]
    assert r2_score(y, p) == pytest.approx(np.mean(per_dim))
    assert r2_score(y, y) == 1.0
    assert r2_score(y, np.tile(y.mean(0), (50, 1))) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        r2_score(y, p[:, :1])


def test_stitching_averages_predictions_of_the_same_timestamp():
    st = Stitcher()
    # Two windows of one session, starting at 10.0 and 10.5, outputs every 0.25 s.
    t_rel = np.array([[0.0, 0.25, 0.5, 0.75], [0.0, 0.25, 0.5, 0.75]])
    mask = np.array([[True, True, True, True], [True, True, True, False]])
    pred = np.array([[[1.0], [2.0], [3.0], [4.0]], [[5.0], [6.0], [7.0], [100.0]]])
    target = np.array([[[0.0], [1.0], [2.0], [3.0]], [[2.0], [3.0], [4.0], [9.0]]])
    em = np.ones((2, 4), bool)
    st.add(["s", "s"], np.array([10.0, 10.5]), t_rel, mask, pred, target, em)
    out = st.sessions()["s"]
    np.testing.assert_allclose(out.timestamps, [10.0, 10.25, 10.5, 10.75, 11.0])
    # 10.5 is covered by window 0 (pred 3) and window 1 (pred 5); 10.75 by 4 and 6.
    np.testing.assert_allclose(out.predictions[:, 0], [1.0, 2.0, 4.0, 5.0, 7.0])
    np.testing.assert_array_equal(out.coverage, [1, 1, 2, 2, 1])
    np.testing.assert_allclose(out.targets[:, 0], [0.0, 1.0, 2.0, 3.0, 4.0])
    # The masked-out 100.0 never enters; R^2 is computed on the stitched samples.
    r2 = session_r2({"s": out})
    assert r2["s"] == pytest.approx(r2_score(out.targets, out.predictions))
    assert mean_r2({"a": 0.5, "b": 0.7}) == pytest.approx(0.6)


def _segment(times, units, n_units, bt, values):
    rec = SessionRecording(
        session_id="w",
        unit_ids=[f"w/u{i}" for i in range(n_units)],
        spike_times=times,
        spike_unit_index=units,
        behavior_timestamps=bt,
        behavior_values=values,
        splits={"train": (np.array([0.0]), np.array([bt[-1] + 0.01]))},
    )
    from datasets import Dataset

    table = Dataset.from_list(rec.to_rows(max_segment_s=1e9), features=segment_features(values.shape[1])).with_format("arrow")[:]
    return segments_from_arrow(table)[0]


def test_lagged_counts_exact_on_hand_built_spikes():
    seg = _segment(np.array([0.005, 0.015, 0.025, 0.031]), np.array([0, 1, 0, 0]), 2,
                   np.array([0.0, 0.04, 0.05]), np.zeros((3, 1)))
    X = lagged_counts(seg, np.array([0.04]), bin_size=0.01, n_lags=3)
    # History bins before t=0.04: [0.03,0.04), [0.02,0.03), [0.01,0.02) -> per unit (u0, u1).
    assert X.tolist() == [[1.0, 0.0, 1.0, 0.0, 0.0, 1.0]]


def test_wiener_filter_recovers_a_linear_lagged_code():
    rng = np.random.default_rng(0)
    dur, n_units = 200.0, 20
    bt = np.arange(0.0, dur, 0.01)
    v = np.convolve(rng.normal(size=bt.size), np.ones(50) / 50, mode="same")[:, None] * 20
    # Rates follow velocity 100 ms later (neural activity leads behaviour).
    lead = np.interp(bt + 0.1, bt, v[:, 0])
    rates = np.clip(10 + 8 * np.outer(lead, rng.normal(size=n_units)), 0, None)
    counts = rng.poisson(rates * 0.01)
    unit = np.repeat(np.tile(np.arange(n_units), bt.size), counts.ravel())
    times = np.repeat(np.repeat(bt, n_units), counts.ravel()) + rng.uniform(0, 0.01, unit.size)
    order = np.argsort(times, kind="stable")
    seg = _segment(times[order], unit[order], n_units, bt, v.astype(np.float32))
    wf = WienerFilter(bin_size=0.02, n_lags=10).fit([seg])
    keep = bt > 1.0
    r2 = r2_score(v[keep], wf.predict(seg, bt[keep]))
    assert r2 > 0.6
    with pytest.raises(ValueError, match="before fit"):
        WienerFilter().predict(seg, bt)
