"""Windows, unit dropout, the Arrow collator and the resumable stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset

from poyo_hf import PoyoProcessor
from poyo_hf.data.schema import SessionRecording, segment_features
from poyo_hf.data.stream import PoyoWindowStream
from poyo_hf.data.windows import (
    PoyoWindowCollator,
    UnitDropout,
    eval_windows,
    segments_from_arrow,
    training_windows,
    triangular_unit_count,
)


def recording(session: str = "s", duration: float = 6.0, n_units: int = 5, seed: int = 0) -> SessionRecording:
    rng = np.random.default_rng(seed)
    n = int(40 * duration)
    times = np.sort(rng.uniform(0, duration, n))
    bt = np.arange(0.005, duration, 0.01)
    values = np.stack([np.sin(bt), np.cos(bt)], 1)
    values[10] = np.nan
    return SessionRecording(
        session_id=session,
        unit_ids=[f"{session}/u{i}" for i in range(n_units)],
        spike_times=times,
        spike_unit_index=rng.integers(0, n_units, n),
        behavior_timestamps=bt,
        behavior_values=values,
        splits={"train": (np.array([0.0]), np.array([duration]))},
        epochs={"reach": (np.array([1.0]), np.array([2.0])), "hold": (np.array([2.0]), np.array([3.0]))},
    )


def segments(recs, max_segment_s: float = 60.0):
    rows = [r for rec in recs for r in rec.to_rows(max_segment_s)]
    table = Dataset.from_list(rows, features=segment_features(2)).with_format("arrow")[:]
    return segments_from_arrow(table)


def processor_for(recs) -> PoyoProcessor:
    p = PoyoProcessor(sequence_length=1.0)
    for rec in recs:
        p.add_session(rec.session_id, list(rec.unit_ids))
    return p


def test_collator_equals_the_processor_on_the_same_windows():
    recs = [recording("a", seed=1), recording("b", seed=2, n_units=3)]
    segs = segments(recs)
    proc = processor_for(recs)
    windows = [(segs[0], 0.25), (segs[1], 2.5), (segs[0], 4.999)]
    batch = PoyoWindowCollator(proc)(windows)
    expected = []
    for seg, t0 in windows:
        sel = (seg.spike_times >= t0) & (seg.spike_times < t0 + 1)
        bsel = (seg.behavior_timestamps >= t0) & (seg.behavior_timestamps < t0 + 1)
        expected.append(
            {
                "session_id": seg.session_id,
                "unit_ids": seg.unit_ids,
                "spike_times": seg.spike_times[sel] - t0,
                "spike_unit_index": seg.spike_unit_index[sel],
                "output_timestamps": seg.behavior_timestamps[bsel] - t0,
                "targets": seg.behavior_values[bsel],
            }
        )
    ref = proc(expected)
    for key in ("input_unit_index", "input_token_type", "input_mask", "session_index", "output_mask"):
        assert torch.equal(batch[key], ref[key]), key
    torch.testing.assert_close(batch["input_timestamps"], ref["input_timestamps"], atol=1e-6, rtol=0)
    torch.testing.assert_close(batch["output_timestamps"], ref["output_timestamps"], atol=1e-6, rtol=0)
    assert torch.equal(torch.isnan(batch["labels"]), torch.isnan(ref["labels"]))
    torch.testing.assert_close(torch.nan_to_num(batch["labels"]), torch.nan_to_num(ref["labels"]))
    assert batch["window_start"].dtype == torch.float64 and batch["window_start"].tolist() == [0.25, 2.5, 4.999]


def test_epoch_weights_eval_mask_and_nan_behaviour():
    seg = segments([recording()])[0]
    t = seg.behavior_timestamps
    assert np.all(seg.weights[(t >= 1) & (t < 2)] == 5.0)
    assert np.allclose(seg.weights[(t >= 2) & (t < 3)], 0.1)
    assert seg.weights[10] == 0.0 and not seg.eval_mask[10]  # NaN sample: never in the loss
    assert np.array_equal(seg.eval_mask, (t >= 1) & (t < 2))  # only the reach epoch is scored


def test_training_windows_random_offset_and_coverage():
    seg = segments([recording(duration=10.0)])[0]
    a = training_windows(seg, 1.0, np.random.default_rng(0))
    b = training_windows(seg, 1.0, np.random.default_rng(0))
    c = training_windows(seg, 1.0, np.random.default_rng(1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    for starts in (a, c):
        assert starts.min() >= seg.start and starts.max() + 1.0 <= seg.end + 1e-9
        assert len(starts) >= 9
        assert np.sum(np.diff(starts) < 1.0 - 1e-9) <= 1  # tiled, one flush extra at most


def test_eval_windows_half_second_tiling_covers_the_segment():
    seg = segments([recording(duration=3.2)])[0]
    starts = eval_windows(seg, 1.0, 0.5)
    np.testing.assert_allclose(starts, [0.0, 0.5, 1.0, 1.5, 2.0, 2.2])
    short = segments([recording(duration=0.6)])[0]
    assert eval_windows(short, 1.0).tolist() == [0.0]


def test_unit_dropout_is_seeded_and_keeps_only_kept_units_spikes():
    recs = [recording(n_units=40, duration=3.0)]
    seg = segments(recs)[0]
    proc = processor_for(recs)
    drop = UnitDropout(min_units=5, mode_units=10, max_units=30)
    a = PoyoWindowCollator(proc, unit_dropout=drop, seed=3)([(seg, 0.5)])
    b = PoyoWindowCollator(proc, unit_dropout=drop, seed=3)([(seg, 0.5)])
    assert torch.equal(a["input_unit_index"], b["input_unit_index"])
    m = a["input_mask"][0]
    types = a["input_token_type"][0][m]
    kept = set(a["input_unit_index"][0][m][types == 1].tolist())
    spikes = set(a["input_unit_index"][0][m][types == 0].tolist())
    assert 5 <= len(kept) <= 30 and spikes <= kept
    # Exactly the kept units' spikes survive.
    t0 = 0.5
    rows = proc.unit_rows(seg.unit_ids)
    sel = (seg.spike_times >= t0) & (seg.spike_times < t0 + 1) & np.isin(rows[seg.spike_unit_index], list(kept))
    assert int((types == 0).sum()) == int(sel.sum())


def test_triangular_unit_count_follows_the_reference_density():
    rng = np.random.default_rng(0)
    draws = np.array([triangular_unit_count(1000, rng, 30, 100, 300, 4.0) for _ in range(20000)])
    assert draws.min() >= 30 and draws.max() <= 300
    hist, edges = np.histogram(draws, bins=[30, 60, 90, 110, 150, 250, 300])
    density = hist / np.diff(edges)
    assert density[2] == density.max()  # peak around the mode (100)
    # Density ratio mode / ends ~ peak (4): compare the 90-110 bin with the 250-300 tail.
    assert 2.5 < density[2] / density[5] < 5.0
    assert triangular_unit_count(20, rng, 30, 100, 300, 4.0) == 20  # fewer than min: keep all


def test_stream_resume_gives_identical_batches():
    recs = [recording("a", duration=8.0, n_units=8, seed=1), recording("b", duration=8.0, n_units=6, seed=2)]
    segs = segments(recs, max_segment_s=3.0)
    proc = processor_for(recs)
    drop = UnitDropout(min_units=2, mode_units=4, max_units=8)
    full = list(PoyoWindowStream(segs, proc, batch_size=3, unit_dropout=drop, shuffle_buffer=4, seed=7))
    stream = PoyoWindowStream(segs, proc, batch_size=3, unit_dropout=drop, shuffle_buffer=4, seed=7)
    it = iter(stream)
    next(it)
    next(it)
    state = stream.state_dict()
    resumed = PoyoWindowStream(segs, proc, batch_size=3, unit_dropout=drop, shuffle_buffer=4, seed=7)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 2
    for x, y in zip(rest, full[2:]):
        assert all(torch.equal(torch.nan_to_num(x[k]), torch.nan_to_num(y[k])) for k in x)
    # A new epoch draws new offsets.
    second = list(stream.epochs(2))[-len(full):]
    assert not torch.equal(second[0]["window_start"], full[0]["window_start"])


def test_eval_stream_is_deterministic_and_covers_every_window():
    recs = [recording("a", duration=4.0)]
    segs = segments(recs)
    proc = processor_for(recs)
    batches = list(PoyoWindowStream(segs, proc, batch_size=4, train=False))
    starts = torch.cat([b["window_start"] for b in batches]).tolist()
    assert starts == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert "eval_mask" in batches[0]


def test_stream_rejects_bad_settings():
    proc = PoyoProcessor(sequence_length=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        PoyoWindowStream([], proc, batch_size=0)
    with pytest.raises(ValueError, match="min_units"):
        UnitDropout(min_units=10, mode_units=5, max_units=20)
