"""``poyo-hf evaluate``: stitched R^2 of a checkpoint on a split, beside the Wiener filter
(NDT checkpoints: the NLB metrics co-bps, fp-bps and vel R^2).

Sliding 1 s windows with a 0.5 s step over every segment of the split, predictions at the same
timestamp averaged, R^2 per session on the task's eval samples, averaged over sessions; a
Wiener filter fit per session on its train split is scored on exactly the same samples.
Writes ``results.json`` and PNG plots of decoded vs true velocity to ``--output_dir``.

An NDT checkpoint (``config.model_type == "ndt"``) is scored on its session's trials with the
NLB metrics instead (:func:`poyo_hf.training.ndt_task.evaluate_ndt`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class EvaluateArguments:
    checkpoint: str = field(metadata={"help": "checkpoint folder or Hub model id"})
    datasets: list[str] = field(metadata={"help": "dataset folders or Hub dataset repo ids"})
    output_dir: str = field(metadata={"help": "where results.json and the plots go"})
    split: str = field(default="test", metadata={"help": "valid | test"})
    batch_size: int = 64
    step: float = field(default=0.5, metadata={"help": "window step of the evaluation tiling (s)"})
    baseline: bool = field(default=True, metadata={"help": "also score a per-session Wiener filter"})
    plots: bool = True
    revision: str | None = None


def evaluate(args: EvaluateArguments) -> dict[str, Any]:
    from ..hub.loading import load_checkpoint
    from .corpus import Corpus
    from .evaluation import evaluate_decoder, plot_sessions, public_results, write_results

    if args.split not in ("train", "valid", "test"):
        raise ValueError(f"--split must be train, valid or test, got {args.split!r}.")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}.")
    if args.step <= 0:
        raise ValueError(f"--step must be > 0, got {args.step}.")
    corpus = Corpus.from_sources(args.datasets)
    model, processor = load_checkpoint(args.checkpoint, revision=args.revision)
    if model.config.model_type == "ndt":
        return _evaluate_ndt(args, corpus, model, processor)
    missing = [s["session_id"] for s in corpus.sessions if s["session_id"] not in processor.session_vocab]
    if missing:
        raise ValueError(
            f"sessions {missing[:5]} are not in the checkpoint's vocabulary; adapt the model to them first "
            "(`poyo-hf adapt`) or evaluate on the sessions it was trained on."
        )
    segments = corpus.segments(args.split)
    if not segments:
        raise ValueError(f"the {args.split!r} split of {args.datasets} is empty.")
    train_segments = corpus.segments("train") if args.baseline else None
    res = evaluate_decoder(model, processor, segments, train_segments, batch_size=args.batch_size,
                           step=args.step, with_baseline=args.baseline)
    results = public_results(res)
    results.update(checkpoint=args.checkpoint, dataset_sources=corpus.sources, split=args.split)
    out = Path(args.output_dir)
    write_results(out / "results.json", results)
    if args.plots:
        results["plots"] = [str(p) for p in plot_sessions(res, segments, out)]
    return results


def _evaluate_ndt(args: EvaluateArguments, corpus: Any, model: Any, processor: Any) -> dict[str, Any]:
    from .evaluation import write_results
    from .ndt_task import evaluate_ndt

    units = set(processor.heldin_unit_ids + processor.heldout_unit_ids)
    sessions = [s["session_id"] for s in corpus.sessions if units <= set(s["unit_ids"])]
    if not sessions:
        raise ValueError(
            f"no session of {args.datasets} has the checkpoint's {len(units)} units; an NDT model only "
            "evaluates on the session (neurons) it was trained on."
        )
    segments = [s for s in corpus.segments(args.split) if s.session_id == sessions[0]]
    if not segments:
        raise ValueError(f"the {args.split!r} split of session {sessions[0]!r} is empty.")
    results = evaluate_ndt(model, processor, segments, corpus.segments("train"), batch_size=args.batch_size,
                           with_baseline=args.baseline)
    results.update(checkpoint=args.checkpoint, dataset_sources=corpus.sources, split=args.split, model="ndt")
    write_results(Path(args.output_dir) / "results.json", results)
    return results


def format_table(results: dict[str, Any]) -> str:
    if results.get("model") == "ndt":
        keys = [k for k in ("co_bps", "fp_bps", "vel_r2", "wiener_r2") if k in results]
        return "\n".join([f"NDT on {results['session_id']} ({results['split']}):"] +
                          [f"  {k:<10} {results[k]:8.4f}" for k in keys])
    rows = ["session                                   POYO R^2   Wiener R^2", "-" * 64]
    wiener = results.get("wiener_r2_per_session", {})
    for sid, r2 in sorted(results["r2_per_session"].items()):
        w = wiener.get(sid)
        rows.append(f"{sid:<40}  {r2:8.3f}   {w if w is None else format(w, '8.3f')}")
    rows.append("-" * 64)
    w = results.get("wiener_r2")
    rows.append(f"{'mean':<40}  {results['r2']:8.3f}   {w if w is None else format(w, '8.3f')}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    import poyo_hf  # noqa: F401  (Auto registration)

    parser = HfArgumentParser(EvaluateArguments)
    parser.prog = "poyo-hf evaluate"
    parser.description = __doc__.split("\n\n")[0]
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        results = evaluate(args)
    except ValueError as err:
        print(f"poyo-hf evaluate: error: {err}", file=sys.stderr)
        return 2
    print(format_table(results))
    print(json.dumps({"r2": results["r2"], "wiener_r2": results.get("wiener_r2")}, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
