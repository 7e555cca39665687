"""``poyo-hf quickstart``: the main job on embedded defaults, on the CPU, in under 10 minutes.

1. simulates a small synthetic multi-animal corpus (plainly synthetic; see
   ``poyo_hf.data.synthetic``) and, when ``../shared/data/mc_maze_2trials`` is present, converts
   the two real MC_Maze trials too (trial 748 trains, trial 1356 is held out);
2. writes them as local dataset folders (parquet + card) and streams them;
3. pretrains a ``poyo-mp``-shaped POYO for 3000 steps (about 3.5 min on 2 idle cores; a fixed
   count rather than a time budget, so the result does not depend on the machine's load:
   POYO leaves its initial mean-prediction plateau after ~1000-2000 steps, and runs cut at
   ~1800 steps scored R^2 0.47, at ~2300 steps 0.80);
4. evaluates held-out test windows (1 s windows, 0.5 s step, stitched) beside a Wiener filter;
5. saves the checkpoint, reloads it with ``AutoModel`` / ``AutoProcessor`` and prints a table of
   R^2 per session with the paths to the plots.

No account and no network are needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .training.pretrain import PretrainArguments

# poyo-mp width (dim 64) at depth 2 with 8 latents per step and head dim 32: the shape that left
# POYO's initial mean-prediction plateau (~1000 steps at batch 16, lr 1e-3) and passed the Wiener
# filter within a CPU budget in our runs; the preset's dropouts are kept. Also used by the
# decode benchmark.
CPU_OVERRIDES = {"num_hidden_layers": 2, "num_latents_per_step": 8, "num_self_attention_heads": 4, "head_dim": 32}
CPU_LEARNING_RATE = 1e-3


def cpu_pretrain_args(datasets: list[str], output_dir: str | os.PathLike[str], **settings: Any) -> "PretrainArguments":
    """``PretrainArguments`` for the quickstart's CPU model: poyo-mp with ``CPU_OVERRIDES``,
    ``CPU_LEARNING_RATE``, no plots. ``settings`` set the rest (``batch_size``, ``max_steps``,
    ``seed``, ``eval_split``, ...). Shared by the quickstart and the decode / few-shot benchmarks."""
    from .training.pretrain import PretrainArguments

    fields: dict[str, Any] = dict(
        datasets=list(datasets),
        output_dir=str(output_dir),
        preset="poyo-mp",
        config_overrides=json.dumps(CPU_OVERRIDES),
        learning_rate=CPU_LEARNING_RATE,
        plots=False,
    )
    fields.update(settings)
    return PretrainArguments(**fields)


def _shared_mc_maze() -> Path | None:
    here = Path.cwd()
    candidates = [
        Path(os.environ.get("POYO_HF_SHARED", "")) / "data" / "mc_maze_2trials" if os.environ.get("POYO_HF_SHARED") else None,
        here.parent / "shared" / "data" / "mc_maze_2trials",
        here / "shared" / "data" / "mc_maze_2trials",
        Path(__file__).resolve().parents[2] / "shared" / "data" / "mc_maze_2trials",
    ]
    for c in candidates:
        if c is not None and c.is_dir() and any(c.glob("trial_*_data.csv")):
            return c
    return None


def build_corpora(out: Path, seed: int, sessions_per_animal: int, animals: int) -> list[str]:
    from .data.converters import from_mc_maze_csv
    from .data.io import write_dataset
    from .data.synthetic import SimulatorConfig, simulate_corpus

    sources = []
    sim = SimulatorConfig.quickstart(
        seed=seed, n_animals=animals, sessions_per_animal=sessions_per_animal,
        heldout_animals=(), heldout_sessions_per_animal=0, units_range=(120, 200),
    )
    recs = simulate_corpus(sim)
    synth_dir = out / "data" / "synthetic"
    write_dataset(recs, synth_dir, overwrite=True, card_info={
        "pretty_name": "poyo_hf quickstart synthetic corpus",
        "description": f"Synthetic spiking + hand velocity from the poyo_hf simulator (seed {seed}); not real data.",
    })
    sources.append(str(synth_dir))
    mc = _shared_mc_maze()
    if mc is not None:
        rec = from_mc_maze_csv(mc)
        # 1 kHz behaviour -> 100 Hz decoding targets (every 10th sample); its own readout,
        # because MC_Maze velocities are in different units (mm/s) from the simulator's (cm/s).
        rec = dataclasses.replace(
            rec,
            behavior_timestamps=rec.behavior_timestamps[::10],
            behavior_values=rec.behavior_values[::10],
            position_values=None if rec.position_values is None else rec.position_values[::10],
            behavior_name="mc_maze_hand_vel",
        )
        real_dir = out / "data" / "mc_maze"
        write_dataset([rec], real_dir, overwrite=True, card_info={
            "pretty_name": "MC_Maze, two real trials",
            "description": "Two real MC_Maze trials (Churchland et al. 2012; NLB'21, DANDI:000128), CC-BY-4.0.",
            "license": "cc-by-4.0",
        })
        sources.append(str(real_dir))
    return sources


def calibrate_steps(args_template, budget_s: float, max_steps_cap: int) -> tuple[int, float]:
    """Time a few training steps on real batches and size the run to the budget."""
    import torch

    from .data.stream import PoyoWindowStream
    from .data.windows import UnitDropout
    from .training.corpus import Corpus
    from .training.pretrain import build_model_and_processor

    corpus = Corpus.from_sources(args_template.datasets)
    model, proc = build_model_and_processor(args_template, corpus)
    c = model.config
    # The same batches as training: with unit dropout (fewer tokens per window). Without it the
    # calibration measured ~2x the real step time and the run stopped at ~1800 steps, still on
    # POYO's initial plateau (R^2 0.47 instead of 0.8).
    dropout = UnitDropout(c.unit_dropout_min, c.unit_dropout_mode, c.unit_dropout_max, c.unit_dropout_peak)
    stream = PoyoWindowStream(corpus.segments("train"), proc, batch_size=args_template.batch_size, seed=1,
                              train=True, unit_dropout=dropout)
    it = iter(stream.epochs())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(16):  # the first steps build oneDNN primitives for new shapes: not timed
        b = next(it)
        t0 = time.perf_counter()
        loss = model(**{k: v for k, v in b.items() if k not in ("window_start", "eval_mask")}).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= 4:
            times.append(time.perf_counter() - t0)
    step_s = float(np.median(times)) * 1.1  # logging, data and evaluation overhead
    return int(min(max_steps_cap, max(50, budget_s / step_s))), step_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="poyo-hf quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/quickstart", help="where data, checkpoint and plots go")
    parser.add_argument("--max-steps", type=int, default=3000, help="pretraining steps (default 3000)")
    parser.add_argument("--train-minutes", type=float, default=None,
                        help="size the run to this time budget instead (steps calibrated on a few batches)")
    parser.add_argument("--animals", type=int, default=2)
    parser.add_argument("--sessions-per-animal", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.train_minutes is not None and args.train_minutes <= 0) or args.max_steps < 1 or args.batch_size < 1 \
            or args.animals < 1 or args.sessions_per_animal < 1:
        parser.error("--train-minutes, --max-steps, --batch-size, --animals and --sessions-per-animal must be positive")

    import torch
    from transformers import AutoModel, AutoProcessor

    import poyo_hf  # noqa: F401

    from .training.evaluate import EvaluateArguments, evaluate, format_table
    from .training.pretrain import train

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t_start = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = build_corpora(out, args.seed, args.sessions_per_animal, args.animals)
    print(f"[{time.perf_counter() - t_start:5.0f}s] datasets: {', '.join(sources)}")

    run_dir = out / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    template = cpu_pretrain_args(
        sources, run_dir, batch_size=args.batch_size, seed=args.seed, logging_steps=25, progress=True, eval_split="valid"
    )
    if args.train_minutes is not None:
        steps, step_s = calibrate_steps(template, 60 * args.train_minutes, 20000)
        print(f"[{time.perf_counter() - t_start:5.0f}s] {step_s:.2f} s/step -> {steps} steps in ~{args.train_minutes:g} min")
    else:
        steps = args.max_steps
    train(dataclasses.replace(template, max_steps=steps))
    print(f"[{time.perf_counter() - t_start:5.0f}s] pretrained; checkpoint in {run_dir / 'model'}")

    # Reload through the Auto classes (what a user of the checkpoint does) and score held-out
    # test windows beside the Wiener filter.
    model = AutoModel.from_pretrained(run_dir / "model")
    processor = AutoProcessor.from_pretrained(run_dir / "model")
    processor.check_config(model.config)
    results = evaluate(EvaluateArguments(checkpoint=str(run_dir / "model"), datasets=sources,
                                         output_dir=str(out / "eval"), split="test"))
    elapsed = time.perf_counter() - t_start
    print()
    print(format_table(results))
    print(f"\nplots: {out / 'eval'}")
    for p in results.get("plots", []):
        print(f"  {p}")
    synthetic = {k: v for k, v in results["r2_per_session"].items() if k.startswith("synthetic")}
    synth_r2 = float(np.mean(list(synthetic.values()))) if synthetic else float("nan")
    summary = {
        "elapsed_s": round(elapsed, 1),
        "steps": steps,
        "synthetic_test_r2": synth_r2,
        "test_r2": results["r2"],
        "wiener_test_r2": results.get("wiener_r2"),
        "checkpoint": str(run_dir / "model"),
        "model_reloaded": type(model).__name__,
    }
    (out / "quickstart_results.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"\nheld-out synthetic R^2 {synth_r2:.3f} (Wiener {np.mean([results.get('wiener_r2_per_session', {}).get(k, np.nan) for k in synthetic]):.3f}); "
          f"total time {elapsed / 60:.1f} min")
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
