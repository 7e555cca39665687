"""``poyo-hf demo``: load a preset, tokenize spikes and decode them (no data, no network).

A smoke test of the whole model path on embedded defaults: builds the ``poyo-mp`` preset
with random weights, registers one session of simulated units with the processor, tokenizes a
1 s window of Poisson spikes, decodes hand velocity at 100 Hz, saves the checkpoint with
``save_pretrained`` and reloads it with ``AutoModel`` / ``AutoProcessor``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="poyo-hf demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="poyo-mp", choices=["poyo-mp", "poyo-1", "poyo-single"])
    parser.add_argument("--units", type=int, default=100, help="simulated units (default 100)")
    parser.add_argument("--rate", type=float, default=20.0, help="firing rate in Hz (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.units < 1 or args.rate < 0:
        parser.error("--units must be >= 1 and --rate >= 0")

    from transformers import AutoModel, AutoProcessor

    from poyo_hf import PoyoConfig, PoyoForDecoding, PoyoProcessor

    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    units = [f"demo_session/unit_{i:03d}" for i in range(args.units)]
    config = PoyoConfig.from_preset(args.preset, unit_vocab_size=len(units) + 1, session_vocab_size=2)
    processor = PoyoProcessor.from_config(config, {"demo_session": units})
    model = PoyoForDecoding(config).eval()
    n_params = sum(p.numel() for p in model.parameters())

    counts = rng.poisson(args.rate, len(units))
    unit_index = np.repeat(np.arange(len(units)), counts)
    times = rng.uniform(0, config.sequence_length, unit_index.size)
    window = {
        "session_id": "demo_session",
        "spike_times": times,
        "spike_unit_index": unit_index,
        "output_timestamps": np.arange(0.005, config.sequence_length, 0.01),
    }
    batch = processor(window)
    t0 = time.perf_counter()
    with torch.no_grad():
        pred = model(**batch).predictions[0, : len(window["output_timestamps"])]
    dt = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        reloaded = AutoModel.from_pretrained(tmp)
        reproc = AutoProcessor.from_pretrained(tmp)
        with torch.no_grad():
            again = reloaded(**reproc(window)).predictions[0, : len(window["output_timestamps"])]
    print(f"preset {args.preset}: {n_params:,} parameters (random weights: outputs are not a trained decode)")
    print(f"window: {unit_index.size} spikes from {len(units)} units -> {int(batch['input_mask'].sum())} tokens")
    print(f"decoded {pred.shape[0]} velocity samples in {1000 * dt:.1f} ms; first: {pred[0].tolist()}")
    print(f"save_pretrained -> AutoModel/AutoProcessor round trip identical: {bool(torch.equal(pred, again))}")
    return 0 if torch.equal(pred, again) else 1


if __name__ == "__main__":
    raise SystemExit(main())
