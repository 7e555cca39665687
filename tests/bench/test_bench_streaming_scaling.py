"""Smoke runs of `poyo-hf bench streaming` and `poyo-hf bench scaling` on tiny sizes: a table,
and a JSON last line whose figures are consistent. No speed targets here (they are in the
benchmarks' output, measured on an idle machine)."""

from __future__ import annotations

import json
import mmap

import numpy as np
import pytest
import torch

from poyo_hf.bench import main as bench_main


@pytest.fixture(autouse=True)
def restore_threads():
    """The benchmarks set the thread count of this process (``--threads``); put it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run_bench(capsys, *args: str) -> tuple[str, dict]:
    """Run ``poyo-hf bench ...`` in this process (the scaling points still run in subprocesses)."""
    assert bench_main(list(args)) == 0
    out = capsys.readouterr().out
    return out, json.loads(out.strip().splitlines()[-1])


def test_bench_streaming_json_and_equality(capsys):
    out, r = run_bench(
        capsys, "streaming", "--units", "8", "20", "--steps", "4", "--offline-steps", "3", "--warmup", "1",
        "--threads", "1", "--json",
    )  # fmt: skip
    assert "p99 < target" in out and "offline" in out and "paced, spinning between steps" in out
    assert r["step_ms"] == 20.0 and r["threads"] == 1 and r["target_p99_ms"] == 5.0
    assert [x["units"] for x in r["results"]] == [8, 20]
    for x in r["results"]:
        for path in ("streaming", "prepared", "paced_sleep", "paced_spin", "prepare", "offline"):
            assert x[f"{path}_p99_ms"] >= x[f"{path}_p50_ms"] > 0, path
        assert x["speedup_p50"] == x["offline_p50_ms"] / x["streaming_p50_ms"]
        assert x["compute_per_step_p50_ms"] == x["prepared_p50_ms"] + x["prepare_p50_ms"]
        assert x["max_abs_diff"] < 1e-5  # the two paths decode the same windows
        assert x["steps"] == 4 and x["offline_steps"] == 3
        assert x["meets_target_p99"] == (x["prepared_p99_ms"] < 5.0 and x["paced_spin_p99_ms"] < 5.0)
    # ~20 Hz x 1 s per unit: 20 units hold more spikes per window than 8.
    assert r["results"][1]["spikes_per_window"] > r["results"][0]["spikes_per_window"] > 0


def test_bench_streaming_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench_main(["streaming", "--units", "0"])
    assert "--units" in capsys.readouterr().err


def test_bench_scaling_json_and_memory_fit(capsys):
    out, r = run_bench(
        capsys, "scaling", "--batch", "1", "--repeats", "1", "--multipliers", "1,4", "--units", "10",
        "--fit-batches", "1,3", "--max-batch-preset", "poyo-mp", "--budget-gib", "1", "--threads", "1", "--json",
    )  # fmt: skip
    assert "time(4x)/time(1x)" in out and "bound 4.2" in out
    one, four = r["spike_sweep"]
    assert (one["spike_multiplier"], four["spike_multiplier"]) == (1, 4)
    # 4x the spike rate: the spike tokens grow 4x (the 2 start/end tokens per unit do not).
    spikes_one, spikes_four = one["tokens_per_window"] - 200, four["tokens_per_window"] - 200
    assert 3.0 < spikes_four / spikes_one < 5.0
    assert r["unit_sweep"][0]["units"] == 10
    for row in r["spike_sweep"] + r["unit_sweep"]:
        for key in ("train_ms_per_window", "infer_ms_per_window", "train_peak_mib_per_window"):
            assert row[key] > 0, key
        # Peaks are one RSS high-water mark read after inference, then after training (training
        # keeps activations for backward). Not a strict ">": at smoke sizes a transient allocation
        # can set the mark for both (a CI run read 177.0 == 177.0 MiB per window).
        assert row["train_peak_mib_per_window"] >= row["infer_peak_mib_per_window"] > 0
        assert row["peak_source"] in ("VmHWM since reset", "ru_maxrss (lifetime; no reset possible)")
    assert r["train_ratio_4x"] == four["train_ms_per_window"] / one["train_ms_per_window"]
    assert r["pass_4x"] == (r["train_ratio_4x"] <= 4.2 and r["infer_ratio_4x"] <= 4.2)
    mb = r["max_batch"]
    peaks = [p["peak_gib"] for p in mb["points"]]
    assert [p["batch"] for p in mb["points"]] == [1, 3] and peaks[1] > peaks[0] > 0
    slope, fixed = np.polyfit([1, 3], peaks, 1)
    assert np.isclose(mb["per_window_gib"], slope) and np.isclose(mb["fixed_gib"], fixed)
    assert mb["predicted_max_batch"] == int(np.floor((1.0 - fixed) / slope))


def _touched_mapping(size: int) -> mmap.mmap:
    mapping = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        mapping[offset] = 1
    return mapping


def test_peak_rss_reset_forgets_an_earlier_transient():
    # A transient before the baseline must not set the peak of the measured call (the CI failure
    # this guards against read the same peak at batch 1 and at batch 3).
    from poyo_hf.bench.scaling import _peak_rss_bytes, _reset_peak_rss

    if not _reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here; the benchmark falls back to ru_maxrss")
    # The transient is an anonymous mapping of its own, touched page by page and unmapped: through
    # malloc, the allocator policy (poyo_hf.allocator, applied by any earlier in-process CLI call)
    # would keep the freed pages resident and the RSS would never drop.
    big = _touched_mapping(64 * 2**20)
    with_transient = _peak_rss_bytes(True)
    big.close()
    assert _reset_peak_rss()
    after_reset = _peak_rss_bytes(True)
    assert with_transient - after_reset > 48 * 2**20
    small = _touched_mapping(16 * 2**20)
    assert _peak_rss_bytes(True) >= after_reset + 12 * 2**20
    small.close()
