"""NDT processor: exact counts on hand-built spikes, padding, segments, arrays and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from make_ndt_fixture import HELDIN, HELDOUT, tiny_ndt_config
from transformers import AutoFeatureExtractor, AutoProcessor

from poyo_hf.data.windows import Segment
from poyo_hf.models.ndt import NdtConfig, NdtProcessor
from poyo_hf.models.ndt_registration import register_ndt_auto_classes

register_ndt_auto_classes()


@pytest.fixture
def proc() -> NdtProcessor:
    # 5 held-in (u0..u4) + 3 held-out (h0..h2) units, 10 ms bins, 12 observed + 4 forward bins.
    return NdtProcessor.from_config(tiny_ndt_config(), HELDIN, HELDOUT)


def test_exact_counts_for_hand_built_spike_times(proc):
    trial = {
        # bin edges every 10 ms; 0.01 and 0.03 sit exactly on edges and go to the later bin
        "spike_times": [0.0, 0.004, 0.0099, 0.01, 0.03, 0.0299, 0.05, 0.0595, 0.06, 0.065, 0.075, 0.0999],
        "spike_unit_ids": ["u0", "u0", "u1", "u1", "u4", "u4", "h2", "h0", "u2", "u3", "h1", "u0"],
        "duration": 0.06,  # 6 observed bins; forward window [0.06, 0.10) = 4 bins
    }
    batch = proc(trial)
    spikes = np.zeros((10, 5))
    spikes[0, 0] = 2  # 0.0, 0.004
    spikes[0, 1] = 1  # 0.0099
    spikes[1, 1] = 1  # 0.01 (edge -> bin 1)
    spikes[2, 4] = 1  # 0.0299
    spikes[3, 4] = 1  # 0.03 (edge -> bin 3)
    heldout = np.zeros((10, 3))
    heldout[5, 2] = 1  # h2 at 0.05
    heldout[5, 0] = 1  # h0 at 0.0595
    forward = np.zeros((4, 8))
    forward[0, 2] = 1  # u2 at 0.06 (first forward bin)
    forward[0, 3] = 1  # u3 at 0.065
    forward[1, 5 + 1] = 1  # h1 at 0.075
    forward[3, 0] = 1  # u0 at 0.0999
    assert batch["spikes"].shape == (1, 10, 5) and batch["spikes"].dtype == torch.float32
    np.testing.assert_array_equal(batch["spikes"][0].numpy(), spikes)  # forward bins are zero input
    np.testing.assert_array_equal(batch["heldout_spikes"][0].numpy(), heldout)
    np.testing.assert_array_equal(batch["forward_spikes"][0].numpy(), forward)
    assert batch["attention_mask"].tolist() == [[1] * 10]
    # Targets off: held-in input only; spikes in the forward window are then simply not used.
    plain = proc(trial, return_targets=False)
    assert set(plain.keys()) == {"spikes", "attention_mask"}
    assert torch.equal(plain["spikes"], batch["spikes"])


def test_unit_index_forms_agree(proc):
    by_ids = {"spike_times": [0.001, 0.015, 0.025], "spike_unit_ids": ["u3", "h1", "u3"], "duration": 0.03}
    by_table = {"spike_times": [0.001, 0.015, 0.025], "spike_unit_index": [1, 0, 1], "unit_ids": ["h1", "u3"],
                "duration": 0.03}
    by_column = {"spike_times": [0.001, 0.015, 0.025], "spike_unit_index": [3, 6, 3], "duration": 0.03}
    a, b, c = proc(by_ids), proc(by_table), proc(by_column)
    for key in ("spikes", "heldout_spikes", "forward_spikes", "attention_mask"):
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key])
    assert a["spikes"][0, :, 3].tolist()[:3] == [1.0, 0.0, 1.0]
    assert a["heldout_spikes"][0, 1, 1].item() == 1.0


def test_padding_of_trials_of_different_lengths(proc):
    rng = np.random.default_rng(0)
    trials = [
        {"spikes": rng.poisson(1.0, (12, 5)), "heldout_spikes": rng.poisson(1.0, (12, 3)),
         "forward_spikes": rng.poisson(1.0, (4, 8))},
        {"spikes": rng.poisson(1.0, (7, 5)), "heldout_spikes": rng.poisson(1.0, (7, 3)),
         "forward_spikes": rng.poisson(1.0, (4, 8))},
    ]
    batch = proc(trials)
    assert batch["spikes"].shape == (2, 16, 5)
    assert batch["attention_mask"].tolist() == [[1] * 16, [1] * 11 + [0] * 5]
    np.testing.assert_array_equal(batch["spikes"][1, :7].numpy(), trials[1]["spikes"])
    assert (batch["spikes"][1, 7:] == 0).all() and (batch["spikes"][0, 12:] == 0).all()
    np.testing.assert_array_equal(batch["heldout_spikes"][1, :7].numpy(), trials[1]["heldout_spikes"])
    assert (batch["heldout_spikes"][1, 7:] == 0).all()
    np.testing.assert_array_equal(batch["forward_spikes"].numpy(), np.stack([t["forward_spikes"] for t in trials]))


def test_arrays_in_every_form(proc):
    rng = np.random.default_rng(1)
    counts = rng.poisson(2.0, (3, 12, 5))
    from_3d = proc(counts)
    from_list = proc(list(counts))
    from_tensor = proc(torch.from_numpy(counts))
    one = proc(counts[0])
    assert from_3d["spikes"].shape == (3, 16, 5) and set(from_3d.keys()) == {"spikes", "attention_mask"}
    assert torch.equal(from_3d["spikes"], from_list["spikes"]) and torch.equal(from_3d["spikes"], from_tensor["spikes"])
    assert torch.equal(one["spikes"][0], from_3d["spikes"][0])
    # Float counts that are whole numbers are fine.
    assert torch.equal(proc(counts[0].astype(np.float64))["spikes"], one["spikes"])


def test_bin_segment_from_a_data_segment(proc):
    units = ["h1", "u0", "u1", "u2", "u3", "u4", "h0", "h2", "extra"]
    times = np.array([10.0, 10.005, 10.012, 10.05, 10.119, 10.12, 10.13, 10.159, 10.16, 10.2])
    index = np.array([1, 1, 0, 5, 2, 3, 8, 7, 1, 1], dtype=np.int32)
    seg = Segment(
        session_id="s", split="train", start=9.0, end=11.0, unit_ids=units, spike_times=times,
        spike_unit_index=index, behavior_timestamps=np.zeros(0), behavior_values=np.zeros((0, 2), np.float32),
        weights=np.zeros(0, np.float32), eval_mask=np.zeros(0, bool),
    )
    with pytest.raises(ValueError, match="ignore_unknown_units"):
        proc.bin_segment(seg, 10.0, 10.12)
    trial = proc.bin_segment(seg, 10.0, 10.12, ignore_unknown_units=True)
    assert trial["spikes"].shape == (12, 5) and trial["heldout_spikes"].shape == (12, 3)
    assert trial["forward_spikes"].shape == (4, 8)
    expected = np.zeros((12, 5))
    expected[0, 0] = 2  # u0 at 10.0, 10.005
    expected[5, 4] = 1  # u4 at 10.05
    expected[11, 1] = 1  # u1 at 10.119
    np.testing.assert_array_equal(trial["spikes"], expected)
    assert trial["heldout_spikes"][1, 1] == 1 and trial["heldout_spikes"].sum() == 1  # h1 at 10.012
    fwd = np.zeros((4, 8))
    fwd[0, 2] = 1  # u2 at 10.12 (first forward bin)
    fwd[3, 5 + 2] = 1  # h2 at 10.159; u0 at 10.16 lies beyond the forward window
    np.testing.assert_array_equal(trial["forward_spikes"], fwd)
    batch = proc([trial])
    assert batch["spikes"].shape == (1, 16, 5)
    with pytest.raises(ValueError, match="not a whole number"):
        proc.bin_segment(seg, 10.0, 10.115, ignore_unknown_units=True)
    missing = Segment(**{**seg.__dict__, "unit_ids": units[1:], "spike_unit_index": np.zeros(10, np.int32)})
    with pytest.raises(ValueError, match="not in the segment"):
        proc.bin_segment(missing, 10.0, 10.12)


@pytest.mark.parametrize(
    "trial, error, fragment",
    [
        ({"spikes": -np.ones((4, 5))}, ValueError, "negative count"),
        ({"spikes": np.full((4, 5), 0.5)}, ValueError, "non-integer count"),
        ({"spikes": np.full((4, 5), np.nan)}, ValueError, "NaN"),
        ({"spikes": np.ones((4, 7))}, ValueError, "7 neurons.*more than the 5 held-in"),
        ({"spikes": np.ones((13, 5))}, ValueError, "num_bins=12"),
        ({"spikes": np.ones((4, 5)), "heldout_spikes": np.ones((4, 2))}, ValueError, "heldout_spikes has shape"),
        ({"spikes": np.ones((4, 5)), "forward_spikes": np.ones((4, 5))}, ValueError, "forward_spikes has shape"),
        ({"spikes": np.array([["a"] * 5])}, TypeError, "numeric"),
        ({"spike_times": [0.01], "spike_unit_ids": ["u0"], "duration": 0.025}, ValueError, "not a whole number"),
        ({"spike_times": [0.5], "spike_unit_ids": ["u0"], "duration": 0.05}, ValueError, "must lie in"),
        ({"spike_times": [0.01], "spike_unit_ids": ["zz"], "duration": 0.05}, ValueError, "'zz'"),
        ({"spike_times": [0.01], "spike_unit_index": [8], "duration": 0.05}, ValueError, r"\[0, 8\)"),
        ({"spike_times": [0.01, 0.02], "spike_unit_ids": ["u0"], "duration": 0.05}, ValueError, "one per spike"),
        ({"foo": 1}, ValueError, "give 'spikes'"),
        ("nope", TypeError, "expects"),
    ],
)
def test_bad_input_errors_name_the_value_and_the_fix(proc, trial, error, fragment):
    with pytest.raises(error, match=fragment):
        proc(trial)


def test_mixed_targets_and_construction_errors(proc):
    with pytest.raises(ValueError, match="every trial has heldout_spikes"):
        proc([{"spikes": np.ones((4, 5)), "heldout_spikes": np.ones((4, 3))}, {"spikes": np.ones((4, 5))}])
    with pytest.raises(ValueError, match="bin_size"):
        NdtProcessor(bin_size=0.0, num_neurons=3)
    with pytest.raises(ValueError, match="num_neurons"):
        NdtProcessor()
    with pytest.raises(ValueError, match="held-in unit ids given"):
        NdtProcessor.from_config(tiny_ndt_config(), HELDIN[:3], HELDOUT)
    with pytest.raises(ValueError, match="unique"):
        NdtProcessor(heldin_unit_ids=["a", "b"], heldout_unit_ids=["a"])
    proc.check_config(tiny_ndt_config())
    with pytest.raises(ValueError, match="num_forward_bins"):
        proc.check_config(tiny_ndt_config(num_forward_bins=2))


def test_save_and_load_keep_the_unit_ordering(proc, tmp_path):
    proc.save_pretrained(tmp_path)
    tiny_ndt_config().save_pretrained(tmp_path)
    for loader in (AutoProcessor, AutoFeatureExtractor, NdtProcessor):
        again = loader.from_pretrained(tmp_path)
        assert isinstance(again, NdtProcessor)
        assert again.heldin_unit_ids == HELDIN and again.heldout_unit_ids == HELDOUT
        assert again.to_dict() == proc.to_dict()
    trial = {"spike_times": [0.001, 0.02], "spike_unit_ids": ["h2", "u4"], "duration": 0.12}
    assert torch.equal(again(trial)["heldout_spikes"], proc(trial)["heldout_spikes"])


def test_mc_maze_sized_defaults():
    config = NdtConfig()
    p = NdtProcessor.from_config(config)
    batch = p(np.zeros((140, 137), np.int64))
    assert batch["spikes"].shape == (1, 180, 137) and int(batch["attention_mask"].sum()) == 180
    assert p.bin_size == 0.005 and p.num_forward_bins == 40
