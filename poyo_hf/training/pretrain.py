"""``poyo-hf pretrain``: multi-session POYO pretraining with Accelerate.

One program for one CPU process, several CPU processes
(``ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m poyo_hf.training.pretrain ...``) and
GPUs (``accelerate launch -m poyo_hf.training.pretrain ...``, DDP or FSDP).

Recipe (Azabou et al. 2023; spec sec. 6): 1 s windows at a random offset per epoch, shuffled,
unit dropout, weighted MSE from behaviour epochs on z-scored targets (statistics stored in the
config, predictions in physical units), AdamW with lr = 3.125e-5 x global batch, flat for half
the run then cosine to lr / 1e4, gradient clipping, fp32 on CPU and bf16 autocast on GPU.

Outputs in ``output_dir``: ``metrics.jsonl`` (every logged metric, one JSON object per line),
``checkpoints/step_N`` (``Accelerator.save_state`` + stream state), ``run_config.json``,
``eval/`` (results JSON and plots) and the final ``save_pretrained`` export in ``model/``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class PretrainArguments:
    datasets: list[str] = field(metadata={"help": "dataset folders or Hub dataset repo ids (one or more)"})
    output_dir: str = field(metadata={"help": "where logs, checkpoints and the final model go"})
    model: str = field(default="poyo", metadata={"help": "poyo | ndt (NDT models one session: see --session)"})
    preset: str = field(default="poyo-mp", metadata={"help": "POYO preset: poyo-mp | poyo-1 | poyo-single"})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": 'JSON of PoyoConfig (or NdtConfig) overrides, e.g. \'{"num_hidden_layers": 2}\''},
    )
    session: str | None = field(default=None, metadata={"help": "NDT: the session to model (when several)"})
    ndt_heldout_fraction: float = field(
        default=0.25, metadata={"help": "NDT: fraction of units held out for co-smoothing (seeded choice)"}
    )
    init_from: str | None = field(default=None, metadata={"help": "start from this checkpoint (folder or Hub id)"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "windows per process per micro-batch"})
    gradient_accumulation_steps: int = 1
    learning_rate: float | None = field(
        default=None, metadata={"help": "peak LR; default 3.125e-5 x global batch (recipe's linear scaling)"}
    )
    weight_decay: float = 1e-4
    flat_fraction: float = 0.5
    final_lr_ratio: float = 1e-4
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    unit_dropout: bool = field(default=True, metadata={"help": "unit-dropout augmentation (config's min/mode/max)"})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (fp32 on CPU, bf16 on GPU) | no | bf16"})
    seed: int = 0
    logging_steps: int = 10
    eval_steps: int = 0
    save_steps: int = 0
    save_total_limit: int = 2
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in output_dir"})
    eval_split: str = "valid"
    eval_batch_size: int = 64
    shuffle_buffer: int = 2048
    prefetch_batches: int = field(
        default=2,
        metadata={"help": "batches made ahead by a worker process (0: made in the training loop)"},
    )
    progress: bool = True
    plots: bool = True
    in_memory: str = field(
        default="auto",
        metadata={"help": "hold the train segments in memory: auto (local folders under 200M spikes) | yes | no (stream)"},
    )


def _check_args(args: PretrainArguments) -> None:
    if args.max_steps < 1:
        raise ValueError(f"--max_steps must be >= 1, got {args.max_steps}.")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}.")
    if args.gradient_accumulation_steps < 1:
        raise ValueError(f"--gradient_accumulation_steps must be >= 1, got {args.gradient_accumulation_steps}.")
    if args.learning_rate is not None and not args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}.")
    if args.max_grad_norm <= 0:
        raise ValueError(f"--max_grad_norm must be > 0, got {args.max_grad_norm}.")
    if args.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise ValueError(f"--mixed_precision must be auto, no, bf16 or fp16, got {args.mixed_precision!r}.")
    if args.prefetch_batches < 0:
        raise ValueError(f"--prefetch_batches must be >= 0, got {args.prefetch_batches}.")
    if args.in_memory not in ("auto", "yes", "no"):
        raise ValueError(f"--in_memory must be auto, yes or no, got {args.in_memory!r}.")
    if args.model not in ("poyo", "ndt"):
        raise ValueError(f"--model must be poyo or ndt, got {args.model!r}.")
    if args.eval_split not in ("valid", "test"):
        raise ValueError(f"--eval_split must be valid or test, got {args.eval_split!r}.")


def build_model_and_processor(args: PretrainArguments, corpus: Any):
    from poyo_hf import PoyoConfig, PoyoForDecoding, PoyoProcessor

    readouts = corpus.readouts()
    mean, std = corpus.target_stats()
    sessions = {s["session_id"]: s["unit_ids"] for s in corpus.sessions}
    if args.init_from:
        model = PoyoForDecoding.from_pretrained(args.init_from)
        processor = PoyoProcessor.from_pretrained(args.init_from)
        for name, dim in readouts.items():
            have = model.config.readout_dims.get(name)
            if have is None or have != dim:
                raise ValueError(
                    f"the data's behaviour {name!r} has {dim} dims but the checkpoint's readouts are "
                    f"{model.config.readout_dims}; train a new readout or convert the behaviour."
                )
        for sid, units in sessions.items():
            if sid not in processor.session_vocab:
                processor.add_session(sid, units, exist_ok=True)
        model.grow_vocabularies(processor)
        return model, processor
    overrides = json.loads(args.config_overrides) if args.config_overrides else {}
    n_units = sum(len(u) for u in sessions.values())
    config = PoyoConfig.from_preset(
        args.preset,
        unit_vocab_size=n_units + 1,
        session_vocab_size=len(sessions) + 1,
        readout_dims=readouts,
        target_mean=mean,
        target_std=std,
        **overrides,
    )
    processor = PoyoProcessor.from_config(config, sessions)
    model = PoyoForDecoding(config)
    return model, processor


def _run_signature(model_config: Any, args: PretrainArguments, world: int) -> dict[str, Any]:
    cfg = model_config.to_dict()
    for k in ("transformers_version", "_attn_implementation_autoset", "dtype", "architectures", "auto_map"):
        cfg.pop(k, None)
    keep = ("datasets", "model", "session", "ndt_heldout_fraction", "preset", "max_steps", "batch_size", "gradient_accumulation_steps", "learning_rate",
            "weight_decay", "flat_fraction", "final_lr_ratio", "seed", "unit_dropout", "optimizer")
    return {"model_config": cfg, "args": {k: getattr(args, k) for k in keep}, "world_size": world}


def _latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted((output_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    ckpts = [c for c in ckpts if (c / "stream_state.json").is_file()]
    return ckpts[-1] if ckpts else None


class JsonlLogger:
    """Appends one JSON object per logged step (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(path.parent / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True, default=float) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record.get("step", 0))


def train(args: PretrainArguments) -> dict[str, Any]:
    """Run pretraining; returns the final evaluation results (main process) or {}."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed

    from ..data.stream import BackgroundBatches, PoyoWindowStream, mix_datasets
    from ..data.windows import UnitDropout
    from .corpus import Corpus
    from .evaluation import evaluate_decoder, plot_sessions, public_results, write_results
    from .optim import LR_PER_SAMPLE, FlatThenCosine, build_optimizer

    _check_args(args)
    t_start = time.perf_counter()  # wall time of this invocation, for training_info.json
    output_dir = Path(args.output_dir)
    corpus = Corpus.from_sources(args.datasets)  # validates the data before any training
    for split in ("train", args.eval_split):
        if not corpus.split_sources(split):
            raise ValueError(
                f"the {split!r} split is empty in {args.datasets}; convert the data with {split} intervals "
                f"or pick another --eval_split."
            )

    on_gpu = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
    precision = args.mixed_precision if args.mixed_precision != "auto" else ("bf16" if on_gpu else "no")
    accelerator = Accelerator(
        cpu=not on_gpu,
        mixed_precision=precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(args.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    if args.model == "ndt":
        from .ndt_task import build_ndt, ndt_session

        ndt_sid = ndt_session(corpus, args.session)["session_id"]
        model, processor = build_ndt(args, corpus)
    else:
        model, processor = build_model_and_processor(args, corpus)
    global_batch = args.batch_size * world * args.gradient_accumulation_steps
    lr = args.learning_rate if args.learning_rate is not None else LR_PER_SAMPLE * global_batch

    signature = _run_signature(model.config, args, world)
    output_dir.mkdir(parents=True, exist_ok=True)
    resume_from = None
    if args.resume:
        sig_path = output_dir / "run_config.json"
        if sig_path.is_file():
            saved = json.loads(sig_path.read_text())
            if saved != json.loads(json.dumps(signature, default=float)):
                diff = sorted(
                    k for k in set(saved["args"]) | set(signature["args"]) if saved["args"].get(k) != signature["args"].get(k)
                ) or ["model_config" if saved["model_config"] != signature["model_config"] else "world_size"]
                raise ValueError(
                    f"--resume: {output_dir} holds a run with a different configuration (differs in {diff}); "
                    "use the same arguments or a new --output_dir."
                )
        resume_from = _latest_checkpoint(output_dir)
    elif (output_dir / "checkpoints").exists() and any((output_dir / "checkpoints").iterdir()):
        raise ValueError(f"{output_dir} already holds checkpoints; pass --resume to continue or choose a new --output_dir.")
    if accelerator.is_main_process:
        (output_dir / "run_config.json").write_text(json.dumps(signature, indent=2, default=float))
        if not args.resume and (output_dir / "metrics.jsonl").exists():
            (output_dir / "metrics.jsonl").unlink()

    # Data: each process reads its own share of the segments (in memory) or shards (streaming).
    in_memory = args.in_memory == "yes" or (args.in_memory == "auto" and corpus.local and corpus.n_spikes < 200_000_000)
    if args.model == "ndt":
        from .ndt_task import NdtTrialStream, session_segments

        # One session: every process reads all its segments and takes every world-th batch.
        stream: Any = NdtTrialStream(
            session_segments(corpus.segments("train"), ndt_sid), processor, args.batch_size,
            seed=args.seed, rank=rank, world=world,
        )
    elif in_memory:
        train_ds: Any = corpus.segments("train")[rank::world]
    else:
        from datasets.distributed import split_dataset_by_node

        streams = [split_dataset_by_node(ds, rank=rank, world_size=world) for ds in corpus.streaming("train")]
        train_ds = mix_datasets(streams, seed=args.seed)
    if args.model == "poyo":
        c = model.config
        dropout = (
            UnitDropout(c.unit_dropout_min, c.unit_dropout_mode, c.unit_dropout_max, c.unit_dropout_peak)
            if args.unit_dropout
            else None
        )
        stream = PoyoWindowStream(
            train_ds, processor, batch_size=args.batch_size, train=True, unit_dropout=dropout,
            shuffle_buffer=args.shuffle_buffer, seed=args.seed * 1000 + rank, drop_last=True,
        )

    optimizer = build_optimizer(model, args.optimizer, lr, args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, FlatThenCosine(args.max_steps, args.flat_fraction, args.final_lr_ratio)
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = json.loads((resume_from / "stream_state.json").read_text())
        stream.load_state_dict(state["stream"][str(rank)] if str(rank) in state["stream"] else state["stream"]["0"])
        step = int(state["step"])
        if args.model == "ndt":  # the span-masking ramp reads the update counter (not saved in state)
            accelerator.unwrap_model(model).mask_step = step * args.gradient_accumulation_steps
        accelerator.print(f"resumed from {resume_from} at step {step}")

    logger = JsonlLogger(output_dir / "metrics.jsonl", accelerator.is_main_process)
    eval_segments = train_segments = None

    def run_eval(tag: str) -> dict[str, Any]:
        nonlocal eval_segments, train_segments
        if eval_segments is None:
            eval_segments = corpus.segments(args.eval_split)
            train_segments = corpus.segments("train")
            if args.model == "ndt":
                eval_segments = session_segments(eval_segments, ndt_sid)
        if not eval_segments:
            raise ValueError(f"the {args.eval_split!r} split is empty; nothing to evaluate.")
        if args.model == "ndt":
            from .ndt_task import evaluate_ndt

            res = evaluate_ndt(accelerator.unwrap_model(model), processor, eval_segments, train_segments,
                               batch_size=args.eval_batch_size)
        else:
            res = evaluate_decoder(accelerator.unwrap_model(model), processor, eval_segments, train_segments,
                                   batch_size=args.eval_batch_size)
        res["tag"] = tag
        return res

    if accelerator.is_main_process:
        accelerator.print(
            f"{args.model.upper()} pretraining: {len(corpus.sessions)} sessions, {sum(len(s['unit_ids']) for s in corpus.sessions)} units, "
            f"{world} process(es), global batch {global_batch}, lr {lr:.3g}, {args.max_steps} steps, precision {precision}"
        )

    pbar = None
    if args.progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        pbar = tqdm(total=args.max_steps, initial=step, desc="pretrain", dynamic_ncols=True)

    # With prefetching, a worker process makes the batches (BackgroundBatches) and its state, not
    # the stream's, is what checkpoints record. Quickstart-shaped pretraining on this project's 2-core
    # CPU VM (300 steps, median of the logged data_wait_fraction, 2 runs each): the loop waited
    # 0.53-0.64% of its time with the worker and 1.85-1.95% making the batches itself, and trained
    # 253-260 vs 235-244 windows/s, with identical losses.
    prefetch = args.prefetch_batches
    batches: Any = BackgroundBatches(stream, prefetch) if prefetch else iter(stream.epochs())
    position: Any = batches if prefetch else stream
    model.train()
    window_count = spike_count = 0
    wait_time = step_time = 0.0
    loss_acc = []
    t_log = time.perf_counter()
    device = accelerator.device
    try:
        while step < args.max_steps:
            t0 = time.perf_counter()
            for _ in range(args.gradient_accumulation_steps):
                t_wait = time.perf_counter()
                batch = next(batches)
                wait_time += time.perf_counter() - t_wait
                inputs = {k: v.to(device) for k, v in batch.items() if k not in ("window_start", "eval_mask")}
                n_windows, n_spikes = _batch_counts(batch)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss = model(**inputs).loss
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    scheduler.step() if accelerator.sync_gradients else None
                    optimizer.zero_grad(set_to_none=True)
                loss_acc.append(loss.detach().float().item())
                window_count += n_windows
                spike_count += n_spikes
            step += 1
            step_time += time.perf_counter() - t0
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{loss_acc[-1]:.4f}")
            if step % args.logging_steps == 0 or step == args.max_steps:
                losses = torch.tensor(np.mean(loss_acc), device=device)
                mean_loss = accelerator.gather(losses[None]).mean().item()
                elapsed = time.perf_counter() - t_log
                record = {
                    "step": step,
                    "epoch": position.epoch,
                    "loss": mean_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "windows_per_s": window_count * world / max(elapsed, 1e-9),
                    "spikes_per_s": spike_count * world / max(elapsed, 1e-9),
                    "data_wait_fraction": wait_time / max(step_time, 1e-9),
                    "time": time.time(),
                }
                logger.log(record)
                loss_acc, window_count, spike_count, wait_time, step_time = [], 0, 0, 0.0, 0.0
                t_log = time.perf_counter()
            if args.save_steps and step % args.save_steps == 0 and step < args.max_steps:
                _save_checkpoint(accelerator, output_dir, step, position, args.save_total_limit)
            if args.eval_steps and step % args.eval_steps == 0 and step < args.max_steps and accelerator.is_main_process:
                res = run_eval(f"step_{step}")
                logger.log({"step": step, "eval_r2": res["r2"], "eval_wiener_r2": res.get("wiener_r2")})
                model.train()
    finally:
        batches.close()  # the worker process, or the stream's generator
    if pbar is not None:
        pbar.close()
    accelerator.wait_for_everyone()
    results: dict[str, Any] = {}
    if accelerator.is_main_process:
        final_dir = output_dir / "model"
        tmp = output_dir / ".model.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
        res = run_eval("final")
        results = public_results(res)
        results.update(
            dataset_sources=corpus.sources,
            split=args.eval_split,
            steps=args.max_steps,
            global_batch=global_batch,
            learning_rate=lr,
            processes=world,
            device=str(device),
            precision=precision,
            model=args.model,
            preset=args.preset if args.model == "poyo" else None,
            n_parameters=sum(p.numel() for p in unwrapped.parameters()),
        )
        write_results(output_dir / "eval" / "results.json", results)
        write_results(final_dir / "eval_results.json", results)
        if args.plots and args.model == "poyo":
            plots = plot_sessions(res, eval_segments, output_dir / "eval")
            results["plots"] = [str(p) for p in plots]
            for plot in plots:  # the checkpoint carries its plots (publish uploads them with the card)
                (final_dir / "eval").mkdir(exist_ok=True)
                shutil.copy2(plot, final_dir / "eval" / plot.name)
        info = training_info(
            args,
            corpus,
            device=str(device),
            processes=world,
            precision=precision,
            steps=step,
            wall_seconds=time.perf_counter() - t_start,
            train_windows_seen=step * global_batch,
        )
        write_results(final_dir / "training_info.json", info)
        logger.log({"step": step, "final_eval_r2": results["r2"], "final_wiener_r2": results.get("wiener_r2")})
    accelerator.wait_for_everyone()
    # Free the DDP wrapper before the process group is destroyed. Its C++ Reducer holds the
    # group; freed last (at this function's return, with the GIL held) it runs
    # ~ProcessGroupGloo, which waits for gloo's worker thread while that thread waits for the GIL
    # to drop a finished all-gather's Python tensors (pytorch/pytorch#56297). One rank then hung
    # at exit in the 2-process test. Freed here, the Reducer only drops a reference, and
    # destroy_process_group() (end_training) releases the GIL while the group is torn down.
    model = optimizer = scheduler = None  # noqa: F841  (our last references; run_eval is done)
    accelerator.free_memory()  # the accelerator's references, then gc.collect() for any cycles
    accelerator.end_training()
    return results


def _batch_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(windows, input spikes) of a POYO or NDT batch, for the throughput log."""
    if "input_unit_index" in batch:  # POYO: spike tokens under the input mask
        return int(batch["input_unit_index"].shape[0]), int((batch["input_mask"] & (batch["input_token_type"] == 0)).sum())
    return int(batch["spikes"].shape[0]), int(batch["spikes"].sum())  # NDT: held-in counts


def training_info(
    args: PretrainArguments,
    corpus: Any,
    *,
    device: str,
    processes: int,
    precision: str,
    steps: int,
    wall_seconds: float,
    train_windows_seen: int,
) -> dict[str, Any]:
    """The ``training_info.json`` of an exported checkpoint (contract: /tmp/coord/INTERFACE.md).

    Dataset provenance comes from :meth:`Corpus.provenance`. ``train_windows_seen`` is exact:
    every optimizer step sees ``global batch`` windows (the stream drops incomplete batches).
    """
    import dataclasses

    import transformers

    return {
        "kind": "full-finetune" if args.init_from else "pretrain",
        "base_model": args.init_from,
        "base_revision": None,
        "datasets": corpus.provenance(),
        "recipe": json.loads(json.dumps(dataclasses.asdict(args), default=str)),
        "compute": {
            "device": device,
            "processes": processes,
            "precision": {"no": "fp32"}.get(precision, precision),
            "steps": steps,
            "wall_seconds": float(wall_seconds),
            "train_windows_seen": int(train_windows_seen),
        },
        "software": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def _save_checkpoint(accelerator: Any, output_dir: Path, step: int, stream: Any, limit: int) -> None:
    ckpt = output_dir / "checkpoints" / f"step_{step}"
    accelerator.save_state(str(ckpt))
    states = [None] * accelerator.num_processes
    local = stream.state_dict()
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        dist.all_gather_object(states, local)
    else:
        states = [local]
    if accelerator.is_main_process:
        # Written last: a checkpoint folder without it is incomplete and ignored on resume.
        tmp = ckpt / "stream_state.json.tmp"
        tmp.write_text(json.dumps({"step": step, "stream": {str(i): s for i, s in enumerate(states)}}))
        os.replace(tmp, ckpt / "stream_state.json")
        done = sorted((output_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        for old in done[:-limit] if limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    import poyo_hf  # noqa: F401  (Auto registration)

    parser = HfArgumentParser(PretrainArguments)
    parser.prog = "poyo-hf pretrain"
    parser.description = __doc__.split("\n\n")[0]
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        results = train(args)
    except ValueError as err:
        print(f"poyo-hf pretrain: error: {err}", file=sys.stderr)
        return 2
    if results:
        print(json.dumps({"r2": results["r2"], "wiener_r2": results.get("wiener_r2")}, default=float))
    return 0


if __name__ == "__main__":
    # torchrun / accelerate launch -m bypass the poyo-hf command, which applies this itself.
    from poyo_hf.allocator import keep_freed_memory

    keep_freed_memory()
    raise SystemExit(main())
