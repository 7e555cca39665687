"""``poyo-hf bench ndt``: NDT batch-1 inference latency on the CPU (MC_Maze size).

One MC_Maze-sized trial (137 held-in + 45 held-out neurons = 182 channels, 140 observed + 40
forward bins of 5 ms), the released NDT shape (4 layers, 2 heads, feed-forward 128), batch 1,
``torch.inference_mode``, 2 threads by default. Measured side by side, interleaved in every
repetition so that they share the machine's load:

* ``ndt``: ``NdtForMaskedModeling(**processor(trial))`` at full context (the fused inference path,
  readout and rates included);
* ``ndt band``: the same with banded attention (``--band`` bins each side);
* ``ndt eager``: the module path with the eager attention reference;
* ``stock``: ``torch.nn.TransformerEncoder`` of the same size (pre-norm, ReLU, final LayerNorm),
  encoder only, on a (1, 180, 182) input.

Each repetition times ``--runs`` calls per implementation; the p50 and p99 reported are the
minimum over ``--repeats`` repetitions (the machine may be shared; the median over repetitions
is reported too). The paper's claim is 3.9 ms per trial (hardware not stated); our target on the
2-core CPU is p50 < 2 ms and p99 < 3.9 ms.

Where the time goes (single-trial path, ``NdtModel._fast_encode_single``): ~365 MFLOP of matmuls
(about 2.2 ms on one core through oneDNN, half that on two) plus a fixed ~13 us per oneDNN call
(37 calls). Measured and not adopted: ``torch.compile`` (inductor, 15-20 s compile, no faster
here), TorchScript (deprecated in torch 2.13; ~8% less Python overhead), SDPA or ``bmm`` for the
attention (slower than two oneDNN matmuls per head at head dim 91), zero-padding heads to 96,
folding the output projection into the values (fewer calls, more FLOPs: no gain).

Training (``--train-steps``, 0 to skip): one MC_Maze-sized training step (forward with masking,
Poisson loss, backward, AdamW; batch ``--train-batch``), the model as poyo_hf builds it (CPU
kernels shared with POYO: oneDNN linear layers, seeded dropout masks, attention dropout without
``bernoulli_``) against the same weights on plain torch layers (``nn.Linear``, ``nn.Dropout``,
SDPA with dropout: what the Hub's remote code runs without poyo_hf), interleaved call by call.
Measured 2026-11-22 (2 threads, batch 32): 1.8-2.0x.

Side by side on synthetic sessions (``--quality-sessions``; skipped with ``--skip-quality``):
the same simulated sessions (one dataset folder each) train one NDT per session
(``poyo-hf pretrain --model ndt``: NDT models one session's neurons; 20 ms bins, 40 observed + 10
forward bins, 25% of units held out) and one POYO on all of them (``poyo-hf pretrain``, the
quickstart's CPU shape). On the test split: NDT's co-bps, fp-bps and vel R^2 (ridge from its
rates, NLB style), NLB's spike-smoothing baseline (Gaussian-smoothed held-in counts, a Poisson GLM
per held-out neuron; its co-bps shows how much co-smoothing signal the data hold), POYO's
velocity R^2 (decoded directly, stitched) and the Wiener filter's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
from collections.abc import Callable

import numpy as np
import torch

from .common import emit_json, percentile, print_table, set_threads, time_calls, time_interleaved

NEURONS, HELDOUT, BINS, FORWARD = 137, 45, 140, 40


def mc_maze_model(context: int | None = None, seed: int = 0):
    from poyo_hf.models.ndt import NdtConfig, NdtForMaskedModeling, NdtProcessor

    config = NdtConfig(
        num_neurons=NEURONS,
        num_heldout_neurons=HELDOUT,
        num_bins=BINS,
        num_forward_bins=FORWARD,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=128,
        context_backward=context,
        context_forward=context,
    )
    torch.manual_seed(seed)
    return NdtForMaskedModeling(config).eval(), NdtProcessor.from_config(config)


def stock_encoder(d_model: int = NEURONS + HELDOUT, heads: int = 2, ff: int = 128, layers: int = 4) -> torch.nn.Module:
    layer = torch.nn.TransformerEncoderLayer(
        d_model, heads, ff, dropout=0.2, activation="relu", batch_first=True, norm_first=True
    )
    return torch.nn.TransformerEncoder(
        layer, layers, norm=torch.nn.LayerNorm(d_model), enable_nested_tensor=False
    ).eval()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def plain_torch_layers():
    """Build or run NDT on torch's own layers instead of poyo_hf's CPU kernels (as the remote-code
    copy of the model does without poyo_hf installed)."""
    from poyo_hf.models.ndt import modeling_ndt as mn

    saved = mn._Linear, mn._Dropout, mn._cpu_dropout_attention
    mn._Linear, mn._Dropout, mn._cpu_dropout_attention = torch.nn.Linear, torch.nn.Dropout, None
    try:
        yield
    finally:
        mn._Linear, mn._Dropout, mn._cpu_dropout_attention = saved


def train_steps(batch: int = 32, steps: int = 10, threads: int = 2, seed: int = 0) -> dict:
    """Training step time (p50, ms) of the MC_Maze-sized NDT with poyo_hf's CPU kernels and on plain
    torch layers (same initial weights), interleaved call by call."""
    set_threads(threads)
    model, _ = mc_maze_model(None, seed)
    with plain_torch_layers():
        plain, _ = mc_maze_model(None, seed)
    c = model.config
    g = torch.Generator().manual_seed(seed)
    T = c.num_bins + c.num_forward_bins
    spikes = torch.poisson(torch.full((batch, T, c.num_neurons), 0.1), generator=g)
    held = torch.poisson(torch.full((batch, T, c.num_heldout_neurons), 0.1), generator=g)

    def step_fn(m: torch.nn.Module, plain_layers: bool) -> Callable[[], None]:
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

        def step() -> None:
            with plain_torch_layers() if plain_layers else contextlib.nullcontext():
                opt.zero_grad(set_to_none=True)
                m(spikes=spikes, heldout_spikes=held).loss.backward()
                opt.step()

        return step

    t = time_interleaved({"ndt": step_fn(model, False), "plain": step_fn(plain, True)}, steps, warmup=2)
    out = {"train_batch": batch, "train_steps": steps}
    out["ndt_train_step_ms"] = 1000 * percentile(t["ndt"], 0.5)
    out["plain_train_step_ms"] = 1000 * percentile(t["plain"], 0.5)
    out["train_speedup_vs_plain"] = out["plain_train_step_ms"] / out["ndt_train_step_ms"]
    return out


def run(runs: int = 500, repeats: int = 5, threads: int = 2, band: int = 50, seed: int = 0) -> dict:
    set_threads(threads)
    rng = np.random.default_rng(seed)
    model, proc = mc_maze_model(None, seed)
    batch = dict(proc(rng.poisson(0.3, (BINS, NEURONS))))  # one trial: (1, 180, 137) + mask
    impls: dict[str, Callable[[], object]] = {"ndt": lambda: model(**batch)}
    if band > 0:
        banded, _ = mc_maze_model(band, seed)
        impls["ndt band"] = lambda: banded(**batch)
    eager, _ = mc_maze_model(None, seed)
    eager.set_attn_implementation("eager")
    impls["ndt eager"] = lambda: eager(**batch)
    stock = stock_encoder()
    x_stock = torch.randn(1, BINS + FORWARD, NEURONS + HELDOUT)
    impls["stock"] = lambda: stock(x_stock)

    load_before = os.getloadavg()
    p50s: dict[str, list[float]] = {k: [] for k in impls}
    p99s: dict[str, list[float]] = {k: [] for k in impls}
    with torch.inference_mode():
        diff = float((model(**batch).log_rates - eager(**batch).log_rates).abs().max())
        for _ in range(repeats):
            for name, fn in impls.items():
                t = time_calls(fn, runs, warmup=20)
                p50s[name].append(1000 * percentile(t, 0.5))
                p99s[name].append(1000 * percentile(t, 0.99))
    result: dict = {
        "neurons": NEURONS + HELDOUT,
        "bins": BINS + FORWARD,
        "layers": 4,
        "heads": 2,
        "feed_forward": 128,
        "threads": threads,
        "runs": runs,
        "repeats": repeats,
        "band": band,
        "max_abs_diff_vs_eager": diff,
        "load_avg_before": round(load_before[0], 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
    }
    for name in impls:
        key = name.replace(" ", "_")
        result[f"{key}_p50_ms"] = min(p50s[name])
        result[f"{key}_p99_ms"] = min(p99s[name])
        result[f"{key}_p50_ms_median_of_repeats"] = float(np.median(p50s[name]))
    result["speedup_vs_stock_p50"] = result["stock_p50_ms"] / result["ndt_p50_ms"]
    result["target_met"] = bool(result["ndt_p50_ms"] < 2.0 and result["ndt_p99_ms"] < 3.9)
    return result


NDT_QUALITY_OVERRIDES = {
    "bin_size": 0.02, "num_bins": 40, "num_forward_bins": 10,
    "embedding_dropout": 0.1, "attention_dropout": 0.1, "hidden_dropout": 0.1, "readout_dropout": 0.1,
}


def quality(out: str, sessions: int, ndt_steps: int, poyo_steps: int, seed: int = 0, trials: int = 100) -> dict:
    """Train NDT (per session) and POYO (all sessions) on the same synthetic sessions; test-split metrics."""
    import json
    from pathlib import Path

    from poyo_hf.bench.decode import build_sessions, run_one
    from poyo_hf.training.corpus import Corpus
    from poyo_hf.training.ndt_task import smoothing_baseline
    from poyo_hf.training.pretrain import PretrainArguments, train

    root = Path(out)
    folders = build_sessions(root, 1, sessions, (120, 200), trials, seed)
    poyo = run_one(folders, root / "poyo", poyo_steps, 16, seed, progress=False)
    rows = []
    for folder in folders:
        corpus = Corpus.from_sources([folder])
        sid = corpus.sessions[0]["session_id"]
        overrides = dict(NDT_QUALITY_OVERRIDES)
        run_dir = root / f"ndt_{Path(folder).name}"
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        n_units = len(corpus.sessions[0]["unit_ids"])
        # Identity embedding: the width is the neuron count, which the heads must divide; the
        # released 2 heads when it is even, else 1.
        heads = 2 if n_units % 2 == 0 else 1
        overrides["num_attention_heads"] = heads
        res = train(PretrainArguments(
            datasets=[folder], output_dir=str(run_dir), model="ndt", config_overrides=json.dumps(overrides),
            max_steps=ndt_steps, batch_size=32, learning_rate=1e-3, seed=seed, eval_split="test",
            progress=False, plots=False, logging_steps=100,
        ))
        from poyo_hf.models.ndt import NdtProcessor

        proc = NdtProcessor.from_pretrained(run_dir / "model")
        smooth = smoothing_baseline(proc, corpus.segments("test"), corpus.segments("train"))
        rows.append({
            "session_id": sid, "units": n_units, "ndt_heads": heads,
            "ndt_co_bps": res.get("co_bps"), "ndt_fp_bps": res.get("fp_bps"), "ndt_vel_r2": res["vel_r2"],
            "smoothing_co_bps": smooth.get("co_bps"), "smoothing_vel_r2": smooth["vel_r2"],
            "poyo_vel_r2": poyo["r2_per_session"][sid],
            "wiener_vel_r2": poyo.get("wiener_r2_per_session", {}).get(sid),
        })
    return {"sessions": rows, "ndt_steps": ndt_steps, "poyo_steps": poyo_steps, "seed": seed,
            "poyo_train_seconds": poyo["train_seconds"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="poyo-hf bench ndt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=500, help="timed batch-1 forward passes per repetition")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of the whole measurement (min reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--band", type=int, default=50, help="context bins each side for the banded row (0: skip)")
    parser.add_argument("--skip-latency", action="store_true", help="skip the latency measurement")
    parser.add_argument("--train-steps", type=int, default=10,
                        help="timed training steps per implementation (median reported; 0 skips the training rows)")
    parser.add_argument("--train-batch", type=int, default=32, help="trials per training batch (default 32)")
    parser.add_argument("--skip-quality", action="store_true", help="skip the NDT vs POYO training comparison")
    parser.add_argument("--quality-sessions", type=int, default=2, help="synthetic sessions for the comparison")
    parser.add_argument("--quality-trials", type=int, default=100, help="trials per synthetic session")
    parser.add_argument("--ndt-steps", type=int, default=2000, help="NDT training steps per session (batch 32)")
    parser.add_argument("--poyo-steps", type=int, default=2500, help="POYO training steps (batch 16)")
    parser.add_argument("--output-dir", default="runs/bench_ndt", help="data and runs of the comparison")
    parser.add_argument("--json", action="store_true", help="print one JSON object with every figure last")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.repeats < 1 or args.threads < 1 or args.band < 0:
        parser.error("--runs, --repeats and --threads must be >= 1 and --band >= 0")
    if args.train_steps < 0 or args.train_batch < 1:
        parser.error("--train-steps must be >= 0 and --train-batch >= 1")
    if min(args.quality_sessions, args.quality_trials, args.ndt_steps, args.poyo_steps) < 1:
        parser.error("--quality-sessions, --quality-trials, --ndt-steps and --poyo-steps must be >= 1")
    r: dict = {}
    if not args.skip_quality:
        set_threads(args.threads)
        q = quality(args.output_dir, args.quality_sessions, args.ndt_steps, args.poyo_steps, 0, args.quality_trials)
        r["quality"] = q
        print(f"NDT vs POYO on {args.quality_sessions} synthetic sessions (test split; NDT {args.ndt_steps} steps per "
              f"session, POYO {args.poyo_steps} steps on all)")
        print_table(
            ["session", "units", "NDT co-bps", "NDT fp-bps", "NDT vel R2", "smooth co-bps", "smooth vel R2",
             "POYO vel R2", "Wiener R2"],
            [[x["session_id"].split("/")[-1], x["units"], x["ndt_co_bps"], x["ndt_fp_bps"], x["ndt_vel_r2"],
              x["smoothing_co_bps"], x["smoothing_vel_r2"], x["poyo_vel_r2"], x["wiener_vel_r2"]]
             for x in q["sessions"]],
        )
        print()
    if args.train_steps:
        tr = train_steps(args.train_batch, args.train_steps, args.threads)
        r.update(tr)
        print(f"NDT training step, MC_Maze size, batch {args.train_batch}, {args.threads} threads "
              f"({args.train_steps} steps each, interleaved)")
        print_table(["implementation", "step p50 ms"], [
            ["poyo_hf NDT (CPU kernels: oneDNN linear, seeded dropout)", tr["ndt_train_step_ms"]],
            ["same model on plain torch layers", tr["plain_train_step_ms"]],
        ])
        print(f"speedup: {tr['train_speedup_vs_plain']:.2f}x")
        print()
    if args.skip_latency:
        if args.json:
            emit_json(r)
        return 0
    r.update(run(args.runs, args.repeats, args.threads, args.band))
    names = [("ndt", "poyo_hf NDT (fused inference path)"), ("ndt_band", f"poyo_hf NDT, band +-{args.band}"),
             ("ndt_eager", "poyo_hf NDT, eager modules"), ("stock", "torch.nn.TransformerEncoder")]
    rows = [
        [label, r[f"{key}_p50_ms"], r[f"{key}_p99_ms"], r[f"{key}_p50_ms_median_of_repeats"]]
        for key, label in names
        if f"{key}_p50_ms" in r
    ]
    print(f"NDT batch-1 latency: {r['neurons']} neurons x {r['bins']} bins, 4 layers, 2 heads, ff 128, "
          f"{args.threads} threads, {args.runs} runs x {args.repeats} repeats ({r['cpu']}; load "
          f"{r['load_avg_before']} -> {r['load_avg_after']})")
    print_table(["implementation", "p50 ms (min)", "p99 ms (min)", "p50 ms (median of repeats)"], rows)
    print(f"ndt vs stock p50: {r['speedup_vs_stock_p50']:.2f}x; max |fast - eager| = {r['max_abs_diff_vs_eager']:.2e}; "
          f"target p50 < 2 ms and p99 < 3.9 ms: {'met' if r['target_met'] else 'NOT met'}")
    if args.json:
        emit_json(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
