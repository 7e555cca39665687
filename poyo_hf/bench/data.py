"""``poyo-hf bench data``: windows/s and spikes/s from a streamed parquet corpus into padded POYO
batches, for the Arrow-buffer collator and for the per-example ``with_format("torch")`` path,
in the same run (2 cores).

The corpus (at least 10M spikes by default) is simulated and written once to a cache folder.
Both paths read the same segment rows with ``datasets`` streaming and cut the same 1 s windows:

* ``arrow``: ``with_format("arrow").iter(...)`` record batches -> numpy views ->
  :class:`~poyo_hf.data.windows.PoyoWindowCollator` (no per-spike Python objects);
* ``torch``: ``with_format("torch")`` examples (one dict of tensors per segment), windows cut
  per example and padded with the processor's ``pad``.

Also prints what a POYO-mp training step consumes (spikes per step / step time from
``poyo-hf bench model``'s batch) so the ratio "data supply / model demand" is explicit.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .common import emit_json, print_table, set_threads


def make_corpus(folder: Path, min_spikes: int, seed: int) -> Path:
    from ..data.io import read_dataset_summary, write_dataset
    from ..data.synthetic import SimulatorConfig, simulate_corpus

    if (folder / "poyo_dataset.json").is_file() and read_dataset_summary(folder)["n_spikes"] >= min_spikes:
        return folder
    n_sessions = 4
    while True:
        cfg = SimulatorConfig.benchmark(seed=seed, n_animals=2, sessions_per_animal=n_sessions // 2,
                                        heldout_animals=(), heldout_sessions_per_animal=0)
        recs = simulate_corpus(cfg)
        if sum(r.spike_times.size for r in recs) >= min_spikes:
            break
        n_sessions *= 2
    write_dataset(recs, folder, overwrite=True, max_segment_s=30.0)
    return folder


def _count_spikes(batch) -> int:
    # numpy on the tensors' memory: counting must not cost more than the collation it measures
    mask = batch["input_mask"].numpy()
    return int(np.count_nonzero(mask & (batch["input_token_type"].numpy() == 0)))


def bench_arrow(folder: Path, processor, batch_size: int, max_windows: int | None) -> tuple[int, int, float]:
    from ..data.stream import PoyoWindowStream, load_segments_dataset

    ds = load_segments_dataset(folder, "train", streaming=True)
    stream = PoyoWindowStream(ds, processor, batch_size=batch_size, train=True, shuffle_buffer=512, seed=0)
    windows = spikes = 0
    t0 = time.perf_counter()
    t_last = t0
    for batch in stream:
        windows += int(batch["input_unit_index"].shape[0])
        spikes += _count_spikes(batch)
        t_last = time.perf_counter()
        if max_windows and windows >= max_windows:
            break
    # Measured to the last batch: `datasets` then sleeps 5 s when the parquet reader threads
    # shut down (apache/arrow#45214 guard), a per-pass constant reported separately.
    return windows, spikes, t_last - t0


def bench_torch_format(folder: Path, processor, batch_size: int, max_windows: int | None) -> tuple[int, int, float]:
    from ..data.stream import load_segments_dataset

    ds = load_segments_dataset(folder, "train", streaming=True).with_format("torch")
    L = processor.sequence_length
    rng = np.random.default_rng(0)
    windows = spikes = 0
    pending = []
    t0 = time.perf_counter()
    t_last = t0
    for ex in ds:
        st = ex["spike_times"].numpy()
        su = ex["spike_unit_index"].numpy()
        bt = ex["behavior_timestamps"].numpy()
        bv = ex["behavior_values"].numpy()
        start, end = float(ex["start"]), float(ex["end"])
        offset = rng.uniform(0, L)
        for t in np.arange(start + offset, end - L, L):
            i0, i1 = np.searchsorted(st, [t, t + L])
            j0, j1 = np.searchsorted(bt, [t, t + L])
            pending.append(processor.tokenize_window({
                "session_id": ex["session_id"], "unit_ids": ex["unit_ids"],
                "spike_times": st[i0:i1] - t, "spike_unit_index": su[i0:i1],
                "output_timestamps": bt[j0:j1] - t, "targets": bv[j0:j1],
            }))
            if len(pending) == batch_size:
                batch = processor.pad(pending)
                windows += batch_size
                spikes += _count_spikes(batch)
                pending = []
                t_last = time.perf_counter()
        if max_windows and windows >= max_windows:
            break
    return windows, spikes, t_last - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="poyo-hf bench data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=None, help="corpus folder (default: ~/.cache/poyo_hf/bench_data)")
    parser.add_argument("--min-spikes", type=int, default=10_000_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-windows", type=int, default=None, help="stop each path after this many windows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--step-seconds", type=float, default=None,
                        help="POYO-mp training step time to compare with (default: measure one step)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    set_threads(args.threads)

    from .. import PoyoProcessor
    from ..data.io import read_dataset_summary

    folder = Path(args.cache_dir or Path.home() / ".cache" / "poyo_hf" / "bench_data")
    t = time.perf_counter()
    make_corpus(folder, args.min_spikes, seed=0)
    summary = read_dataset_summary(folder)
    processor = PoyoProcessor(sequence_length=1.0)
    for s in summary["sessions"]:
        processor.add_session(s["session_id"], s["unit_ids"])
    prep = time.perf_counter() - t

    aw, asp, at = bench_arrow(folder, processor, args.batch_size, args.max_windows)
    tw, tsp, tt = bench_torch_format(folder, processor, args.batch_size, args.max_windows)
    step_s = args.step_seconds
    if step_s is None:
        from .model import run as model_run

        step_s = 1.0 / model_run("poyo-mp", steps=2, latency_runs=1, threads=args.threads)["ours_train_steps_per_s"]
    demand = 32 * 100 * 20 / step_s  # spikes/s a POYO-mp step on the benchmark batch consumes
    r = {
        "corpus_spikes": summary["n_spikes"],
        "corpus_prep_s": prep,
        "arrow_windows_per_s": aw / at,
        "arrow_spikes_per_s": asp / at,
        "torch_windows_per_s": tw / tt,
        "torch_spikes_per_s": tsp / tt,
        "speedup": (asp / at) / max(tsp / tt, 1e-9),
        "poyo_mp_step_s": step_s,
        "poyo_mp_spikes_per_s_demand": demand,
        "supply_over_demand": (asp / at) / demand,
        "threads": args.threads,
    }
    print(f"corpus: {summary['n_spikes']:,} spikes in {summary['n_sessions']} sessions ({folder})")
    print_table(
        ["path", "windows/s", "spikes/s", "windows", "seconds"],
        [["arrow collator", r["arrow_windows_per_s"], r["arrow_spikes_per_s"], aw, at],
         ['with_format("torch")', r["torch_windows_per_s"], r["torch_spikes_per_s"], tw, tt]],
    )
    print(f"arrow / torch: {r['speedup']:.1f}x; POYO-mp step consumes {demand:,.0f} spikes/s "
          f"-> supply {r['supply_over_demand']:.1f}x demand")
    if args.json:
        emit_json(r)
    return 0
