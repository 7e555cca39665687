"""``poyo-hf bench decode``: decoding quality on the synthetic corpus, POYO beside the Wiener filter.

Simulates ``--animals`` x ``--sessions-per-animal`` synthetic sessions (one task family,
centre-out; every session its own dataset folder) and orders them round-robin over animals, so
the first N sessions span as many animals as possible and every larger set contains the smaller
ones. For each N in ``--sessions`` (default 1, 4, 16) it pretrains one POYO on the first N
sessions with ``poyo-hf pretrain`` (the same steps, batch and model for every N: more sessions
means more data at equal compute) and evaluates stitched R^2 on the held-out test split of those
sessions; a Wiener filter (ridge on lagged binned counts, fit per session on its train split) is
scored on exactly the same samples. N = 1 is single-session POYO vs the Wiener filter.

Reported per N: R^2 on session 0 (the one every run contains), the mean over the run's sessions,
and the Wiener filter's on the same sessions; table, PNG (``--output-dir``/decode.png) and, with
``--json``, one JSON object on the last line.

The model is the quickstart's CPU shape (poyo-mp width, depth 2; ``poyo_hf.quickstart``), lr 1e-3,
batch 16. POYO from scratch sits on a mean-prediction plateau for ~1000 steps at batch 16, so runs
much shorter than ~2000 steps measure the plateau, not the model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import emit_json, print_table, save_figure, set_threads


def _int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"session counts must be >= 1, got {text!r}")
    return sorted(set(out))


def build_sessions(
    out: Path, animals: int, per_animal: int, units: tuple[int, int], trials: int, seed: int
) -> list[str]:
    """One dataset folder per simulated session, ordered round-robin over animals."""
    from poyo_hf.data.io import write_dataset
    from poyo_hf.data.synthetic import SimulatorConfig, simulate_corpus

    sim = SimulatorConfig.quickstart(
        seed=seed,
        n_animals=animals,
        sessions_per_animal=per_animal,
        heldout_animals=(),
        heldout_sessions_per_animal=0,
        units_range=units,
        trials_range=(trials, trials),
    )
    recs = simulate_corpus(sim)
    by_animal: dict[str, list[Any]] = {}
    for rec in recs:
        by_animal.setdefault(rec.subject_id, []).append(rec)
    order = [by_animal[a][k] for k in range(per_animal) for a in sorted(by_animal) if k < len(by_animal[a])]
    folders = []
    for i, rec in enumerate(order):
        folder = out / "data" / f"session_{i:02d}"
        if not (folder / "poyo_dataset.json").is_file():
            write_dataset(
                [rec],
                folder,
                overwrite=True,
                card_info={
                    "pretty_name": f"poyo_hf synthetic session {rec.session_id}",
                    "description": f"Synthetic spiking + hand velocity from the poyo_hf simulator (seed {seed}); not real data.",
                },
            )
        folders.append(str(folder))
    return folders


def run_one(sources: list[str], out: Path, steps: int, batch: int, seed: int, progress: bool) -> dict[str, Any]:
    from poyo_hf.quickstart import cpu_pretrain_args
    from poyo_hf.training.pretrain import train

    if out.exists():
        import shutil

        shutil.rmtree(out)
    args = cpu_pretrain_args(
        sources, out, batch_size=batch, max_steps=steps, seed=seed, logging_steps=50, progress=progress, eval_split="test"
    )
    t0 = time.perf_counter()
    res = train(args)
    res["train_seconds"] = time.perf_counter() - t0
    return res


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["n_sessions"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(n, [r["poyo_r2_session0"] for r in rows], "o-", label="POYO, session 0")
    ax.plot(n, [r["poyo_r2_mean"] for r in rows], "s--", label="POYO, mean over sessions")
    ax.plot(n, [r["wiener_r2_session0"] for r in rows], "o:", color="gray", label="Wiener, session 0")
    ax.plot(n, [r["wiener_r2_mean"] for r in rows], "s:", color="k", label="Wiener, mean")
    ax.set_xscale("log", base=2)
    ax.set_xticks(n, [str(x) for x in n])
    ax.set_xlabel("pretraining sessions N")
    ax.set_ylabel("held-out test R$^2$")
    ax.set_title("synthetic corpus: POYO vs Wiener filter")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="poyo-hf bench decode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sessions", type=_int_list, default=[1, 4, 16], help="session counts N (default 1,4,16)")
    p.add_argument("--animals", type=int, default=4)
    p.add_argument("--steps", type=int, default=2500, help="training steps per run (same for every N)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--units", type=int, nargs=2, default=(120, 200), metavar=("MIN", "MAX"))
    p.add_argument("--trials", type=int, default=100, help="trials per simulated session")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output-dir", default="runs/bench_decode")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object with every figure last")
    a = p.parse_args(argv)
    for name in ("animals", "steps", "batch_size", "trials", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.units[0] < 1 or a.units[1] < a.units[0]:
        p.error(f"--units MIN MAX must satisfy 1 <= MIN <= MAX, got {a.units}")

    import poyo_hf  # noqa: F401

    set_threads(a.threads)
    out = Path(a.output_dir)
    n_max = max(a.sessions)
    per_animal = -(-n_max // a.animals)
    folders = build_sessions(out, a.animals, per_animal, tuple(a.units), a.trials, a.seed)
    rows = []
    for n in a.sessions:
        res = run_one(folders[:n], out / f"run_n{n}", a.steps, a.batch_size, a.seed, a.progress)
        per, wiener = res["r2_per_session"], res.get("wiener_r2_per_session", {})
        s0 = json.loads((Path(folders[0]) / "poyo_dataset.json").read_text())["sessions"][0]["session_id"]
        rows.append(
            {
                "n_sessions": n,
                "poyo_r2_session0": per[s0],
                "wiener_r2_session0": wiener.get(s0, float("nan")),
                "poyo_r2_mean": float(np.mean(list(per.values()))),
                "wiener_r2_mean": float(np.mean([wiener.get(s, np.nan) for s in per])),
                "poyo_r2_per_session": per,
                "wiener_r2_per_session": wiener,
                "steps": a.steps,
                "train_seconds": res["train_seconds"],
            }
        )
        print(
            f"N={n}: POYO {rows[-1]['poyo_r2_mean']:.3f} vs Wiener {rows[-1]['wiener_r2_mean']:.3f} "
            f"({res['train_seconds']:.0f} s)",
            flush=True,
        )
    png = plot(rows, out / "decode.png")
    print()
    print_table(
        ["N sessions", "POYO R2 (s0)", "Wiener R2 (s0)", "POYO R2 (mean)", "Wiener R2 (mean)", "train s"],
        [
            [
                r["n_sessions"],
                r["poyo_r2_session0"],
                r["wiener_r2_session0"],
                r["poyo_r2_mean"],
                r["wiener_r2_mean"],
                round(r["train_seconds"]),
            ]
            for r in rows
        ],
    )
    print(f"\nheld-out test split, stitched 1 s windows; {a.steps} steps x batch {a.batch_size} per run; plot: {png}")
    if a.json:
        emit_json(
            {
                "benchmark": "decode",
                "steps": a.steps,
                "batch_size": a.batch_size,
                "seed": a.seed,
                "rows": rows,
                "plot": str(png),
            }
        )
    return 0
