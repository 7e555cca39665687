#!/usr/bin/env python
"""Regenerate the tiny committed test fixtures (never run by the tests themselves).

    python scripts/make_fixtures.py

Writes ``tests/fixtures/tiny-poyo/`` (a few-KB POYO checkpoint: config, safetensors, processor
and the modeling files for ``trust_remote_code``) and ``tests/fixtures/tiny_poyo_golden.json``
(its predictions on a fixed, seeded batch), so that a change in the model's numerics shows up
as a test failure rather than passing silently.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from poyo_hf import PoyoConfig, PoyoForDecoding, PoyoProcessor

ROOT = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def tiny_config(**overrides) -> PoyoConfig:
    kwargs = dict(
        hidden_size=16,
        num_hidden_layers=1,
        num_latents_per_step=2,
        num_cross_attention_heads=1,
        num_self_attention_heads=2,
        head_dim=8,
        ffn_mult=2,
        latent_step=0.25,
        readout_dims={"hand_vel": 2},
        target_mean={"hand_vel": [1.0, -2.0]},
        target_std={"hand_vel": [10.0, 5.0]},
    )
    kwargs.update(overrides)
    return PoyoConfig(**kwargs)


def golden_windows() -> list[dict]:
    rng = np.random.default_rng(1234)
    windows = []
    for b, sid in enumerate(["sess_a", "sess_b", "sess_a"]):
        n = 7 + 5 * b
        windows.append(
            {
                "session_id": sid,
                "unit_ids": [f"{sid}/u{i}" for i in range(4)],
                "spike_times": np.sort(rng.uniform(0, 1, n)).round(4),
                "spike_unit_index": rng.integers(0, 4, n),
                "output_timestamps": np.linspace(0.05, 0.95, 4 + b),
            }
        )
    return windows


def ragged_batch(config: PoyoConfig, seed: int = 0) -> dict:
    """A processed batch of four windows over two sessions of 6 units each, with different spike
    counts (padded keys under the mask), 7 outputs and targets each, for ``config``'s vocabularies."""
    sessions = {sid: [f"{sid}/u{i}" for i in range(6)] for sid in ["s0", "s1"]}
    proc = PoyoProcessor.from_config(config, sessions)
    rng = np.random.default_rng(seed)
    windows = []
    for b in range(4):
        sid = f"s{b % 2}"
        k = int(rng.integers(3, 40))
        windows.append(
            {
                "session_id": sid,
                "spike_times": np.sort(rng.uniform(0, 1, k)),
                "spike_unit_index": rng.integers(0, 6, k),
                "unit_ids": sessions[sid],
                "output_timestamps": np.sort(rng.uniform(0, 1, 7)),
                "targets": rng.normal(size=(7, 2)),
            }
        )
    return dict(proc(windows))


def main() -> None:
    torch.manual_seed(0)
    sessions = {sid: [f"{sid}/u{i}" for i in range(4)] for sid in ["sess_a", "sess_b"]}
    config = tiny_config(unit_vocab_size=9, session_vocab_size=3)
    processor = PoyoProcessor.from_config(config, sessions)
    model = PoyoForDecoding(config).eval()
    out_dir = ROOT / "tiny-poyo"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    # The remote-code route is tested on freshly saved folders; copies of the modeling files here
    # would only go stale, so the committed fixture keeps just config, weights and processor.
    for copied in out_dir.glob("*.py"):
        copied.unlink()
    windows = golden_windows()
    with torch.no_grad():
        pred = model(**processor(windows)).predictions
    golden = {
        "windows": [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in w.items()} for w in windows],
        "predictions": [pred[i, : len(w["output_timestamps"])].tolist() for i, w in enumerate(windows)],
    }
    (ROOT / "tiny_poyo_golden.json").write_text(json.dumps(golden, indent=1))
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    print(f"wrote {out_dir} ({size / 1024:.1f} KB) and tiny_poyo_golden.json")


if __name__ == "__main__":
    main()
