"""POYO processor: exact token values, padding, vocabularies and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poyo_hf import PoyoConfig, PoyoProcessor


@pytest.fixture
def proc() -> PoyoProcessor:
    p = PoyoProcessor(sequence_length=1.0, readout_names=["hand_vel"])
    p.add_session("A", ["A/u0", "A/u1"])
    p.add_session("B", ["B/u0", "B/u1", "B/u2"])
    return p


def test_exact_tokens_for_hand_built_spikes(proc):
    batch = proc(
        [
            {
                "session_id": "A",
                "spike_times": [0.25, 0.5, 0.75],
                "spike_unit_ids": ["A/u1", "A/u0", "A/u1"],
                "output_timestamps": [0.1, 0.9],
                "targets": [[1.0, 2.0], [3.0, 4.0]],
            },
            {
                "session_id": "B",
                "unit_ids": ["B/u2"],  # explicit unit table: one unit
                "spike_times": [0.125],
                "spike_unit_index": [0],
                "output_timestamps": [0.5],
                "targets": [[5.0, 6.0]],
                "output_weights": [2.0],
            },
        ]
    )
    # Window 0: 2 units -> (start, end) x 2 then 3 spikes = 7 tokens, padded to 8.
    assert batch["input_unit_index"].tolist() == [[1, 1, 2, 2, 2, 1, 2, 0], [5, 5, 5, 0, 0, 0, 0, 0]]
    assert batch["input_token_type"].tolist() == [[1, 2, 1, 2, 0, 0, 0, 0], [1, 2, 0, 0, 0, 0, 0, 0]]
    torch.testing.assert_close(
        batch["input_timestamps"],
        torch.tensor([[0, 1, 0, 1, 0.25, 0.5, 0.75, 0], [0, 1, 0.125, 0, 0, 0, 0, 0]], dtype=torch.float32),
    )
    assert batch["input_mask"].tolist() == [[True] * 7 + [False], [True] * 3 + [False] * 5]
    assert batch["input_unit_index"][1, 2].item() == 5  # the spike of B/u2 (row 5)
    assert batch["session_index"].tolist() == [1, 2]
    assert batch["output_timestamps"].shape == (2, 8)
    assert batch["output_mask"].tolist() == [[True, True] + [False] * 6, [True] + [False] * 7]
    assert batch["labels"].shape == (2, 8, 2)
    assert batch["labels"][0, :2].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert torch.isnan(batch["labels"][0, 2:]).all()
    assert batch["output_weights"].tolist()[1][:2] == [2.0, 0.0]
    assert batch["output_weights"].tolist()[0][:3] == [1.0, 1.0, 0.0]
    assert batch["input_unit_index"].dtype == torch.int64 and batch["input_timestamps"].dtype == torch.float32


def test_vocabularies_reserve_row_zero_and_round_trip(proc, tmp_path):
    assert proc.unit_vocab_size == 6 and proc.session_vocab_size == 3
    assert proc.unit_rows(["A/u0", "B/u2"]).tolist() == [1, 5]
    proc.save_pretrained(tmp_path)
    loaded = PoyoProcessor.from_pretrained(tmp_path)
    assert loaded.unit_vocab == proc.unit_vocab and loaded.session_vocab == proc.session_vocab
    assert loaded.unit_rows(["B/u1"]).tolist() == [4] and loaded.session_row("B") == 2
    assert "_unit_index" not in (tmp_path / "preprocessor_config.json").read_text()


def test_from_config_reads_the_window_and_readouts():
    cfg = PoyoConfig(sequence_length=2.0, latent_step=0.25, readout_dims={"cursor_vel": 2, "grip": 1})
    p = PoyoProcessor.from_config(cfg, {"s": ["s/a"]})
    assert p.sequence_length == 2.0 and p.readout_names == ["cursor_vel", "grip"]
    b = p({"session_id": "s", "spike_times": [1.5], "spike_unit_ids": ["s/a"], "output_timestamps": [1.9],
           "readout": "grip"})
    assert b["input_timestamps"][0, :3].tolist() == [0.0, 2.0, 1.5]
    assert b["readout_index"].tolist() == [1]


def test_add_session_refuses_collisions_and_can_reuse(proc):
    with pytest.raises(ValueError, match="collide"):
        proc.add_session("C", ["A/u0", "C/u1"])
    with pytest.raises(ValueError, match="already in the vocabulary"):
        proc.add_session("A", ["A/x"])
    with pytest.raises(ValueError, match="no units"):
        proc.add_session("D", [])
    rows = proc.add_session("C", ["A/u0", "C/u1"], exist_ok=True)
    assert rows["unit_index"] == [1, 6]


W = {"session_id": "A", "spike_times": [0.1], "spike_unit_ids": ["A/u0"], "output_timestamps": [0.5]}


@pytest.mark.parametrize(
    "change, exc, fragment",
    [
        ({"spike_times": [float("nan")]}, ValueError, "NaN or inf"),
        ({"spike_times": [float("inf")]}, ValueError, "NaN or inf"),
        ({"spike_times": [-0.1]}, ValueError, r"lie in the window \[0, 1.0\]"),
        ({"spike_times": [1.5]}, ValueError, r"lie in the window"),
        ({"spike_unit_ids": ["A/nope"]}, ValueError, r"'A/nope' is not in the processor's vocabulary.*add_session"),
        ({"session_id": "Z"}, ValueError, r"'Z' is not in the processor's vocabulary"),
        ({"spike_times": [0.1, 0.2]}, ValueError, "one unit per spike"),
        ({"spike_times": ["a"]}, TypeError, "must be an array of numbers"),
        ({"spike_unit_ids": [3]}, TypeError, "must be strings"),
        ({"output_timestamps": [2.0]}, ValueError, "output_timestamps must be finite and lie"),
        ({"targets": [[1.0, 2.0], [3.0, 4.0]]}, ValueError, "targets has 2 rows"),
        ({"output_weights": [-1.0]}, ValueError, "finite and >= 0"),
        ({"session_id": 3}, TypeError, "session_id must be a string"),
        ({"unit_ids": []}, ValueError, "unit table is empty"),
        ({"readout": "grip"}, ValueError, "readout 'grip' unknown"),
    ],
)
def test_bad_input_gives_clear_errors(proc, change, exc, fragment):
    with pytest.raises(exc, match=fragment):
        proc(dict(W, **change))


def test_missing_keys_and_non_mapping_inputs(proc):
    with pytest.raises(ValueError, match="missing key 'output_timestamps'"):
        proc({"session_id": "A", "spike_times": [0.1], "spike_unit_ids": ["A/u0"]})
    with pytest.raises(TypeError):
        proc("not a window")
    with pytest.raises(TypeError, match="expected a mapping"):
        proc([np.zeros(3)])
    with pytest.raises(ValueError, match="sequence_length"):
        PoyoProcessor(sequence_length=0)


def test_spike_unit_index_out_of_range(proc):
    with pytest.raises(ValueError, match=r"spike_unit_index must lie in \[0, 2\)"):
        proc({"session_id": "A", "spike_times": [0.1], "spike_unit_index": [2], "output_timestamps": [0.5]})
