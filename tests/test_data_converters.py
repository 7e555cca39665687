"""Converters: exact values on hand-built inputs (arrays, npz, binned, NWB in the DANDI layout)
and one clear error per kind of bad input."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pytest

from poyo_hf.data.converters import (
    NLB_REACH_WINDOW,
    from_arrays,
    from_binned,
    from_npz,
    from_nwb,
)
from poyo_hf.data.schema import SchemaError

# --------------------------------------------------------------------------- helpers


def _nwb_file(
    path: Path,
    *,
    units: list[tuple[object, list[float], bool]] | None = None,
    unit_names: list[str] | None = None,
    behavior: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    other_modules: dict[str, str] | None = None,
    trials: list[dict] | None = None,
    units_without_spikes: bool = False,
) -> Path:
    """Write an NWB file in the DANDI/NLB layout: units(spike_times, heldout), processing/behavior
    TimeSeries, trials(start_time, stop_time, split, move_onset_time)."""
    from pynwb import NWBHDF5IO, NWBFile, TimeSeries
    from pynwb.file import Subject

    nwb = NWBFile(
        session_description="hand-built test session",
        identifier="test",
        session_start_time=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
        lab="Shenoy",
        institution="Stanford",
    )
    nwb.subject = Subject(subject_id="Jenkins", species="Macaca mulatta")
    if units_without_spikes:
        nwb.add_unit_column("quality", "sorting quality")
        nwb.add_unit(quality=1.0)
    if units is not None:
        nwb.add_unit_column("heldout", "NLB held-out unit")
        if unit_names is not None:
            nwb.add_unit_column("unit_name", "unit name")
        for i, (uid, spikes, held) in enumerate(units):
            extra = {"unit_name": unit_names[i]} if unit_names is not None else {}
            nwb.add_unit(spike_times=spikes, heldout=held, id=uid, **extra)
    if behavior is not None:
        mod = nwb.create_processing_module("behavior", "behaviour")
        for name, (t, v) in behavior.items():
            mod.add(TimeSeries(name=name, data=v, unit="mm/s", timestamps=t))
    for mod_name, ts_name in (other_modules or {}).items():
        mod = nwb.create_processing_module(mod_name, "other")
        mod.add(TimeSeries(name=ts_name, data=np.zeros(3), unit="V", timestamps=np.arange(3.0)))
    if trials:
        for col in trials[0]:
            if col not in ("start_time", "stop_time"):
                nwb.add_trial_column(col, col)
        for tr in trials:
            nwb.add_trial(**tr)
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return path


T_BEH = np.arange(12) * 0.25  # 0 .. 2.75 s
VEL = np.stack([np.arange(12.0), -np.arange(12.0)], axis=1)
VEL[3] = np.nan  # a missing sample
POS = np.cumsum(VEL, axis=0)
TRIALS = [
    {"start_time": 0.0, "stop_time": 1.0, "split": "train", "move_onset_time": 0.5},
    {"start_time": 1.0, "stop_time": 2.0, "split": "val", "move_onset_time": np.nan},
    {"start_time": 2.0, "stop_time": 3.0, "split": "none", "move_onset_time": 2.1},
]


@pytest.fixture
def dandi_nwb(tmp_path: Path) -> Path:
    return _nwb_file(
        tmp_path / "sub-J_ses-1.nwb",
        units=[(7, [0.6, 0.1, 1.5], False), (3, [0.1, 2.2], True)],
        behavior={"hand_vel": (T_BEH, VEL), "hand_pos": (T_BEH, POS)},
        trials=TRIALS,
    )


# --------------------------------------------------------------------------- from_arrays


def test_from_arrays_exact() -> None:
    rec = from_arrays(
        [0.3, 0.1, 0.2, 0.1],
        [5, 2, 5, 5],
        [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]],
        [0.0, 0.25, 0.5],
        session_id="s1",
        subject_id="m1",
        task="center_out_reaching",
    )
    # units: sorted unique ints -> "s1/2", "s1/5"; spikes sorted by time, ties by unit index
    assert rec.unit_ids.tolist() == ["s1/2", "s1/5"]
    np.testing.assert_array_equal(rec.spike_times, [0.1, 0.1, 0.2, 0.3])
    np.testing.assert_array_equal(rec.spike_unit_index, [0, 1, 1, 1])
    assert rec.behavior_values.dtype == np.float32
    np.testing.assert_array_equal(rec.behavior_values, [[1, 2], [3, 4], [5, 6]])
    # default split: [first sample, last behaviour sample + one step)
    np.testing.assert_array_equal(rec.splits["train"][0], [0.0])
    np.testing.assert_array_equal(rec.splits["train"][1], [0.75])
    assert (rec.subject_id, rec.task) == ("m1", "center_out_reaching")


def test_from_arrays_units_list_splits_epochs() -> None:
    rec = from_arrays(
        np.array([0.5, 1.5]),
        np.array(["b", "a"]),
        np.zeros(4),
        [0.0, 0.5, 1.0, 1.5],
        session_id="s",
        units=["c", "b", "a"],  # order kept, silent unit "c" kept
        splits={"train": [(0.0, 1.0)], "val": ([1.0], [2.0])},
        epochs={"reach": ([0.25], [0.75])},
        trials=([0.0, 1.0], [1.0, 2.0]),
    )
    assert rec.unit_ids.tolist() == ["s/c", "s/b", "s/a"]
    np.testing.assert_array_equal(rec.spike_unit_index, [1, 2])
    assert set(rec.splits) == {"train", "valid"}  # 'val' -> 'valid'
    np.testing.assert_array_equal(rec.splits["valid"][0], [1.0])
    np.testing.assert_array_equal(rec.epochs["reach"][1], [0.75])
    assert rec.behavior_dim == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spike_times": [0.1, 0.2], "unit_ids": ["a"]}, "2 entries but unit_ids has 1"),
        ({"spike_times": [0.1, np.nan], "unit_ids": ["a", "a"]}, "NaN"),
        ({"spike_times": [0.1, 0.1], "unit_ids": ["a", "a"]}, "duplicated spike.*'s/a'.*0.1"),
        ({"spike_times": [], "unit_ids": []}, "zero units"),
        ({"units": ["a", "a"]}, "duplicate unit ids"),
        ({"units": ["b"]}, r"unit\(s\) \['a'\] not in the `units` list"),
        ({"behavior": np.zeros(3)}, "behavior has shape \\(3,\\) but there are 2"),
        ({"splits": {"train": ([0.0], [1.0]), "test": ([0.5], [2.0])}}, "overlaps"),
        ({"splits": {"train": ([1.0], [1.0])}}, "zero total duration"),
        ({"splits": {"holdout": ([0.0], [1.0])}}, "split 'holdout' unknown"),
        ({"epochs": {"reaching": ([0.0], [1.0])}}, "epoch label 'reaching' unknown"),
        ({"colour": "red"}, "unknown metadata"),
    ],
)
def test_from_arrays_errors(kwargs: dict, match: str) -> None:
    args = {
        "spike_times": [0.1],
        "unit_ids": ["a"],
        "behavior": np.zeros(2),
        "behavior_timestamps": [0.0, 0.5],
        "session_id": "s",
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match) as info:
        from_arrays(**args)
    assert "'s'" in str(info.value)  # names the session


def test_from_arrays_zero_duration() -> None:
    with pytest.raises(SchemaError, match="zero-duration session"):
        from_arrays([], [], [1.0], [2.0], session_id="s", units=["a"])


# --------------------------------------------------------------------------- from_npz


def test_from_npz_exact(tmp_path: Path) -> None:
    path = tmp_path / "sess_a.npz"
    np.savez(
        path,
        spike_times=np.array([0.9, 0.2, 1.7]),
        spike_units=np.array(["u2", "u1", "u2"]),
        behavior=np.array([[0.5], [1.5], [np.nan], [3.5]]),
        behavior_timestamps=np.array([0.0, 0.5, 1.0, 1.5]),
        trial_start=np.array([0.0, 1.0]),
        trial_end=np.array([1.0, 2.0]),
        split=np.array(["train", "val"]),
    )
    rec = from_npz(path, subject_id="rat1")
    assert rec.session_id == "sess_a"
    assert rec.unit_ids.tolist() == ["sess_a/u1", "sess_a/u2"]
    np.testing.assert_array_equal(rec.spike_times, [0.2, 0.9, 1.7])
    np.testing.assert_array_equal(rec.spike_unit_index, [0, 1, 1])
    assert np.isnan(rec.behavior_values[2, 0])  # NaN behaviour kept (= missing)
    assert {k: (v[0].tolist(), v[1].tolist()) for k, v in rec.splits.items()} == {
        "train": ([0.0], [1.0]),
        "valid": ([1.0], [2.0]),
    }
    np.testing.assert_array_equal(rec.trials[1], [1.0, 2.0])
    assert rec.subject_id == "rat1" and "sess_a.npz" in rec.source


def test_from_npz_trial_overlap_cut_at_next_split(tmp_path: Path) -> None:
    """A train trial running into a val trial is cut where the val trial starts (no leak)."""
    path = tmp_path / "overlap.npz"
    np.savez(path, spike_times=np.array([0.5]), unit_ids=np.array([3]),
             behavior=np.zeros(4), behavior_timestamps=np.arange(4) * 0.5,
             trial_start=np.array([1.0, 0.0]), trial_end=np.array([2.0, 1.25]),
             split=np.array(["val", "train"]))
    rec = from_npz(path)
    assert {k: (v[0].tolist(), v[1].tolist()) for k, v in rec.splits.items()} == {
        "train": ([0.0], [1.0]),
        "valid": ([1.0], [2.0]),
    }
    np.testing.assert_array_equal(rec.trials[1], [2.0, 1.25])  # the trials themselves unchanged


def test_from_npz_refuses_pickle_and_names_missing_keys(tmp_path: Path) -> None:
    bad = tmp_path / "objects.npz"
    np.savez(bad, spike_times=np.array([0.1]), spike_units=np.array(["a", 1], dtype=object),
             behavior=np.zeros(2), behavior_timestamps=np.arange(2.0))
    with pytest.raises(ValueError, match="unpickling") as info:
        from_npz(bad)
    assert "objects.npz" in str(info.value)
    missing = tmp_path / "missing.npz"
    np.savez(missing, spike_times=np.array([0.1]), behavior=np.zeros(2),
             behavior_timestamps=np.arange(2.0))
    with pytest.raises(SchemaError, match="missing.npz: missing key 'spike_units'"):
        from_npz(missing)


# --------------------------------------------------------------------------- from_binned

COUNTS = np.array([[1, 0], [2, 1], [0, 4]])  # (T=3 bins, N=2 units)


def test_from_binned_center_exact() -> None:
    # bins of 0.25 s from t0 = 1.0: all times are exact binary fractions
    rec = from_binned(COUNTS, 0.25, t0=1.0, placement="center", session_id="b",
                      behavior=[[1.0], [2.0], [3.0]])
    assert rec.unit_ids.tolist() == ["b/0", "b/1"]
    expected = [
        (1.125, 0),  # bin 0: one spike of unit 0 at the centre
        (1.3125, 0), (1.375, 1), (1.4375, 0),  # bin 1: two of unit 0 at 1/4, 3/4; one of unit 1
        (1.53125, 1), (1.59375, 1), (1.65625, 1), (1.71875, 1),  # bin 2: four of unit 1
    ]
    np.testing.assert_array_equal(rec.spike_times, [t for t, _ in expected])
    np.testing.assert_array_equal(rec.spike_unit_index, [u for _, u in expected])
    np.testing.assert_array_equal(rec.behavior_timestamps, [1.0, 1.25, 1.5])  # bin starts
    np.testing.assert_array_equal(rec.splits["train"][1], [1.75])


def test_from_binned_uniform_seeded_invariants() -> None:
    rng = np.random.default_rng(3)
    counts = rng.poisson(2.0, size=(50, 4))
    a = from_binned(counts, 0.01, t0=5.0, placement="uniform", seed=7)
    b = from_binned(counts, 0.01, t0=5.0, placement="uniform", seed=7)
    c = from_binned(counts, 0.01, t0=5.0, placement="uniform", seed=8)
    np.testing.assert_array_equal(a.spike_times, b.spike_times)
    np.testing.assert_array_equal(a.spike_unit_index, b.spike_unit_index)
    assert not np.array_equal(a.spike_times, c.spike_times)
    assert a.spike_times.size == counts.sum()
    # re-binning with the same edges gives the counts back exactly
    edges = 5.0 + np.arange(51) * 0.01
    for rec in (a, c):
        bins = np.searchsorted(edges, rec.spike_times, side="right") - 1
        back = np.zeros_like(counts)
        np.add.at(back, (bins, rec.spike_unit_index), 1)
        np.testing.assert_array_equal(back, counts)
    assert np.all(np.diff(a.spike_times) >= 0)


def test_from_binned_matches_from_arrays() -> None:
    """The same spikes through from_arrays and from_binned give the same recording."""
    times = [1.125, 1.3125, 1.375, 1.4375, 1.53125, 1.59375, 1.65625, 1.71875]
    units = ["n0", "n0", "n1", "n0", "n1", "n1", "n1", "n1"]
    beh = [[1.0], [2.0], [3.0]]
    from_ev = from_arrays(times[::-1], units[::-1], beh, [1.0, 1.25, 1.5], session_id="x",
                          splits={"train": ([1.0], [1.75])})
    from_bin = from_binned(COUNTS, 0.25, t0=1.0, unit_ids=["n0", "n1"], placement="center",
                           session_id="x", behavior=beh)
    for field in ("unit_ids", "spike_times", "spike_unit_index", "behavior_timestamps",
                  "behavior_values"):
        np.testing.assert_array_equal(getattr(from_ev, field), getattr(from_bin, field))
    # uniform placement: same spike count per unit and per bin
    uni = from_binned(COUNTS, 0.25, t0=1.0, unit_ids=["n0", "n1"], session_id="x", behavior=beh)
    np.testing.assert_array_equal(np.bincount(uni.spike_unit_index), [3, 5])
    per_bin = np.zeros((3, 2), int)
    np.add.at(per_bin, (np.floor((uni.spike_times - 1.0) / 0.25).astype(int), uni.spike_unit_index), 1)
    np.testing.assert_array_equal(per_bin, COUNTS)


@pytest.mark.parametrize(
    "counts, width, kwargs, match",
    [
        (COUNTS, 0.0, {}, "bin_width must be a finite number > 0 seconds, got 0.0"),
        (COUNTS, -0.01, {}, "got -0.01"),
        (COUNTS, float("nan"), {}, "got nan"),
        (np.array([[1, -2]]), 0.01, {}, r"counts\[0, 1\] = -2"),
        (np.array([[1.0, 0.5]]), 0.01, {}, r"must be integers; counts\[0, 1\] = 0.5"),
        (np.array([1, 2]), 0.01, {}, "2-D"),
        (np.zeros((0, 3), int), 0.01, {}, "zero bins"),
        (np.zeros((3, 0), int), 0.01, {}, "zero units"),
        (COUNTS, 0.01, {"unit_ids": ["a"]}, "1 unit_ids for 2 count columns"),
        (COUNTS, 0.01, {"behavior": np.zeros(2)}, "behavior has shape"),
        (COUNTS, 0.01, {"placement": "left"}, "placement must be"),
    ],
)
def test_from_binned_errors(counts, width, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        from_binned(counts, width, session_id="bad", **kwargs)


def test_from_binned_integral_floats_ok() -> None:
    rec = from_binned(COUNTS.astype(np.float32), 0.25, placement="center")
    assert rec.spike_times.size == COUNTS.sum()
    assert np.all(np.isnan(rec.behavior_values))  # no behaviour given: all missing


# --------------------------------------------------------------------------- from_nwb


def test_from_nwb_dandi_layout_exact(dandi_nwb: Path) -> None:
    rec = from_nwb(dandi_nwb, session_id="s")
    assert rec.unit_ids.tolist() == ["s/7", "s/3"]
    # per-unit unsorted times are sorted, then merged; ties by unit row
    np.testing.assert_array_equal(rec.spike_times, [0.1, 0.1, 0.6, 1.5, 2.2])
    np.testing.assert_array_equal(rec.spike_unit_index, [0, 1, 0, 0, 1])
    np.testing.assert_array_equal(rec.behavior_timestamps, T_BEH)
    np.testing.assert_array_equal(rec.behavior_values, VEL.astype(np.float32))  # NaN row kept
    np.testing.assert_array_equal(rec.position_values, POS.astype(np.float32))
    assert rec.behavior_name == "hand_vel"
    # splits: train trial, 'val' -> valid, 'none' trial left out
    assert {k: (v[0].tolist(), v[1].tolist()) for k, v in rec.splits.items()} == {
        "train": ([0.0], [1.0]),
        "valid": ([1.0], [2.0]),
    }
    np.testing.assert_array_equal(rec.trials[0], [0.0, 1.0, 2.0])
    # epochs: reach = move onset + NLB window, clipped to the trial; hold = start .. reach
    lo, hi = NLB_REACH_WINDOW
    np.testing.assert_array_equal(rec.epochs["reach"][0], [0.5 + lo, 2.0])
    np.testing.assert_array_equal(rec.epochs["reach"][1], [0.5 + hi, 2.1 + hi])
    np.testing.assert_array_equal(rec.epochs["hold"][0], [0.0])
    np.testing.assert_array_equal(rec.epochs["hold"][1], [0.5 + lo])
    assert (rec.subject_id, rec.species, rec.lab) == ("Jenkins", "macaca_mulatta", "shenoy")
    assert "hand-built test session" in rec.source
    assert "1 behaviour samples NaN" in rec.source and "1 trials without" in rec.source


def test_from_nwb_heldout_and_overrides(dandi_nwb: Path) -> None:
    rec = from_nwb(dandi_nwb, session_id="s", include_heldout=False, task="maze",
                   brain_region="M1", position=None)
    assert rec.unit_ids.tolist() == ["s/7"]
    np.testing.assert_array_equal(rec.spike_times, [0.1, 0.6, 1.5])
    assert (rec.task, rec.brain_region, rec.position_values) == ("maze", "M1", None)
    assert from_nwb(dandi_nwb).session_id == "sub-J_ses-1"  # default: file stem


def test_from_nwb_velocity_from_position(tmp_path: Path) -> None:
    t = np.array([0.0, 0.5, 1.0, 2.0])
    pos = np.array([[0.0], [1.0], [4.0], [6.0]])
    path = _nwb_file(tmp_path / "p.nwb", units=[(0, [0.2], False)],
                     behavior={"hand_pos": (t, pos)})
    rec = from_nwb(path)
    np.testing.assert_allclose(rec.behavior_values[:, 0], np.gradient(pos[:, 0], t))
    np.testing.assert_array_equal(rec.position_values, pos.astype(np.float32))
    assert "derived as np.gradient(hand_pos" in rec.source
    assert "whole session is train" in rec.source
    np.testing.assert_array_equal(rec.splits["train"][1], [2.5])  # last sample + median step (0.5)


def test_from_nwb_unit_names_and_duplicates(tmp_path: Path) -> None:
    t = np.arange(4) * 0.5
    ok = _nwb_file(tmp_path / "n.nwb", units=[(0, [0.1], False), (1, [0.2], False)],
                   unit_names=["elec1a", "elec2a"], behavior={"hand_vel": (t, np.zeros((4, 2)))})
    assert from_nwb(ok, session_id="s").unit_ids.tolist() == ["s/elec1a", "s/elec2a"]
    dup = _nwb_file(tmp_path / "d.nwb", units=[(0, [0.1], False), (1, [0.2], False)],
                    unit_names=["e1", "e1"], behavior={"hand_vel": (t, np.zeros((4, 2)))})
    with pytest.raises(SchemaError, match=r"d.nwb.*duplicate unit ids \['s/e1'\]"):
        from_nwb(dup, session_id="s")


def _bad_nwb(tmp_path: Path, kind: str) -> Path:
    beh = {"hand_vel": (T_BEH, VEL)}
    units = [(1, [0.1, 0.2], False)]
    if kind == "no_units":
        return _nwb_file(tmp_path / "no_units.nwb", behavior=beh)
    if kind == "no_spike_times":
        return _nwb_file(tmp_path / "nospk.nwb", units_without_spikes=True, behavior=beh)
    if kind == "no_behavior":
        return _nwb_file(tmp_path / "nobeh.nwb", units=units, other_modules={"ecephys": "lfp"})
    if kind == "wrong_behavior":
        return _nwb_file(tmp_path / "cursor.nwb", units=units,
                         behavior={"cursor_pos": (T_BEH, VEL)})
    if kind == "nan_spike":
        return _nwb_file(tmp_path / "nan.nwb", units=[(1, [0.1, np.nan], False)], behavior=beh)
    if kind == "dup_spike":
        return _nwb_file(tmp_path / "dup.nwb", units=[(4, [0.3, 0.1, 0.3], False)], behavior=beh)
    if kind == "zero_duration":
        return _nwb_file(tmp_path / "zero.nwb", units=[(1, [], False)],
                         behavior={"hand_vel": (np.array([1.0]), np.zeros((1, 2)))})
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, match",
    [
        ("no_units", "no units table"),
        ("no_spike_times", r"no 'spike_times' column \(columns: \['quality'\]\)"),
        ("no_behavior", r"no behaviour under processing/behavior.*'ecephys': \['lfp'\]"),
        ("wrong_behavior", r"'hand_vel' not found.*available: \['cursor_pos'\]"),
        ("nan_spike", "NaN/inf.*unit 's/1'"),
        ("dup_spike", "duplicated spike.*unit 's/4' at t=0.3"),
        ("zero_duration", "zero-duration session"),
    ],
)
def test_from_nwb_errors_name_file_and_field(tmp_path: Path, kind: str, match: str) -> None:
    path = _bad_nwb(tmp_path, kind)
    with pytest.raises(ValueError, match=match) as info:
        from_nwb(path, session_id="s")
    assert str(path) in str(info.value)


def test_from_nwb_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.nwb"):
        from_nwb(tmp_path / "nope.nwb")
    junk = tmp_path / "junk.nwb"
    junk.write_text("not hdf5")
    with pytest.raises(ValueError, match="junk.nwb: cannot"):
        from_nwb(junk)
