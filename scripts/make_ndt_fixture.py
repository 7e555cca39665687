#!/usr/bin/env python
"""Regenerate the tiny committed NDT test fixture (never run by the tests themselves).

    python scripts/make_ndt_fixture.py

Writes ``tests/fixtures/tiny-ndt/`` (a few-KB NDT checkpoint: config, safetensors and processor)
and ``tests/fixtures/tiny_ndt_golden.json`` (its log-rates on a fixed, seeded batch of trials of
two lengths), so that a change in the model's numerics shows up as a test failure rather than
passing silently.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from poyo_hf.models.ndt import NdtConfig, NdtForMaskedModeling, NdtProcessor
from poyo_hf.models.ndt_registration import register_ndt_auto_classes

ROOT = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
HELDIN = [f"u{i}" for i in range(5)]
HELDOUT = [f"h{i}" for i in range(3)]


def tiny_ndt_config(**overrides) -> NdtConfig:
    """5 held-in + 3 held-out neurons (D = 8, 2 heads of 4), 12 observed + 4 forward bins of
    10 ms, 2 layers, banded context (3 back, 2 forward)."""
    kwargs = dict(
        num_neurons=len(HELDIN),
        num_heldout_neurons=len(HELDOUT),
        num_bins=12,
        num_forward_bins=4,
        bin_size=0.01,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        context_backward=3,
        context_forward=2,
        mask_max_span=3,
        mask_span_ramp_start=2,
        mask_span_ramp_end=4,
    )
    kwargs.update(overrides)
    return NdtConfig(**kwargs)


def golden_trials() -> list[dict]:
    """Three spike-time trials (two of 12 bins, one of 9) with held-out and forward spikes."""
    rng = np.random.default_rng(4321)
    units = HELDIN + HELDOUT
    trials = []
    for duration in (0.12, 0.09, 0.12):
        n = int(rng.integers(20, 40))
        horizon = duration + 0.04
        trials.append(
            {
                "spike_times": np.sort(rng.uniform(0, horizon, n)).round(4).clip(0, horizon - 1e-4),
                "spike_unit_ids": [units[i] for i in rng.integers(0, len(units), n)],
                "duration": duration,
            }
        )
    return trials


def main() -> None:
    register_ndt_auto_classes()
    torch.manual_seed(0)
    config = tiny_ndt_config()
    processor = NdtProcessor.from_config(config, HELDIN, HELDOUT)
    model = NdtForMaskedModeling(config).eval()
    out_dir = ROOT / "tiny-ndt"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    # The remote-code route is tested on freshly saved folders; copies of the modeling files here
    # would only go stale, so the committed fixture keeps just config, weights and processor.
    for copied in out_dir.glob("*.py"):
        copied.unlink()
    trials = golden_trials()
    batch = processor(trials)
    with torch.no_grad():
        out = model(**batch)
    lengths = batch["attention_mask"].sum(1).tolist()
    golden = {
        "trials": [
            {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in t.items()} for t in trials
        ],
        "log_rates": [out.log_rates[i, :n].tolist() for i, n in enumerate(lengths)],
        "loss": float(out.loss),
    }
    (ROOT / "tiny_ndt_golden.json").write_text(json.dumps(golden, indent=1))
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    print(f"wrote {out_dir} ({size / 1024:.1f} KB) and tiny_ndt_golden.json")


if __name__ == "__main__":
    main()
