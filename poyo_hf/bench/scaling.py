"""``poyo-hf bench scaling``: POYO cost per window as spikes per window and units grow.

For the poyo-mp preset and a batch of ``--batch`` one-second windows, each point reports

* time per window of a training step (forward + weighted-MSE loss + backward; median of
  ``--repeats``) and of inference (forward under ``torch.inference_mode``), and
* peak memory per window of the training step and of inference.

Sweeps: spikes per window 1x, 2x, 4x, 8x the base (100 units at 20 Hz, i.e. the rate grows
20 -> 160 Hz with 100 units) and units 100 -> 1000 at 20 Hz. The bound checked is
time(4x spikes) <= 4.2 x time(1x) for the training step (inference ratio printed beside it).

Then the largest batch of 1 s windows (100 units at 20 Hz) that fits in ``--budget-gib`` (8 GiB)
for **poyo-1 training** (forward + backward + AdamW step, so parameters, gradients and both AdamW
moments are held): peak memory is measured at ``--fit-batches`` (default 2, 4, 8), a line
``peak = fixed + per_window * batch`` is fitted by least squares, the predicted largest batch
is ``floor((budget - fixed) / per_window)``, and with ``--verify`` that batch is run once and its
measured peak printed beside the budget.

What "peak memory" means here:

* CPU: each point runs in a fresh Python subprocess (inference is measured first, then
  training, which needs more, over the same baseline). The baseline is the resident set size
  (``/proc/self/statm``) after the batch is built and before the model is (so the model's
  weights - and for the poyo-1 fit its gradients and AdamW moments - count). At the baseline
  the kernel's high-water mark is reset (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and
  the peak is ``VmHWM`` from ``/proc/self/status`` after the first call and the timed repeats.
  Without the reset, a transient before the baseline (imports, building the batch) can set a
  mark that the call never reaches, and every batch size then reads the same peak (a CI run read
  0.172 GiB at batch 1 and at batch 3). Where ``clear_refs`` is not writable (other systems,
  locked-down containers) the lifetime ``ru_maxrss`` is read instead, with that caveat.
  Peak minus baseline, divided by the batch size, is reported. PyTorch's CPU allocator does not
  cache freed blocks, and the point subprocesses leave glibc's default policy in place (they
  never call ``poyo_hf.allocator.keep_freed_memory``, whose kept pages would hide reuse from
  ``VmHWM``), so this is what the call needed from the OS (the interpreter's own
  allocations during the call are included; they are small next to the activations).
* CUDA: the same order in this process, with ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats`` minus the memory allocated at the baseline (tensors, not the
  caching allocator's reserved pool).

Times are medians of ``--repeats`` calls after one untimed first call.

On CUDA the forward runs under bf16 autocast (rotary phases stay float32 inside the model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from .common import emit_json, percentile, print_table, set_threads

BOUND = 4.2  # time(4x spikes) / time(1x) must stay at or below this (the linearity bound)
GIB = 1024**3


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset: bool) -> int:
    """``VmHWM`` since the last reset, else the lifetime ``ru_maxrss``."""
    if reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _windows(batch: int, n_units: int, rate_hz: float, n_outputs: int = 100, seed: int = 0) -> list[dict]:
    """Poisson windows of ``n_units`` at ``rate_hz``: the model benchmark's generator."""
    from .model import benchmark_batch

    return benchmark_batch(batch, n_units, rate_hz, n_outputs, seed)


class _Meter:
    """Peak memory of one call: CUDA allocator statistics, or the process RSS high-water mark."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.source = "torch.cuda.max_memory_allocated"
        else:
            self.base = _rss_bytes()
            self.reset = _reset_peak_rss()
            self.source = "VmHWM since reset" if self.reset else "ru_maxrss (lifetime; no reset possible)"

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return _peak_rss_bytes(self.reset) - self.base


def _measure_point(
    preset: str,
    batch: int,
    n_units: int,
    rate_hz: float,
    device: str,
    repeats: int,
    modes: tuple[str, ...] = ("infer", "train"),
    optimizer: bool = False,
) -> dict:
    """Measure ``modes`` in order in this process: ``{mode: {"seconds", "peak_bytes"}}`` plus
    ``tokens_per_window``. Inference goes first: peaks are read as a high-water mark over one
    baseline, and a training step needs more memory than inference on the same batch."""
    from ..models.poyo import PoyoConfig, PoyoForDecoding, PoyoProcessor

    dev = torch.device(device)
    meter = _Meter(dev)
    windows = _windows(batch, n_units, rate_hz)
    config = PoyoConfig.from_preset(preset, unit_vocab_size=n_units + 1, session_vocab_size=2)
    processor = PoyoProcessor.from_config(config, {"bench": windows[0]["unit_ids"]})
    inputs = processor(windows).to(dev)
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    meter.start()  # before the model: weights (and gradients, AdamW state) count
    torch.manual_seed(0)
    model = PoyoForDecoding(config).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if optimizer else None

    def call(mode: str) -> None:
        if mode == "infer":
            with torch.inference_mode(), autocast:
                model(**inputs)
        else:
            with autocast:
                loss = model(**inputs).loss
            loss.backward()
            if opt is not None:
                opt.step()  # AdamW moments are allocated at the first step and then kept
                opt.zero_grad(set_to_none=False)  # gradients stay allocated, as in a training loop
            else:
                model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    out: dict = {"tokens_per_window": float(inputs["input_mask"].sum()) / batch}
    for mode in modes:
        model.train(mode == "train")
        call(mode)  # untimed first call (lazy initialisation), inside the memory measurement
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call(mode)
            times.append(time.perf_counter() - t0)
        out[mode] = {"seconds": percentile(times, 0.5), "peak_bytes": int(meter.peak())}
    out["peak_source"] = meter.source
    return out


def _point(args: dict, in_process: bool) -> dict:
    """Run :func:`_measure_point` in a fresh subprocess (CPU) or in this process (CUDA)."""
    if in_process:
        if torch.device(args["device"]).type == "cuda":
            torch.cuda.empty_cache()
        return _measure_point(**args)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "poyo_hf.bench.scaling",
            "--_point",
            json.dumps(args),
            "--threads",
            str(torch.get_num_threads()),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if res.returncode != 0:
        raise RuntimeError(f"scaling point {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(
    batch: int = 8,
    repeats: int = 3,
    multipliers: tuple[int, ...] = (1, 2, 4, 8),
    unit_counts: tuple[int, ...] = (100, 300, 1000),
    base_units: int = 100,
    base_rate: float = 20.0,
    fit_batches: tuple[int, ...] = (2, 4, 8),
    budget_gib: float = 8.0,
    verify: bool = False,
    threads: int = 2,
    device: str = "cpu",
    preset: str = "poyo-mp",
    max_batch_preset: str = "poyo-1",
) -> dict:
    set_threads(threads)
    in_process = torch.device(device).type == "cuda"

    done: dict[tuple[int, float], dict] = {}

    def measure(n_units: int, rate: float) -> dict:
        if (n_units, rate) in done:  # the 1x spike point is also the base of the unit sweep
            return dict(done[n_units, rate])
        row = {"units": n_units, "rate_hz": rate}
        p = _point(
            dict(preset=preset, batch=batch, n_units=n_units, rate_hz=rate, device=device, repeats=repeats), in_process
        )
        row["tokens_per_window"] = p["tokens_per_window"]
        row["peak_source"] = p["peak_source"]
        for mode in ("train", "infer"):
            row[f"{mode}_ms_per_window"] = 1000 * p[mode]["seconds"] / batch
            row[f"{mode}_peak_mib_per_window"] = p[mode]["peak_bytes"] / batch / 2**20
        done[n_units, rate] = dict(row)
        return row

    spikes = []
    for m in multipliers:
        row = measure(base_units, base_rate * m)
        row["spike_multiplier"] = m
        spikes.append(row)
    units = [measure(u, base_rate) for u in unit_counts]
    base = next(r for r in spikes if r["spike_multiplier"] == 1) if 1 in multipliers else None
    four = next((r for r in spikes if r["spike_multiplier"] == 4), None)
    result: dict = {
        "preset": preset,
        "device": device,
        "threads": threads,
        "batch": batch,
        "repeats": repeats,
        "bound_4x": BOUND,
        "spike_sweep": spikes,
        "unit_sweep": units,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    if base is not None and four is not None:
        result["train_ratio_4x"] = four["train_ms_per_window"] / base["train_ms_per_window"]
        result["infer_ratio_4x"] = four["infer_ms_per_window"] / base["infer_ms_per_window"]
        result["pass_4x"] = result["train_ratio_4x"] <= BOUND and result["infer_ratio_4x"] <= BOUND

    # Largest poyo-1 training batch in the budget: linear fit of peak memory against batch size.
    def train_point(b: int) -> dict:
        """One poyo-1 training step (fwd + bwd + AdamW) at batch ``b``: seconds and peak bytes."""
        point = dict(
            preset=max_batch_preset, batch=b, n_units=base_units, rate_hz=base_rate, device=device, repeats=1,
            modes=("train",), optimizer=True,
        )
        return _point(point, in_process)["train"]

    fits = []
    for b in fit_batches:
        t = train_point(b)
        fits.append({"batch": b, "peak_gib": t["peak_bytes"] / GIB, "seconds": t["seconds"]})
    mb: dict = {"preset": max_batch_preset, "budget_gib": budget_gib, "points": fits}
    if len(fits) >= 2:
        slope, fixed = np.polyfit([f["batch"] for f in fits], [f["peak_gib"] for f in fits], 1)
        mb["fixed_gib"] = float(fixed)
        mb["per_window_gib"] = float(slope)
        mb["predicted_max_batch"] = int(math.floor((budget_gib - fixed) / slope)) if slope > 0 else None
        if verify and mb["predicted_max_batch"]:
            mb["verified_peak_gib"] = train_point(mb["predicted_max_batch"])["peak_bytes"] / GIB
            mb["verified_fits"] = mb["verified_peak_gib"] <= budget_gib
    result["max_batch"] = mb
    return result


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="poyo-hf bench scaling", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8, help="windows per batch for the sweeps (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per point, median reported (default 3)")
    parser.add_argument("--multipliers", type=_ints, default=(1, 2, 4, 8), help="spike multipliers (default 1,2,4,8)")
    parser.add_argument("--units", type=_ints, default=(100, 300, 1000), help="unit counts (default 100,300,1000)")
    parser.add_argument(
        "--fit-batches", type=_ints, default=(2, 4, 8), help="poyo-1 batch sizes for the memory fit (default 2,4,8)"
    )
    parser.add_argument("--budget-gib", type=float, default=8.0, help="memory budget for the max batch (default 8)")
    parser.add_argument("--verify", action="store_true", help="also run the predicted max batch once and measure it")
    parser.add_argument(
        "--max-batch-preset",
        default="poyo-1",
        choices=["poyo-mp", "poyo-1", "poyo-single"],
        help="preset of the max-batch fit (default poyo-1)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (bf16 autocast on cuda)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with every figure last")
    parser.add_argument("--_point", help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    args = parser.parse_args(argv)
    if args._point:
        set_threads(args.threads)
        point = json.loads(args._point)
        point["modes"] = tuple(point.get("modes", ("infer", "train")))
        print(json.dumps(_measure_point(**point)))
        return 0
    if args.batch < 1 or args.repeats < 1 or args.threads < 1 or args.budget_gib <= 0:
        parser.error("--batch, --repeats and --threads must be >= 1 and --budget-gib > 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available in this torch build")
    r = run(
        args.batch,
        args.repeats,
        args.multipliers,
        args.units,
        fit_batches=args.fit_batches,
        budget_gib=args.budget_gib,
        verify=args.verify,
        threads=args.threads,
        device=args.device,
        max_batch_preset=args.max_batch_preset,
    )
    print(f"POYO {r['preset']} scaling, batch {r['batch']} x 1 s windows, {r['threads']} threads, {r['device']}")
    headers = [
        "units",
        "Hz",
        "tokens/window",
        "train ms/window",
        "infer ms/window",
        "train peak MiB/window",
        "infer peak MiB/window",
    ]

    def row(x: dict) -> list:
        return [
            x["units"],
            x["rate_hz"],
            x["tokens_per_window"],
            x["train_ms_per_window"],
            x["infer_ms_per_window"],
            x["train_peak_mib_per_window"],
            x["infer_peak_mib_per_window"],
        ]

    print(f"\nspikes per window grow (100 units, rate x {', '.join(str(m) for m in args.multipliers)}):")
    print_table(["x"] + headers, [[x["spike_multiplier"]] + row(x) for x in r["spike_sweep"]])
    print("\nunits grow (20 Hz):")
    print_table(headers, [row(x) for x in r["unit_sweep"]])
    if "train_ratio_4x" in r:
        verdict = "pass" if r["pass_4x"] else "FAIL"
        print(
            f"\ntime(4x)/time(1x): train {r['train_ratio_4x']:.2f}, inference {r['infer_ratio_4x']:.2f} "
            f"(bound {BOUND}): {verdict}"
        )
    mb = r["max_batch"]
    print(f"\n{mb['preset']} training (fwd+bwd+AdamW) peak memory vs batch:")
    print_table(["batch", "peak GiB", "step s"], [[f["batch"], f["peak_gib"], f["seconds"]] for f in mb["points"]])
    if "predicted_max_batch" in mb:
        print(
            f"fit: {mb['fixed_gib']:.3f} GiB + {mb['per_window_gib'] * 1024:.1f} MiB/window -> largest batch in "
            f"{mb['budget_gib']:g} GiB: {mb['predicted_max_batch']}"
            + (
                f" (measured {mb['verified_peak_gib']:.2f} GiB: {'fits' if mb['verified_fits'] else 'does NOT fit'})"
                if "verified_peak_gib" in mb
                else " (predicted; --verify measures it)"
            )
        )
    if args.json:
        emit_json(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
