"""``poyo-hf bench fewshot``: the few-shot curve on held-out synthetic sessions.

R^2 on the held-out test split of sessions the base never saw, against the number of labelled
trials K kept from each session's train split (the first K, in time order), for

* ``unit-id``: unit identification (only the new unit / session embedding rows train),
* ``finetune``: unit identification for the first 10 % of the steps, then everything,
* ``scratch``: the base's architecture, freshly initialised, trained on the same K trials,
* ``wiener``: a Wiener filter fit on the same K trials,

over ``--seeds`` seeds (mean and spread), on two kinds of held-out sessions: a new session of an
animal seen in pretraining, and a session of an animal never seen in pretraining (all synthetic,
from :mod:`poyo_hf.data.synthetic`; the parts come from :func:`corpus_plan`).

The base is pretrained once on the corpus' ``pretrain`` part with
:func:`poyo_hf.training.pretrain.train` (the quickstart's small model) and cached in
``--output-dir/base`` (reused while its settings are unchanged), or given with ``--base``.

Every run has the same optimizer-step budget (``--steps``, batch ``--batch-size``): the recipe's
100 epochs at batch 128 would give 100 steps for K = 1 (1-2 windows) and hours of CPU for the
whole curve. Learning rates: ``--lr`` for unit identification and fine-tuning (default 1e-3:
with the recipe's 1e-4 the new rows barely leave their N(0, 0.02) init within this budget),
``--scratch-lr`` for the model from scratch (1e-3, the quickstart's from-scratch rate).

Defaults (K = 1, 5, 20; 2 seeds; one new session + one new-animal session; 60 steps at batch 32)
are the run recorded in the README: 36 runs of 2-25 s each on 2 idle cores (37 min in all on a
shared, heavily loaded machine), after the base (the quickstart's ~6 min, once). Add
``--trials 1,2,5,10,20,50,all --seeds 3`` for the full curve.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..quickstart import CPU_LEARNING_RATE, CPU_OVERRIDES, cpu_pretrain_args
from .common import emit_json, print_table, save_figure, set_threads

METHODS = ("unit-id", "finetune", "scratch", "wiener")
_MODE = {"unit-id": "unit-identification", "finetune": "full-finetune", "scratch": "from-scratch"}
# The quickstart's model shape (poyo_hf/quickstart.py): it leaves POYO's initial plateau on CPU.


def simulator(seed: int) -> Any:
    from poyo_hf.data.synthetic import SimulatorConfig

    # 3 animals x 3 sessions: animals 0-1 pretrain on sessions 0-1 (exactly the quickstart's
    # synthetic corpus: sessions depend only on seed, animal and index, so a quickstart checkpoint
    # of the same seed is a valid --base); their session 2 is a held-out new session; animal 2 is
    # never seen in pretraining.
    return SimulatorConfig.quickstart(
        seed=seed,
        n_animals=3,
        sessions_per_animal=3,
        units_range=(120, 200),
        heldout_animals=(2,),
        heldout_sessions_per_animal=1,
    )


def build_data(out: Path, seed: int) -> dict[str, Any]:
    """Dataset folders: ``pretrain`` (one folder) and one folder per held-out session."""
    from poyo_hf.data.io import write_dataset
    from poyo_hf.data.synthetic import corpus_plan, simulate_corpus, simulate_session

    cfg = simulator(seed)
    data = out / "data"
    marker = data / "simulator.json"
    plan = corpus_plan(cfg, "heldout")
    folders = {p["session_id"]: data / "heldout" / p["session_id"].replace("/", "_") for p in plan}
    if not (marker.is_file() and json.loads(marker.read_text()) == cfg.to_dict()):
        card = {
            "pretty_name": "poyo_hf few-shot bench (synthetic)",
            "description": f"Synthetic spiking from the poyo_hf simulator (seed {seed}); not real data.",
        }
        write_dataset(simulate_corpus(cfg, "pretrain"), data / "pretrain", overwrite=True, card_info=card)
        for p in plan:
            rec = simulate_session(cfg, p["animal"], p["session_index"])
            write_dataset([rec], folders[p["session_id"]], overwrite=True, card_info=card)
        marker.write_text(json.dumps(cfg.to_dict()))
    return {"pretrain": data / "pretrain", "heldout": plan, "folders": folders}


def ensure_base(out: Path, pretrain_dir: Path, steps: int, seed: int) -> Path:
    """Pretrain the base once; reuse ``out/base/model`` while the settings match."""
    from poyo_hf.training.pretrain import train

    base_dir = out / "base"
    settings = {
        "data": str(pretrain_dir),
        "steps": steps,
        "seed": seed,
        "overrides": CPU_OVERRIDES,
        "batch_size": 16,
        "learning_rate": CPU_LEARNING_RATE,
    }
    marker = base_dir / "bench_settings.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings and (base_dir / "model").is_dir():
        return base_dir / "model"
    print(f"pretraining the base ({steps} steps; cached in {base_dir})", flush=True)
    args = cpu_pretrain_args(
        [str(pretrain_dir)], base_dir, batch_size=16, max_steps=steps, seed=seed, logging_steps=50, progress=False,
        eval_split="valid",
    )
    if (base_dir / "checkpoints").exists():
        import shutil

        shutil.rmtree(base_dir / "checkpoints")
    res = train(args)
    print(
        f"base: pretraining-session valid R^2 {res.get('r2', float('nan')):.3f} "
        f"(Wiener {res.get('wiener_r2', float('nan')):.3f})",
        flush=True,
    )
    marker.write_text(json.dumps(settings))
    return base_dir / "model"


def run_one(
    base: Path, folder: Path, method: str, k: int | None, seed: int, a: argparse.Namespace, out: Path
) -> dict[str, Any]:
    """One point of the curve: R^2 (and the Wiener filter's on the same K trials)."""
    import torch

    from poyo_hf.training.adapt import AdaptArguments, adapt

    torch.manual_seed(seed)
    mode = _MODE["unit-id" if method == "wiener" else method]
    args = AdaptArguments(
        base=str(base),
        data=str(folder),
        output_dir=str(out),
        mode=mode,
        num_train_trials=k,
        max_steps=a.steps,
        batch_size=a.batch_size,
        learning_rate=a.scratch_lr if method == "scratch" else a.lr,
        lr_scheduler_type="constant",
        seed=seed,
        logging_steps=max(1, a.steps),
        plots=False,
        save_delta=False,
        progress=False,
        eval_split="test",
    )
    t0 = time.perf_counter()
    res = adapt(args)
    return {
        "r2": res["r2"],
        "wiener_r2": res.get("wiener_r2"),
        "r2_before": res["r2_before_adaptation"],
        "n_trials": res["n_train_trials"],
        "seconds": time.perf_counter() - t0,
    }


def _parse_trials(text: str) -> list[int | None]:
    out: list[int | None] = []
    for tok in text.split(","):
        tok = tok.strip()
        if tok == "all":
            out.append(None)
        elif tok.isdigit() and int(tok) > 0:
            out.append(int(tok))
        else:
            raise ValueError(f"--trials takes positive integers or 'all', comma-separated; got {tok!r}.")
    return out


def plot_curve(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["kind"] for r in rows})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.6), squeeze=False)
    colors = {"unit-id": "tab:blue", "finetune": "tab:green", "scratch": "tab:red", "wiener": "tab:orange"}
    for ax, kind in zip(axes[0], kinds):
        for m in METHODS:
            pts = sorted((r for r in rows if r["kind"] == kind and r["method"] == m), key=lambda r: r["n_trials"])
            if not pts:
                continue
            x = [p["n_trials"] for p in pts]
            y = np.array([p["mean"] for p in pts])
            s = np.array([p["std"] for p in pts])
            ax.plot(x, y, "o-", color=colors[m], label=m)
            ax.fill_between(x, y - s, y + s, color=colors[m], alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("labelled trials of the new session")
        ax.set_ylabel("held-out test R^2")
        ax.set_title(kind.replace("_", " ") + " (synthetic)")
        ax.set_ylim(max(-0.5, ax.get_ylim()[0]), 1.0)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="poyo-hf bench fewshot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output-dir", default="runs/bench_fewshot", help="data, cached base, runs, table and PNG")
    p.add_argument("--base", default=None, help="use this pretrained checkpoint instead of the cached one")
    p.add_argument("--base-steps", type=int, default=2400, help="pretraining steps of the cached base")
    p.add_argument("--trials", default="1,5,20", help="labelled trial counts, e.g. 1,2,5,10,20,50,all")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=2, help="seeds per point (mean and std over them)")
    p.add_argument("--sessions", default="1,1", help="held-out sessions used: NEW_SESSION_COUNT,NEW_ANIMAL_COUNT")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of every run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="unit identification / fine-tuning learning rate")
    p.add_argument("--scratch-lr", type=float, default=1e-3, help="from-scratch learning rate")
    p.add_argument("--data-seed", type=int, default=0, help="simulator seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object with every figure last")
    a = p.parse_args(argv)
    try:
        trials = _parse_trials(a.trials)
        methods = [m.strip() for m in a.methods.split(",") if m.strip()]
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise ValueError(f"--methods {a.methods!r}: choose from {','.join(METHODS)}.")
        n_sess, n_anim = (int(x) for x in a.sessions.split(","))
        if a.seeds < 1 or a.steps < 1 or a.batch_size < 1 or n_sess < 0 or n_anim < 0 or n_sess + n_anim == 0:
            raise ValueError("--seeds, --steps, --batch-size must be >= 1 and --sessions must pick a session.")
    except ValueError as err:
        p.error(str(err))

    import poyo_hf  # noqa: F401

    set_threads(a.threads)
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = build_data(out, a.data_seed)
    base = Path(a.base) if a.base else ensure_base(out, data["pretrain"], a.base_steps, a.data_seed)
    chosen = [s for s in data["heldout"] if s["part"] == "heldout_sessions"][:n_sess]
    chosen += [s for s in data["heldout"] if s["part"] == "heldout_animals"][:n_anim]

    raw: list[dict[str, Any]] = []
    for sess in chosen:
        kind = "new_session" if sess["part"] == "heldout_sessions" else "new_animal"
        for k in trials:
            for seed in range(a.seeds):
                wiener_done = False
                for m in methods:
                    if m == "wiener":
                        continue
                    r = run_one(base, data["folders"][sess["session_id"]], m, k, seed, a, out / "runs" / "tmp")
                    raw.append(
                        {
                            "kind": kind,
                            "session": sess["session_id"],
                            "method": m,
                            "k": k,
                            "seed": seed,
                            "n_trials": r["n_trials"],
                            "r2": r["r2"],
                            "seconds": r["seconds"],
                        }
                    )
                    print(
                        f"  {kind:<11} K={k or 'all'!s:<4} seed {seed} {m:<9} R^2 {r['r2']:.3f} ({r['seconds']:.0f} s)",
                        flush=True,
                    )
                    if "wiener" in methods and not wiener_done and r["wiener_r2"] is not None:
                        # The Wiener filter is deterministic given the K trials: one entry per seed
                        # keeps the table's shape, its spread is 0.
                        raw.append(
                            {
                                "kind": kind,
                                "session": sess["session_id"],
                                "method": "wiener",
                                "k": k,
                                "seed": seed,
                                "n_trials": r["n_trials"],
                                "r2": r["wiener_r2"],
                                "seconds": 0.0,
                            }
                        )
                        wiener_done = True

    rows = []
    for kind in ("new_session", "new_animal"):
        for k in trials:
            for m in methods:
                pts = [r for r in raw if r["kind"] == kind and r["k"] == k and r["method"] == m]
                if not pts:
                    continue
                v = np.array([x["r2"] for x in pts])
                rows.append(
                    {
                        "kind": kind,
                        "method": m,
                        "k": "all" if k is None else k,
                        "n_trials": int(pts[0]["n_trials"]),
                        "mean": float(v.mean()),
                        "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
                        "min": float(v.min()),
                        "max": float(v.max()),
                        "n": int(v.size),
                    }
                )
    print()
    print_table(
        ["held-out", "K", "trials", *methods],
        [
            [
                kind,
                k,
                next(r["n_trials"] for r in rows if r["kind"] == kind and r["k"] == k),
                *[
                    next(
                        (
                            f"{r['mean']:.3f} ± {r['std']:.3f}"
                            for r in rows
                            if r["kind"] == kind and r["k"] == k and r["method"] == m
                        ),
                        "-",
                    )
                    for m in methods
                ],
            ]
            for kind in ("new_session", "new_animal")
            for k in dict.fromkeys(r["k"] for r in rows)
            if any(r["kind"] == kind and r["k"] == k for r in rows)
        ],
    )
    png = plot_curve(rows, out / "fewshot_curve.png")
    elapsed = time.perf_counter() - t_start
    print(
        f"\nR^2 mean ± std over {a.seeds} seed(s), synthetic held-out test split; plot: {png}; "
        f"{elapsed / 60:.1f} min on {a.threads} thread(s)"
    )
    result = {
        "benchmark": "fewshot",
        "synthetic": True,
        "base": str(base),
        "steps": a.steps,
        "batch_size": a.batch_size,
        "lr": a.lr,
        "scratch_lr": a.scratch_lr,
        "seeds": a.seeds,
        "sessions": [s["session_id"] for s in chosen],
        "rows": rows,
        "runs": raw,
        "plot": str(png),
        "elapsed_s": elapsed,
    }
    (out / "fewshot_results.json").write_text(json.dumps(result, indent=2, default=float))
    if a.json:
        emit_json(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
