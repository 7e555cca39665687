"""poyo_hf.allocator: with the keep policy, freed large tensors stay mapped (no re-faulting)."""

import json
import os
import platform
import subprocess
import sys

import pytest

from poyo_hf import allocator

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt"
)

PROBE = r"""
import json
import statistics
import torch
from poyo_hf.allocator import keep_freed_memory, policy

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

applied = keep_freed_memory()
for _ in range(2):  # warm-up, as a training loop's first steps: the heap settles around the block
    x = torch.ones(64 * 2**20 // 4)
    del x
grown, released = [], []
for _ in range(5):  # steps of a loop: allocate a 64 MiB activation (every page touched), free it
    start = rss_kib()
    x = torch.ones(64 * 2**20 // 4)
    peak = rss_kib()
    del x
    grown.append((peak - start) / 1024)
    released.append((peak - rss_kib()) / 1024)
# Medians over the steps: glibc may place one small allocation inside the freed block now and
# then (the next 64 MiB then comes from fresh heap once); the policy is about the usual step.
print(json.dumps({"applied": applied, "policy": policy(), "released_mib": statistics.median(released),
                  "regrown_mib": statistics.median(grown)}))
"""


def _probe(mode: str) -> dict:
    env = dict(os.environ, POYO_HF_MALLOC=mode, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_default_glibc_returns_a_freed_large_tensor_and_keep_policy_reuses_it():
    default = _probe("default")
    assert default == {**default, "applied": False, "policy": "default"}
    assert default["released_mib"] > 60  # glibc mmap'd the block and unmapped it on free
    assert default["regrown_mib"] > 60  # ... so the next one faults its pages in again
    kept = _probe("keep")
    assert kept == {**kept, "applied": True, "policy": "keep"}
    assert kept["released_mib"] < 4  # stays mapped in the heap
    assert kept["regrown_mib"] < 4  # and is reused


def test_bad_policy_value_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv("POYO_HF_MALLOC", "jemalloc")
    with pytest.raises(ValueError, match=r"POYO_HF_MALLOC='jemalloc'.*'keep'.*'default'"):
        allocator.keep_freed_memory()
