"""Shared test set-up: offline, CPU, deterministic, small thread count."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Local-path tests must never fall back to the network: a missing relative path would otherwise
# be tried as a Hub repo id for ~20 s. Hub tests run their clients in subprocesses with their own
# environment (see poyo_hf.testing.hub_env).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
SHARED = REPO_ROOT.parent / "shared"
sys.path.insert(0, str(REPO_ROOT / "scripts"))


@pytest.fixture
def tiny_checkpoint() -> Path:
    return FIXTURES / "tiny-poyo"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def cpu_kernels_built(monkeypatch):
    """poyo_hf's compiled CPU kernels, enabled and built; skips the test where no C++ compiler exists
    (there the callers run their plain-torch paths, tested with ``POYO_HF_CPU_KERNELS=0``)."""
    import shutil

    from poyo_hf.models.poyo import cpu_kernels

    monkeypatch.delenv("POYO_HF_CPU_KERNELS", raising=False)
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: the CPU kernels cannot be built")
    assert cpu_kernels.kernels() is not None, "the CPU kernels failed to build"
