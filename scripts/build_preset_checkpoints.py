#!/usr/bin/env python
"""Build the POYO-mp and POYO-1 checkpoints on the synthetic corpus: corpus -> pretrain -> card -> publish.

    python scripts/build_preset_checkpoints.py poyo-mp --out runs/presets
    python scripts/build_preset_checkpoints.py poyo-1 --out runs/presets --max-steps 20
    python scripts/build_preset_checkpoints.py poyo-mp --out runs/presets --push my-lab   # real Hub
    python scripts/build_preset_checkpoints.py poyo-mp --out runs/presets --loopback-hub  # offline demo

Each preset has one recipe (``RECIPES`` below; docs/presets.md lists them with the numbers we
measured):

1. corpus: sessions from the seeded ``poyo_hf`` simulator, written as a dataset folder
   (synthetic, and every card made from it says so). POYO-mp: several sessions of one task family
   (center-out reaching, 3 animals); POYO-1: all animals and both tasks (center-out and
   random-target);
2. ``poyo-hf pretrain --preset <preset>`` with the preset's real shape (no config overrides),
   evaluated on the test split beside the Wiener filter; its ``model/`` folder holds
   ``eval_results.json`` and ``training_info.json``;
3. the model card rendered from those files, saved to ``--card-out`` (the committed examples are
   ``hub_cards/poyo-mp/README.md`` and ``hub_cards/poyo-1/README.md``);
4. optionally ``poyo-hf publish`` to ``NAMESPACE/<preset>`` on the Hub (``--push NAMESPACE``) or
   to a loopback Hub started here (``--loopback-hub``), followed by a reload from a fresh process
   with ``AutoModel.from_pretrained("<preset>")`` and ``("<namespace>/<preset>")`` through remote
   code, whose predictions must equal the local model's.

Steps default to a CPU-affordable count; these checkpoints are far from converged and their cards
state the numbers as measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Per preset: the simulator corpus and the pretraining arguments (CLI flags of `poyo-hf pretrain`).
RECIPES: dict[str, dict] = {
    "poyo-mp": {
        "description": "several sessions of one task family: 3 synthetic animals x 2 center-out sessions",
        "simulator": {
            "seed": 0,
            "n_animals": 3,
            "sessions_per_animal": 2,
            "units_range": [60, 150],
            "trials_range": [60, 60],
            "tasks": ["center_out"],
        },
        "pretrain": {"max_steps": 500, "batch_size": 16, "learning_rate": 1e-3},
    },
    "poyo-1": {
        "description": "all animals and tasks: 4 synthetic animals x 2 sessions, center-out and random-target",
        "simulator": {
            "seed": 1,
            "n_animals": 4,
            "sessions_per_animal": 2,
            "units_range": [60, 150],
            "trials_range": [30, 30],
            "tasks": ["center_out", "random_target"],
        },
        "pretrain": {"max_steps": 20, "batch_size": 8, "learning_rate": 5e-4},
    },
}


def build_corpus(preset: str, out: Path) -> Path:
    """Simulate the preset's corpus and write it as a dataset folder (replacing an old one)."""
    from poyo_hf.data.io import write_dataset
    from poyo_hf.data.synthetic import SimulatorConfig, simulate_corpus

    recipe = RECIPES[preset]
    sim = SimulatorConfig.from_dict(recipe["simulator"])
    folder = out / "data" / f"synthetic-{preset}"
    write_dataset(
        simulate_corpus(sim),
        folder,
        overwrite=True,
        card_info={
            "pretty_name": f"poyo_hf synthetic corpus for {preset}",
            "description": f"Synthetic spiking + hand velocity from the poyo_hf simulator (seed {sim.seed}); "
            f"{recipe['description']}. Not real data.",
            "license": "mit",
            "tags": ["synthetic"],
        },
    )
    return folder


def pretrain_argv(preset: str, corpus: Path, run_dir: Path, overrides: dict) -> list[str]:
    """The `poyo-hf pretrain` command line of the recipe (``overrides`` from this script's flags)."""
    args = {**RECIPES[preset]["pretrain"], **{k: v for k, v in overrides.items() if v is not None}}
    argv = ["--datasets", str(corpus), "--output_dir", str(run_dir), "--preset", preset, "--eval_split", "test"]
    argv += ["--logging_steps", "10", "--progress", "false", "--seed", "0"]
    for key, value in args.items():
        argv += [f"--{key}", str(value)]
    return argv


def verify_from_hub(url: str, namespace: str, preset: str, model_dir: Path, corpus: Path) -> dict:
    """Reload the published checkpoint in a fresh process without poyo_hf (remote code), by bare id
    and by namespace id, and compare its predictions on one test window with the local model's."""
    import torch

    from poyo_hf import load_checkpoint
    from poyo_hf.data.stream import PoyoWindowStream
    from poyo_hf.testing.hub_env import hub_environment
    from poyo_hf.training.corpus import Corpus

    model, processor = load_checkpoint(model_dir)
    segments = Corpus.from_sources([str(corpus)]).segments("test")[:1]
    batch = next(iter(PoyoWindowStream(segments, processor, batch_size=2, train=False)))
    inputs = {k: v for k, v in batch.items() if k not in ("window_start", "eval_mask", "labels", "output_weights")}
    with torch.no_grad():
        expected = model(**inputs).predictions
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(inputs, Path(tmp) / "batch.pt")
        code = textwrap.dedent(
            f"""
            import sys, json, torch
            sys.modules["poyo_hf"] = None  # remote code must stand alone
            from transformers import AutoModel
            batch = torch.load({str(Path(tmp) / "batch.pt")!r})
            out = {{}}
            for repo in ({preset!r}, {f"{namespace}/{preset}"!r}):
                m = AutoModel.from_pretrained(repo, trust_remote_code=True)
                with torch.no_grad():
                    torch.save(m(**batch).predictions, {tmp!r} + "/" + repo.replace("/", "_") + ".pt")
                out[repo] = type(m).__module__
            print(json.dumps(out))
            """
        )
        (Path(tmp) / "hf_home").mkdir()
        env = hub_environment(url, Path(tmp) / "hf_home")
        env.pop("PYTHONPATH", None)
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=tmp, capture_output=True, text=True, timeout=600
        )
        if proc.returncode != 0:
            raise RuntimeError(f"reload from the loopback Hub failed:\n{proc.stderr[-3000:]}")
        same = {
            repo: bool(torch.equal(torch.load(Path(tmp) / f"{repo.replace('/', '_')}.pt"), expected))
            for repo in (preset, f"{namespace}/{preset}")
        }
    return {"modules": json.loads(proc.stdout.strip().splitlines()[-1]), "identical_predictions": same}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=sorted(RECIPES))
    parser.add_argument("--out", default="runs/presets", help="where corpus and run go (default runs/presets)")
    parser.add_argument("--max-steps", type=int, default=None, help="override the recipe's optimizer steps")
    parser.add_argument("--batch-size", type=int, default=None, help="override the recipe's batch size")
    parser.add_argument(
        "--card-out", default=None, help="also save the rendered card here (e.g. hub_cards/poyo-mp/README.md)"
    )
    parser.add_argument("--namespace", default="poyo-hf", help="namespace of the repo id in the card (default poyo-hf)")
    hub = parser.add_mutually_exclusive_group()
    hub.add_argument("--push", metavar="NAMESPACE", default=None, help="publish to NAMESPACE/<preset> on the Hub")
    hub.add_argument("--loopback-hub", action="store_true", help="publish to a loopback Hub started here, then reload")
    args = parser.parse_args(argv)
    if args.loopback_hub:  # read when huggingface_hub is imported: the loopback Hub speaks plain LFS, not Xet
        os.environ["HF_HUB_DISABLE_XET"] = "1"

    import torch

    import poyo_hf  # noqa: F401  (Auto registration)
    from poyo_hf.hub import publish, render_model_card
    from poyo_hf.training.pretrain import main as pretrain_main

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    namespace = args.push or args.namespace
    out = Path(args.out) / args.preset
    t0 = time.perf_counter()
    corpus = build_corpus(args.preset, out)
    print(f"[{time.perf_counter() - t0:6.0f}s] corpus {corpus}", flush=True)
    run_dir = out / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    argv_pretrain = pretrain_argv(
        args.preset, corpus, run_dir, {"max_steps": args.max_steps, "batch_size": args.batch_size}
    )
    print("poyo-hf pretrain " + " ".join(argv_pretrain), flush=True)
    if pretrain_main(argv_pretrain) != 0:
        return 1
    model_dir = run_dir / "model"
    print(f"[{time.perf_counter() - t0:6.0f}s] checkpoint {model_dir}", flush=True)

    card = render_model_card(model_dir, repo_id=f"{namespace}/{args.preset}")
    if args.card_out:
        Path(args.card_out).parent.mkdir(parents=True, exist_ok=True)
        card.save(args.card_out)
        print(f"card -> {args.card_out}")
    summary: dict = {"preset": args.preset, "checkpoint": str(model_dir)}
    summary["eval"] = {
        k: v
        for k, v in json.loads((model_dir / "eval_results.json").read_text()).items()
        if k in ("r2", "wiener_r2", "r2_per_session", "wiener_r2_per_session", "split")
    }
    summary["compute"] = json.loads((model_dir / "training_info.json").read_text())["compute"]
    if args.push:
        summary["commit"] = publish(model_dir, f"{namespace}/{args.preset}")
    elif args.loopback_hub:
        from poyo_hf.testing.hub_server import LoopbackHub, serve_hub

        with serve_hub(hub=LoopbackHub(user=namespace)) as server:
            summary["commit"] = publish(model_dir, f"{namespace}/{args.preset}", endpoint=server.url, token="dummy")
            summary["reload"] = verify_from_hub(server.url, namespace, args.preset, model_dir, corpus)
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
