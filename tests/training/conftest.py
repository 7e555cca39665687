"""A tiny synthetic corpus and a tiny model shape shared by the training tests."""

from __future__ import annotations

import pytest

from poyo_hf.data.io import write_dataset
from poyo_hf.data.synthetic import SimulatorConfig, simulate_corpus


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
