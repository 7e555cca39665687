"""A tiny synthetic corpus and a tiny model shape shared by the training tests."""

from __future__ import annotations

import json

import pytest

from poyo_hf.data.io import write_dataset
from poyo_hf.data.synthetic import SimulatorConfig, simulate_corpus

# A model small enough that a training step takes milliseconds on the CPU.
TINY_OVERRIDES = json.dumps(
    {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_latents_per_step": 4,
        "num_cross_attention_heads": 1,
        "num_self_attention_heads": 2,
        "head_dim": 32,
        "ffn_mult": 2,
        "attention_dropout": 0.0,
        "lin_dropout": 0.0,
        "ffn_dropout": 0.0,
        "unit_dropout_min": 10,
        "unit_dropout_mode": 30,
        "unit_dropout_max": 60,
    }
)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """2 animals x 2 sessions of 30-60 units, 20 trials each, as a dataset folder."""
    recs = simulate_corpus(SimulatorConfig.small(seed=11))
    out = tmp_path_factory.mktemp("corpus") / "tiny"
    write_dataset(recs, out, max_segment_s=20.0)
    return out


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory):
    """One session (45 units, 20 trials): a corpus a tiny model learns within a few hundred steps."""
    recs = simulate_corpus(SimulatorConfig.small(seed=11, n_animals=1, sessions_per_animal=1))
    out = tmp_path_factory.mktemp("corpus") / "toy"
    write_dataset(recs, out, max_segment_s=20.0)
    return out
