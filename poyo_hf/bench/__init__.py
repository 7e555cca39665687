"""``poyo-hf bench ...``: benchmarks that print a table and, with ``--json``, one JSON object on
the last line holding every figure. Speed targets live here, never in timed tests."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS: dict[str, tuple[str, str]] = {
    "model": ("poyo_hf.bench.model", "POYO training steps/s and batch-1 latency, side by side with torch_brain"),
    "ndt": ("poyo_hf.bench.ndt", "NDT batch-1 latency on an MC_Maze-sized trial vs a stock TransformerEncoder"),
    "data": ("poyo_hf.bench.data", "Arrow collator vs with_format('torch'): windows/s and spikes/s"),
    "streaming": ("poyo_hf.bench.streaming", "real-time POYO decoding: per-step latency p50/p99 vs the offline path"),
    "scaling": ("poyo_hf.bench.scaling", "POYO time and peak memory per window as spikes and units grow; poyo-1 max batch"),
    "fewshot": ("poyo_hf.bench.fewshot", "few-shot curve: R^2 vs labelled trials (unit-id, fine-tune, scratch, Wiener)"),
    "decode": ("poyo_hf.bench.decode", "synthetic decoding R^2: POYO on N = 1, 4, 16 sessions vs the Wiener filter"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: poyo-hf bench NAME [--help] [options]\n\nbenchmarks:")
        for name, (_, help_) in BENCHMARKS.items():
            print(f"  {name:<10} {help_}")
        return 0
    if argv[0] not in BENCHMARKS:
        print(f"poyo-hf bench: unknown benchmark {argv[0]!r}; choose from {sorted(BENCHMARKS)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHMARKS[argv[0]][0]).main(argv[1:]) or 0)
