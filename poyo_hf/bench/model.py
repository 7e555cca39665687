"""``poyo-hf bench model``: POYO training throughput and batch-1 latency on the CPU.

The fixed benchmark batch (issue "POYO as a transformers model"): poyo-mp preset, 32 one-second
windows of 100 units firing at 20 Hz (Poisson), 100 output timestamps per window, 2 threads.
Measures training steps/s (forward + weighted-MSE loss + backward + AdamW step) and batch-1
inference latency (p50/p99), for poyo_hf and, when ``torch_brain`` is installed, for the
reference POYO on the same tokens in the same run, and prints the ratios. The two are timed
call by call in alternation (``time_interleaved``), so that both see the same machine state.
Training is also reported as samples (windows) per second.

``--device cuda`` runs the same measurements on a GPU: both implementations' forwards and losses
under bf16 autocast (as ``poyo-hf pretrain`` trains there), each timed call ending with a device
synchronisation. Third-party figures for the reference: 128 samples/s for POYO-mp and 57 for
POYO-1 on one GB10. No GPU was available to this project's sessions so far, so that path has
only been checked to refuse cleanly where CUDA is missing.

Where a training step goes (poyo_hf, this batch, 2 threads, torch profiler, measured 2026-11;
shares of self time): attention ``bmm`` 33% and projections (``mm`` / ``addmm``) 16%, i.e. half the step is
matrix products the reference runs too (the projections now go through oneDNN instead of MKL, see
``cpu_kernels.linear``: a step 9-17% faster in interleaved A/B runs); elementwise multiplies 10% (rotary phases); softmax 6-9%;
``cat`` 5% (the backward of the Q/K/V split); the dropout masks and the softmax-with-dropout
backward (``cpu_kernels.py``) ~3%. Before, ``F.dropout``'s ``bernoulli_`` alone took 22% (one serial
mt19937 float per element, ~44M attention weights per step) and the unfused math-path attention
most of the rest; the reference still pays both. Without ``poyo_hf.allocator``'s policy, glibc
also page-faults every large activation in afresh each step (a further ~30% on the VM this was
measured on).

Batch-1 latency. A forward is ~665 MFLOP of matrix products (encoder cross-attention 144, the six
latent layers 480, decoder and FFNs the rest), too small for torch's CPU kernels to run near the
cores' speed: MKL (``bmm``, ``addmm``, SDPA's blocks) runs its AVX2 code on this AMD EPYC, at half
the AVX-512 rate, and each oneDNN call costs ~20-40 us beyond its arithmetic. With those kernels the
``floor`` row alone was 0.40-0.47x the reference (session 8) and our forward 0.75-0.84x. So at
inference (no gradient, float32 CPU) the forward now runs on poyo_hf's compiled kernels
(``cpu_kernels``): the fused attention (scores, softmax, values; rotations and the encoder's K/V
gather folded in), the small-product linear kernel for every projection (<= 512 rows), and the
rotary phases; the prologue's constants (frequencies, latent-grid phases, target statistics) are
kept between calls. Measured (session 9, bench model, 300 batch-1 calls each): ours/ref
0.65 with the fused attention alone, 0.59 with rotations and gather folded in, 0.52 with the
prologue kept, 0.43-0.50 in ten runs with the small-product kernel and the phase loop, then
0.42-0.47 in three runs with one attention task per (window, head) (ours 5.1-6.5 ms, reference
11.0-15.1 ms, floor 2.9-3.3 ms; the reference's time swings with this shared VM's phases, ours
with it). In interleaved A/B runs the small-product kernel alone took the forward from 5.2-5.4
to 4.6-4.7 ms. The ``floor`` row times the same kernels alone (:func:`matmul_floor`), now
0.21-0.27x the reference: the rest of ours is norms, GEGLU, residual adds and Python, ~2 ms.
Measured and not adopted: bf16 autocast (no faster on this CPU: 12.7 vs 12.1 ms fp32, session 8);
``torch.compile`` of the model with the fused attention registered as a custom op (15 s to compile,
4 graph breaks in the prologue; 5.86 vs 6.30 ms eager, 0.93x: the time is in the kernels);
``torch.compile`` of a functional forward with a real-valued rotary (session 8: 0.73-0.78x our eager
time then, still ~3.4 ms above the floor); attention through per-head oneDNN products (encoder:
2.0-2.3 vs 1.0-1.05 ms SDPA); a lean functional batch-1 forward (session 8: 0.66-0.67x the
reference then, its remaining time kernels too), not adopted as a third copy of the forward.
"""

from __future__ import annotations

import argparse
import platform

import numpy as np
import torch

from .. import allocator
from .common import emit_json, percentile, print_table, set_threads, time_interleaved


def benchmark_batch(
    n_windows: int = 32, n_units: int = 100, rate_hz: float = 20.0, n_outputs: int = 100, seed: int = 0
) -> list[dict]:
    rng = np.random.default_rng(seed)
    units = [f"bench/u{i}" for i in range(n_units)]
    windows = []
    for _ in range(n_windows):
        counts = rng.poisson(rate_hz, n_units)
        unit_index = np.repeat(np.arange(n_units), counts)
        times = rng.uniform(0.0, 1.0, unit_index.size)
        order = np.argsort(times)
        windows.append(
            {
                "session_id": "bench",
                "unit_ids": units,
                "spike_times": times[order],
                "spike_unit_index": unit_index[order],
                "output_timestamps": np.linspace(0.0, 1.0, n_outputs, endpoint=False) + 0.005,
                "targets": rng.normal(size=(n_outputs, 2)),
            }
        )
    return windows


def _ours(preset: str, windows: list[dict]):
    from poyo_hf import PoyoConfig, PoyoForDecoding, PoyoProcessor

    units = windows[0]["unit_ids"]
    config = PoyoConfig.from_preset(preset, unit_vocab_size=len(units) + 1, session_vocab_size=2)
    proc = PoyoProcessor.from_config(config, {"bench": units})
    torch.manual_seed(0)
    model = PoyoForDecoding(config)
    return model, proc


def _reference(config, proc):
    try:
        from torch_brain.models import POYO
    except ImportError:
        return None
    torch.manual_seed(0)
    ref = POYO(
        sequence_length=config.sequence_length,
        latent_step=config.latent_step,
        num_latents_per_step=config.num_latents_per_step,
        dim_out=2,
        dim=config.hidden_size,
        depth=config.num_hidden_layers,
        dim_head=config.head_dim,
        cross_heads=config.num_cross_attention_heads,
        self_heads=config.num_self_attention_heads,
        ffn_dropout=config.ffn_dropout,
        lin_dropout=config.lin_dropout,
        atn_dropout=config.attention_dropout,
    )
    ref.unit_emb.initialize_vocab(proc.unit_vocab)
    ref.session_emb.initialize_vocab(proc.session_vocab)
    return ref


def matmul_floor(config, inputs: dict, readout_dim: int = 2, device: torch.device | str = "cpu"):
    """A function that runs only the matrix products and attention kernels of one batch-1 POYO
    forward on ``inputs`` (one window from the processor), with the same shapes and the same
    kernels (the model's own layer class for the projections, so the same product kernel as in the
    forward: ``cpu_kernels.small_linear`` at batch 1, else ``mm`` / ``addmm`` or oneDNN; the forward's
    attention kernel, ``cpu_kernels.attention`` where it applies, else SDPA), on random operands:
    what the forward costs if
    every norm, rotation, GEGLU, gather and Python line were free. Its time, beside both
    implementations', bounds the latency any implementation built on these kernels can reach
    (float32). Counted: the window's real tokens, its distinct (unit, token type) rows (the
    encoder projects each once) and its real output queries."""
    import torch.nn.functional as F

    from ..models.poyo import modeling_poyo
    from ..models.poyo.cpu_kernels import PoyoLinear, attention_supported

    c = config
    n_tokens = int(inputs["input_mask"].sum())
    n_rows = int(torch.unique(inputs["input_unit_index"] * c.num_token_types + inputs["input_token_type"]).numel())
    n_outputs = int(inputs["output_mask"].sum())
    D, Dh, Hx, Hs, mult = c.hidden_size, c.head_dim, c.num_cross_attention_heads, c.num_self_attention_heads, c.ffn_mult
    n_lat = c.num_latents
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)

    lat, rows, outs = r(n_lat, D), r(n_rows, D), r(n_outputs, D)
    # The projections are the model's own layer class (PoyoLinear), so each product takes the
    # forward's kernel: the small-product one at batch 1 (or F.linear / oneDNN where it does not apply).
    with torch.random.fork_rng():  # module init must not move the caller's random stream
        lin = dict(q=PoyoLinear(D, Hx * Dh, bias=False), kv=PoyoLinear(D, 2 * Hx * Dh, bias=False),
                   o=PoyoLinear(Hx * Dh, D), qkv=PoyoLinear(D, 3 * Hs * Dh, bias=False), o_s=PoyoLinear(Hs * Dh, D),
                   fc1=PoyoLinear(D, 2 * mult * D), fc2=PoyoLinear(mult * D, D), head=PoyoLinear(D, readout_dim))
    lin = {name: m.to(device) for name, m in lin.items()}
    enc_q, enc_kv = r(1, Hx, n_lat, Dh), r(1, Hx, n_tokens, Dh)
    lat_s = r(1, Hs, n_lat, Dh)
    dec_q, dec_kv = r(1, Hx, n_outputs, Dh), r(1, Hx, n_lat, Dh)
    a_x, a_s, a_d = r(n_lat, Hx * Dh), r(n_lat, Hs * Dh), r(n_outputs, Hx * Dh)
    h_lat, h_out = r(n_lat, mult * D), r(n_outputs, mult * D)

    def ffn(x, h):
        lin["fc1"](x)
        lin["fc2"](h)

    def attend(q, kv):  # the forward's attention kernel: the fused CPU one where it applies, else SDPA
        if attention_supported(q, kv, kv):
            modeling_poyo.cpu_attention(q, kv, kv)
        else:
            F.scaled_dot_product_attention(q, kv, kv)

    @torch.no_grad()
    def run():
        lin["q"](lat)  # encoder: latent queries, K/V of the distinct rows, attention, output
        lin["kv"](rows)
        attend(enc_q, enc_kv)
        lin["o"](a_x)
        ffn(lat, h_lat)
        for _ in range(c.num_hidden_layers):
            lin["qkv"](lat)
            attend(lat_s, lat_s)
            lin["o_s"](a_s)
            ffn(lat, h_lat)
        lin["q"](outs)  # decoder
        lin["kv"](lat)
        attend(dec_q, dec_kv)
        lin["o"](a_d)
        ffn(outs, h_out)
        lin["head"](outs)

    return run


def _weighted_mse(pred, labels, mask):
    sq = ((pred - labels) ** 2).mean(-1)
    w = mask.float()
    return (w * sq).sum() / w.sum()


def run(
    preset: str = "poyo-mp",
    steps: int = 10,
    latency_runs: int = 50,
    threads: int = 2,
    n_windows: int = 32,
    device: str = "cpu",
) -> dict:
    """The measurements of ``poyo-hf bench model`` as a dict (see the module docstring).

    On CUDA both implementations run their forwards (and losses) under bf16 autocast, as
    ``poyo-hf pretrain`` trains there, and every timed call ends with a device synchronisation."""
    set_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available in this torch build; use device='cpu'.")
    windows = benchmark_batch(n_windows=n_windows)
    model, proc = _ours(preset, windows)
    model.to(dev)
    batch = {k: v.to(dev) for k, v in proc(windows).items()}
    # Batch-1 inference gets what a decoder gets at run time: no labels, hence no loss (the
    # reference is called without them too).
    one = {k: v.to(dev) for k, v in proc(windows[:1]).items() if k not in ("labels", "output_weights")}
    latent_index, latent_t = model.poyo.latent_grid(dev)
    ref = _reference(model.config, proc)
    if ref is not None:
        ref.to(dev)
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def synced(fn):
        """fn; on CUDA it returns only once the device is done (timings are wall clock)."""
        if dev.type != "cuda":
            return fn

        def call():
            out = fn()
            torch.cuda.synchronize(dev)
            return out

        return call

    def timed(fn):
        """A forward under the device's autocast, synced."""

        def call():
            with autocast:
                return fn()

        return synced(call)

    def ref_inputs(b):
        B = b["input_unit_index"].shape[0]
        return dict(
            input_unit_index=b["input_unit_index"],
            input_timestamps=b["input_timestamps"],
            input_token_type=b["input_token_type"],
            input_mask=b["input_mask"],
            latent_index=latent_index.expand(B, -1),
            latent_timestamps=latent_t.expand(B, -1),
            session_index=b["session_index"],
            output_timestamps=b["output_timestamps"],
        )

    results: dict = {
        "preset": preset,
        "threads": threads,
        "windows": len(windows),
        "tokens_per_window": float(batch["input_mask"].sum(1).float().mean()),
        "outputs_per_window": int(batch["output_mask"].sum(1)[0]),
        "torch": torch.__version__,
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "autocast": "bf16" if dev.type == "cuda" else "none",
        "machine": platform.machine(),
        "malloc": allocator.policy(),  # the same for both implementations: one process
    }
    from ..models.poyo.cpu_kernels import kernels, onednn_linear_enabled

    # Which mask source our CPU training used: the compiled loop, or plain torch ops where it could
    # not be built (or POYO_HF_CPU_KERNELS=0). Built here, before any timing.
    results["cpu_dropout_kernels"] = kernels() is not None
    # Whether our larger projections (cpu_kernels.use_onednn) went through oneDNN.
    results["onednn_linear"] = onednn_linear_enabled()

    def train_step_ours():
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = model(**batch)
        out.loss.backward()
        opt.step()

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_fns = {"ours": synced(train_step_ours)}
    infer_fns = {"ours": timed(lambda: model(**one)), "floor": timed(matmul_floor(model.config, one, device=dev))}
    if ref is not None:
        ref_batch, ref_one = ref_inputs(batch), ref_inputs(one)
        labels = batch["labels"]
        mask = batch["output_mask"]
        ropt = torch.optim.AdamW(ref.parameters(), lr=1e-4)

        def train_step_ref():
            ropt.zero_grad(set_to_none=True)
            with autocast:
                pred = ref(**ref_batch)
                loss = _weighted_mse(pred.float(), torch.nan_to_num(labels), mask)
            loss.backward()
            ropt.step()

        train_fns["ref"] = synced(train_step_ref)
        infer_fns["ref"] = timed(lambda: ref(**ref_one))

    # Both implementations are timed call by call in alternation (time_interleaved): measured
    # in separate blocks, the drift of this shared machine's speed read as up to 1.6x between them.
    modules = [m for m in (model, ref) if m is not None]
    for m in modules:
        m.train()
    train_t = time_interleaved(train_fns, steps, warmup=2)
    for m in modules:
        m.eval()
    with torch.no_grad():
        lat = time_interleaved(infer_fns, latency_runs, warmup=5)
    for name in train_fns:
        results[f"{name}_train_steps_per_s"] = 1.0 / percentile(train_t[name], 0.5)
        results[f"{name}_train_samples_per_s"] = len(windows) * results[f"{name}_train_steps_per_s"]
        results[f"{name}_latency_p50_ms"] = 1000 * percentile(lat[name], 0.5)
        results[f"{name}_latency_p99_ms"] = 1000 * percentile(lat[name], 0.99)
    results["matmul_floor_p50_ms"] = 1000 * percentile(lat["floor"], 0.5)
    if ref is not None:
        results["train_speedup"] = results["ours_train_steps_per_s"] / results["ref_train_steps_per_s"]
        results["latency_ratio"] = results["ours_latency_p50_ms"] / results["ref_latency_p50_ms"]
        results["matmul_floor_ratio"] = results["matmul_floor_p50_ms"] / results["ref_latency_p50_ms"]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="poyo-hf bench model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="poyo-mp", choices=["poyo-mp", "poyo-1", "poyo-single"])
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (median reported; default 10)")
    parser.add_argument("--latency-runs", type=int, default=50, help="timed batch-1 forward passes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=32, help="windows in the training batch (the benchmark uses 32)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (bf16 autocast on cuda)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with every figure last")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.latency_runs < 1 or args.threads < 1 or args.windows < 1:
        parser.error("--steps, --latency-runs, --threads and --windows must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available in this torch build")
    r = run(args.preset, args.steps, args.latency_runs, args.threads, args.windows, args.device)
    rows = [["poyo_hf", r["ours_train_steps_per_s"], r["ours_train_samples_per_s"], r["ours_latency_p50_ms"],
             r["ours_latency_p99_ms"]]]
    rows.append(["matrix products only (floor)", "", "", r["matmul_floor_p50_ms"], ""])
    if "ref_train_steps_per_s" in r:
        rows.append(["torch_brain 0.2.1", r["ref_train_steps_per_s"], r["ref_train_samples_per_s"],
                     r["ref_latency_p50_ms"], r["ref_latency_p99_ms"]])
        rows.append(["ratio (ours/ref)", r["train_speedup"], "", r["latency_ratio"], ""])
        rows.append(["floor / ref", "", "", r["matmul_floor_ratio"], ""])
    else:
        print("(torch_brain not installed: reference columns skipped; `pip install torch-brain==0.2.1`)")
    print(f"POYO {args.preset}, {r['windows']} windows x {r['tokens_per_window']:.0f} tokens, "
          f"{r['outputs_per_window']} outputs, {args.threads} threads, {r['device']} ({r['autocast']} autocast)")
    print_table(["implementation", "train steps/s", "samples/s", "b1 latency p50 ms", "p99 ms"], rows)
    print("floor: the batch-1 forward's matrix-product and attention kernel calls alone (same shapes and kernels, every other op "
          "free), a bound for any implementation that calls these float32 kernels.")
    if args.json:
        emit_json(r)
    return 0
