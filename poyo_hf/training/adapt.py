"""``poyo-hf adapt BASE NEW_SESSION_DATA``: few-shot adaptation of a pretrained POYO to an unseen
session, with the stock ``transformers.Trainer``.

Two routes (Azabou et al. 2023, sec. 3.5; spec sec. 7):

* **unit identification** (``--mode unit-identification``): the new session's units and its
  session id get new embedding rows (N(0, 0.02)); everything else is frozen. Only the NEW rows
  change: the frozen tensors have ``requires_grad=False`` and a gradient hook zeroes the rows of
  the base's own units and sessions, which sit in the no-weight-decay group (decoupled weight
  decay would otherwise still shrink them). Outputs can be saved as a small session delta
  (:mod:`poyo_hf.training.session_delta`).
* **full fine-tuning** (``--mode full-finetune``): unit identification for the first
  ``--ui-epochs`` (default 10 % of the run, the reference's 10 of 100 epochs), then every
  parameter is trained. The optimizer holds all parameters from the start; frozen ones have no
  gradient and AdamW skips them, so unfreezing is a ``requires_grad`` flip in a callback.

Recipe defaults (spec sec. 7): batch 128, lr 1e-4, 100 epochs, weight decay 1e-4, unit dropout and
a fresh random crop of every window each time it is drawn. ``--num-train-trials K`` /
``--num-train-seconds T`` keep only the first K trials / T seconds of the train split (session
time order) to simulate few labels. Evaluation stitches 1 s windows with a 0.5 s step on the held-out
split and scores a Wiener filter fit on the same labelled data; Trainer's own ``evaluate``
reports the same stitched R^2 through ``compute_metrics``.

Outputs in ``--output_dir``: ``model/`` (``save_pretrained`` folder with ``eval_results.json`` and
``training_info.json``), ``session_delta/`` (unit identification), ``eval/`` (results and plots),
``trainer/`` (Trainer logs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers import TrainerCallback

from ..data.windows import PoyoWindowCollator, Segment, UnitDropout, eval_windows

MODES = ("unit-identification", "full-finetune")
# Modes of the programmatic API; "from-scratch" (a fresh model of the base's shape trained on the
# same labels) is the baseline of the few-shot curve, not something one publishes.
_ALL_MODES = (*MODES, "from-scratch")
EMBEDDING_PARAMS = ("poyo.unit_emb.weight", "poyo.session_emb.weight")
# Extra eval tensors Trainer gathers next to the labels, so compute_metrics can stitch exactly as
# evaluate_decoder does (window start + query times -> session clock; eval mask).
LABEL_NAMES = ["labels", "eval_mask", "query_mask", "window_start", "output_timestamps"]


@dataclass
class AdaptArguments:
    base: str = field(metadata={"help": "pretrained checkpoint: folder or Hub model id"})
    data: str = field(metadata={"help": "dataset folder or Hub dataset id holding the new session"})
    output_dir: str = field(default="runs/adapt", metadata={"help": "where the model, delta, results and plots go"})
    mode: str = field(default="unit-identification", metadata={"help": "unit-identification | full-finetune"})
    base_revision: str | None = field(default=None, metadata={"help": "branch, tag or commit of a Hub base"})
    session_id: str | None = field(default=None, metadata={"help": "the new session (needed if the data has several)"})
    num_train_trials: int | None = field(default=None, metadata={"help": "keep the first K trials of the train split"})
    num_train_seconds: float | None = field(default=None, metadata={"help": "keep the first T s of the train split"})
    num_train_epochs: float = field(default=100.0, metadata={"help": "epochs over the kept windows (recipe: 100)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; overrides epochs when > 0"})
    min_steps: int = field(
        default=0, metadata={"help": "raise the epoch count until the run has at least this many steps"}
    )
    ui_epochs: float | None = field(
        default=None, metadata={"help": "full-finetune: unit-identification epochs first (default 10%% of the run)"}
    )
    batch_size: int = field(default=128, metadata={"help": "windows per step (recipe: 128)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate (recipe: 1e-4)"})
    embedding_learning_rate: float | None = field(
        default=None, metadata={"help": "learning rate of the embedding tables (default: --learning_rate)"}
    )
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay of trunk weights (recipe: 1e-4)"})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "a transformers scheduler name"})
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    unit_dropout: bool = field(default=True, metadata={"help": "unit-dropout augmentation (config's min/mode/max)"})
    freeze: list[str] | None = field(
        default=None, metadata={"help": "regexes of parameter names kept frozen in every phase"}
    )
    namespace_units: bool = field(
        default=False, metadata={"help": "prefix the new session's unit ids with its session id (avoids collisions)"}
    )
    readout: str | None = field(default=None, metadata={"help": "base readout to decode the new behaviour with"})
    target_scale: float = field(
        default=1.0, metadata={"help": "multiply the new behaviour by this (e.g. 0.1: mm/s data, cm/s base)"}
    )
    eval_split: str = field(default="test", metadata={"help": "held-out split of the new session: valid | test"})
    eval_batch_size: int = 64
    seed: int = 0
    logging_steps: int = 10
    plots: bool = True
    save_delta: bool = field(default=True, metadata={"help": "unit-identification: also write session_delta/"})
    push_to_hub: str | None = field(default=None, metadata={"help": "publish the adapted checkpoint to this repo"})
    push_delta_to_hub: str | None = field(default=None, metadata={"help": "publish the session delta to this repo"})
    progress: bool = True


# ------------------------------------------------------------------------------ base model


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_base(base: str, revision: str | None = None) -> dict[str, Any]:
    """Where the base checkpoint is: ``{"base_model", "base_revision", "local_dir", "weights_sha256"}``.

    A folder is used as is (``base_revision`` None, the weights' sha256 pins its content); a Hub id
    is resolved to the exact commit first (``model_info(...).sha``) and that commit is downloaded,
    so a branch moving later cannot change what was adapted.
    """
    path = Path(base)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"--base_revision {revision!r} applies to Hub ids, but {base!r} is a local folder.")
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise ValueError(f"base {base!r} has no model.safetensors; give a save_pretrained folder.")
        return {
            "base_model": str(base),
            "base_revision": None,
            "local_dir": path,
            "weights_sha256": sha256_file(weights),
        }
    if path.exists():
        raise ValueError(f"base {base!r} is a file; give a checkpoint folder or a Hub model id.")
    from huggingface_hub import HfApi, snapshot_download

    try:
        sha = HfApi().model_info(base, revision=revision).sha
        local = Path(snapshot_download(base, revision=sha))
    except Exception as err:  # RepositoryNotFound, RevisionNotFound, offline, ...
        raise ValueError(f"cannot resolve base model {base!r} (revision {revision!r}): {err}") from err
    return {
        "base_model": base,
        "base_revision": sha,
        "local_dir": local,
        "weights_sha256": sha256_file(local / "model.safetensors"),
    }


def load_base(base: str, revision: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, processor, resolved)`` of a base checkpoint (see :func:`resolve_base`)."""
    from poyo_hf.hub.loading import load_checkpoint

    resolved = resolve_base(base, revision)
    model, processor = load_checkpoint(resolved["local_dir"])
    return model, processor, resolved


# ------------------------------------------------------------------------------ data


def crop_segment(seg: Segment, a: float, b: float) -> Segment | None:
    """The part of ``seg`` inside ``[a, b)`` (None when empty); arrays are views where possible."""
    a, b = max(a, seg.start), min(b, seg.end)
    if b <= a:
        return None
    i0, i1 = np.searchsorted(seg.spike_times, (a, b), side="left")
    j0, j1 = np.searchsorted(seg.behavior_timestamps, (a, b), side="left")
    keep_trials = (seg.trial_start >= a) & (seg.trial_start < b)
    return dataclasses.replace(
        seg,
        start=float(a),
        end=float(b),
        spike_times=seg.spike_times[i0:i1],
        spike_unit_index=seg.spike_unit_index[i0:i1],
        behavior_timestamps=seg.behavior_timestamps[j0:j1],
        behavior_values=seg.behavior_values[j0:j1],
        weights=seg.weights[j0:j1],
        eval_mask=seg.eval_mask[j0:j1],
        trial_start=seg.trial_start[keep_trials],
        trial_end=seg.trial_end[keep_trials],
        unit_rows=None,
        session_row=None,
    )


def limit_train_segments(
    segments: Sequence[Segment], num_trials: int | None = None, num_seconds: float | None = None
) -> list[Segment]:
    """The first ``num_trials`` trials (with the gaps between them) or the first ``num_seconds``
    seconds of labelled time of ``segments``, in session time order.

    Trials come from the segments' ``trial_start`` / ``trial_end`` (the dataset's trials that start
    in each segment); the kept data ends where the K-th trial ends.
    """
    segs = sorted(segments, key=lambda s: s.start)
    if num_trials is not None and num_seconds is not None:
        raise ValueError("give --num_train_trials or --num_train_seconds, not both.")
    if num_trials is not None:
        if num_trials < 1:
            raise ValueError(f"--num_train_trials {num_trials} leaves no labelled windows; give at least 1 trial.")
        ends = np.sort(np.concatenate([s.trial_end for s in segs] or [np.zeros(0)]))
        if ends.size == 0:
            raise ValueError(
                "the train split has no trials (trial_start/trial_end are empty); use --num_train_seconds instead."
            )
        if num_trials > ends.size:
            raise ValueError(f"--num_train_trials {num_trials} but the train split has only {ends.size} trials.")
        cut = float(ends[num_trials - 1])
        return [c for s in segs if (c := crop_segment(s, s.start, cut)) is not None]
    if num_seconds is not None:
        if not num_seconds > 0:
            raise ValueError(f"--num_train_seconds {num_seconds} leaves no labelled windows; give a time > 0.")
        out, left = [], float(num_seconds)
        for s in segs:
            if left <= 0:
                break
            c = crop_segment(s, s.start, s.start + min(left, s.duration))
            if c is not None:
                out.append(c)
                left -= c.duration
        return out
    return [dataclasses.replace(s, unit_rows=None, session_row=None) for s in segs]


def window_slots(segments: Sequence[Segment], length: float) -> list[tuple[Segment, int, int]]:
    """``(segment, k, n)``: slot ``k`` of the ``n = max(1, floor(duration / L))`` windows of a segment."""
    slots = []
    for seg in segments:
        n = max(1, int(math.floor(seg.duration / length + 1e-9)))
        slots += [(seg, k, n) for k in range(n)]
    return slots


class TrainWindows(torch.utils.data.Dataset):
    """Training windows of the kept segments, one item per window slot.

    Every fetch draws a fresh random crop: slot ``k`` of a segment with ``n`` slots starts at
    ``start + k L + u``, ``u ~ U(0, duration - n L)``, so windows stay inside the segment and move
    from epoch to epoch (the recipe's random crop). Draws come from ``(seed, epoch)``; Trainer calls
    :meth:`set_epoch` through the DataLoader, and :class:`_EpochCallback` does too.
    """

    def __init__(self, segments: Sequence[Segment], length: float, seed: int = 0):
        self.length = float(length)
        self.slots = window_slots(segments, length)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.rng = np.random.default_rng([self.seed, int(epoch)])

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, i: int) -> tuple[Segment, float]:
        seg, k, n = self.slots[i]
        slack = max(0.0, seg.duration - n * self.length)
        return seg, float(seg.start + k * self.length + (self.rng.uniform(0.0, slack) if slack > 0 else 0.0))


class EvalItem(NamedTuple):
    """An evaluation window: the collator applies no augmentation to it."""

    segment: Segment
    start: float


class EvalWindows(torch.utils.data.Dataset):
    """The evaluation tiling (1 s windows, ``step`` apart) of the held-out segments."""

    def __init__(self, segments: Sequence[Segment], length: float, step: float = 0.5):
        self.items = [EvalItem(seg, float(t0)) for seg in segments for t0 in eval_windows(seg, length, step)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> EvalItem:
        return self.items[i]


class AdaptCollator:
    """:class:`PoyoWindowCollator` for Trainer, which uses one collator for training and
    evaluation: :class:`EvalItem` batches get no unit dropout. Counts the training windows, and
    adds the eval and query masks as float copies for ``compute_metrics`` (Trainer pads eval
    batches with -100, which a bool tensor would read as True; ``output_mask`` stays bool)."""

    def __init__(self, processor: Any, unit_dropout: UnitDropout | None = None, seed: int = 0):
        self.train = PoyoWindowCollator(processor, unit_dropout=unit_dropout, seed=seed)
        self.eval = PoyoWindowCollator(processor)
        self.windows = 0

    def __call__(self, items: Sequence[tuple[Segment, float]]) -> dict[str, torch.Tensor]:
        evaluating = all(isinstance(x, EvalItem) for x in items)
        batch = (self.eval if evaluating else self.train)(items)
        batch["eval_mask"] = batch["eval_mask"].float()
        batch["query_mask"] = batch["output_mask"].float()
        if not evaluating:
            self.windows += len(items)
        return batch


def labelled_samples(segments: Sequence[Segment]) -> int:
    """Behaviour samples that carry loss weight (finite, weight > 0)."""
    return int(sum(int(np.count_nonzero(s.weights > 0)) for s in segments))


# ------------------------------------------------------------------------------ vocab + freezing


def add_new_session(
    model: Any, processor: Any, session_id: str, unit_ids: Sequence[str], namespace_units: bool = False
) -> tuple[list[str], dict[str, int]]:
    """Register the new session and grow the model's tables (old rows bit-identical).

    Returns the unit ids as registered (prefixed with the session id when ``namespace_units``)
    and the base's table sizes ``{"units": rows, "sessions": rows}`` (rows below are the base's).
    """
    if session_id in processor.session_vocab:
        raise ValueError(
            f"session {session_id!r} is already in the base's vocabulary (the base was trained on it); adapt to "
            "a session the base has not seen, or convert the data under another session id "
            "(`poyo-hf data convert ... --session-id NEW_ID`)."
        )
    units = [f"{session_id}/{u}" for u in unit_ids] if namespace_units else [str(u) for u in unit_ids]
    clash = [u for u in units if u in processor.unit_vocab]
    if clash:
        hint = (
            "they still collide after namespacing; rename the session"
            if namespace_units
            else f"pass --namespace_units to register them as '{session_id}/<unit>', or convert the data with "
            "globally unique unit ids (prefixed with the session id)"
        )
        raise ValueError(
            f"{len(clash)} unit ids of session {session_id!r} collide with units already in the base's "
            f"vocabulary (e.g. {clash[:3]}); {hint}."
        )
    old = {"units": processor.unit_vocab_size, "sessions": processor.session_vocab_size}
    processor.add_session(session_id, units)
    model.grow_vocabularies(processor)
    return units, old


def _row_mask_hook(n_old: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:n_old] = 0  # the base's rows belong to other sessions: never updated here
        return grad

    return hook


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def check_freeze_patterns(model: Any, mode: str, freeze: Sequence[str]) -> None:
    """Refuse a ``--freeze`` that leaves nothing to train, or names no parameter."""
    names = [n for n, _ in model.named_parameters()]
    for p in freeze:
        try:
            re.compile(p)
        except re.error as err:
            raise ValueError(f"--freeze pattern {p!r} is not a valid regular expression: {err}.") from None
        if not any(re.search(p, n) for n in names):
            raise ValueError(f"--freeze pattern {p!r} matches no parameter; names look like {names[:3]}.")
    if mode == "unit-identification":
        trainable = [n for n in EMBEDDING_PARAMS if not _matches(n, freeze)]
        if not trainable:
            raise ValueError(
                f"--freeze {list(freeze)} freezes the unit and session embeddings, the only parameters "
                "unit identification trains: nothing would be trained; drop those patterns."
            )
    else:
        trainable = [n for n in names if not _matches(n, freeze)]
        if not trainable:
            raise ValueError(f"--freeze {list(freeze)} freezes every parameter: nothing would be trained.")


def freeze_for_unit_identification(model: Any, old: dict[str, int], freeze: Sequence[str] = ()) -> list[Any]:
    """Only the unit / session embedding tables get gradients, and only in their NEW rows.

    Returns the hook handles (``handle.remove()`` undoes the row masks).
    """
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in EMBEDDING_PARAMS and not _matches(name, freeze))
    handles = []
    for name, n_old in zip(EMBEDDING_PARAMS, (old["units"], old["sessions"])):
        if params[name].requires_grad:
            handles.append(params[name].register_hook(_row_mask_hook(n_old)))
    return handles


def unfreeze_all(model: Any, freeze: Sequence[str] = ()) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(not _matches(name, freeze))


def build_adapt_optimizer(
    model: Any, lr: float, weight_decay: float, embedding_lr: float | None = None
) -> torch.optim.Optimizer:
    """AdamW over ALL parameters (so unfreezing later needs no new optimizer: AdamW skips a
    parameter whose grad is None). Embeddings, norms and biases get no weight decay: decoupled
    decay would move the base's embedding rows even with their gradient masked to zero."""
    decay, no_decay, emb = [], [], []
    for n, p in model.named_parameters():
        if n in EMBEDDING_PARAMS:
            emb.append(p)
        elif p.ndim < 2 or "emb" in n or "norm" in n:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
        {"params": emb, "weight_decay": 0.0, "lr": embedding_lr or lr},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


# ------------------------------------------------------------------------------ metrics


def make_compute_metrics(session_id: str):
    """``compute_metrics`` for Trainer: R^2 of the stitched predictions (same windows, stitching
    and eval mask as :func:`~poyo_hf.training.evaluation.evaluate_decoder`), plus the unstitched
    per-window R^2. Padding (NaN inside a batch, -100 across batches) is masked out."""
    from .metrics import Stitcher, r2_score, session_r2

    def compute_metrics(pred: Any) -> dict[str, float]:
        predictions = np.asarray(pred.predictions, np.float64)  # (N, N_out, D)
        labels, emask, qmask, starts, out_t = (np.asarray(x) for x in pred.label_ids)
        valid = (emask == 1.0) & np.isfinite(labels).all(-1)  # (N, N_out)
        out: dict[str, float] = {}
        if valid.sum() >= 2:
            out["window_r2"] = r2_score(labels[valid], predictions[valid])
        stitcher = Stitcher()
        # Real queries only: padding inside a batch has query_mask 0, across batches -100.
        stitcher.add([session_id] * len(starts), starts, out_t, qmask == 1.0, predictions, labels, emask == 1.0)
        r2 = session_r2(stitcher.sessions()).get(session_id)
        if r2 is not None:
            out["r2"] = r2
        return out

    return compute_metrics


class _PhaseCallback(TrainerCallback):
    """Full fine-tuning: unit identification for the first ``ui_steps`` steps, then unfreeze.
    Also forwards the epoch to the training windows (fresh random crops per epoch)."""

    def __init__(self, model: Any, ui_steps: int | None, freeze: Sequence[str], dataset: TrainWindows):
        self.model, self.ui_steps, self.freeze, self.dataset = model, ui_steps, freeze, dataset
        self.unfrozen_at: int | None = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))

    def on_step_begin(self, args, state, control, **kwargs):
        if self.ui_steps is not None and self.unfrozen_at is None and state.global_step >= self.ui_steps:
            unfreeze_all(self.model, self.freeze)
            self.unfrozen_at = state.global_step


# ------------------------------------------------------------------------------ the run


def _check_args(args: AdaptArguments) -> None:
    if args.mode not in _ALL_MODES:
        raise ValueError(f"--mode must be one of {list(MODES)}, got {args.mode!r}.")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}.")
    if not args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}.")
    if args.embedding_learning_rate is not None and not args.embedding_learning_rate > 0:
        raise ValueError(f"--embedding_learning_rate must be > 0, got {args.embedding_learning_rate}.")
    if args.weight_decay < 0:
        raise ValueError(f"--weight_decay must be >= 0, got {args.weight_decay}.")
    if args.max_steps <= 0 and not args.num_train_epochs > 0:
        raise ValueError(f"--num_train_epochs must be > 0 (or give --max_steps), got {args.num_train_epochs}.")
    if args.ui_epochs is not None and args.ui_epochs < 0:
        raise ValueError(f"--ui_epochs must be >= 0, got {args.ui_epochs}.")
    if args.eval_split not in ("valid", "test"):
        raise ValueError(f"--eval_split must be valid or test, got {args.eval_split!r}.")
    if not (math.isfinite(args.target_scale) and args.target_scale != 0):
        raise ValueError(f"--target_scale must be a finite non-zero number, got {args.target_scale}.")
    if args.num_train_trials is not None and args.num_train_seconds is not None:
        raise ValueError("give --num_train_trials or --num_train_seconds, not both.")
    if args.num_train_trials is not None and args.num_train_trials < 1:
        raise ValueError(f"--num_train_trials {args.num_train_trials} leaves no labelled windows; give at least 1.")
    if args.num_train_seconds is not None and not args.num_train_seconds > 0:
        raise ValueError(f"--num_train_seconds {args.num_train_seconds} leaves no labelled windows; give > 0.")
    if args.push_delta_to_hub and args.mode != "unit-identification":
        raise ValueError("--push_delta_to_hub needs --mode unit-identification (only it leaves the base unchanged).")


def prepare(args: AdaptArguments) -> dict[str, Any]:
    """Everything checked and built before training: data, base, vocabulary, datasets.

    Raises ``ValueError`` for every bad input (nothing is trained or written before that).
    """
    from .corpus import Corpus

    _check_args(args)
    corpus = Corpus.from_sources([args.data])
    sessions = {s["session_id"]: s for s in corpus.sessions}
    if args.session_id is None:
        if len(sessions) != 1:
            raise ValueError(
                f"{args.data!r} holds {len(sessions)} sessions ({sorted(sessions)[:4]}...); pick one with --session_id."
            )
        session_id = next(iter(sessions))
    else:
        session_id = args.session_id
        if session_id not in sessions:
            raise ValueError(f"session {session_id!r} is not in {args.data!r}; it has {sorted(sessions)[:6]}.")
    info = sessions[session_id]

    model, processor, resolved = load_base(args.base, args.base_revision)
    # Readout: the new behaviour must match a readout of the base in name or (single readout) dims.
    readouts = dict(model.config.readout_dims)
    name, dim = args.readout or info["behavior_name"], int(info["behavior_dim"])
    if name not in readouts:
        if args.readout is not None:
            raise ValueError(f"--readout {args.readout!r} is not a readout of the base; it has {readouts}.")
        if len(readouts) != 1:
            raise ValueError(
                f"the new behaviour {name!r} is not a readout of the base ({readouts}); choose one with --readout."
            )
        name = next(iter(readouts))
    if readouts[name] != dim:
        raise ValueError(
            f"the base's readout {name!r} has {readouts[name]} output dims but the new session's behaviour "
            f"{info['behavior_name']!r} has {dim}; adapt a base whose readout matches the behaviour "
            "(or convert the behaviour to that many dims)."
        )

    def load(split: str) -> list[Segment]:
        segs = [s for s in corpus.segments(split) if s.session_id == session_id]
        out = []
        for s in segs:
            s = dataclasses.replace(s, behavior_name=name, unit_rows=None, session_row=None)
            if args.namespace_units:
                s.unit_ids = [f"{session_id}/{u}" for u in s.unit_ids]
            if args.target_scale != 1.0:
                s.behavior_values = s.behavior_values * np.float32(args.target_scale)
            out.append(s)
        return out

    train_all = load("train")
    if not train_all:
        raise ValueError(
            f"session {session_id!r} has no train split in {args.data!r}: no labelled windows to adapt on."
        )
    train = limit_train_segments(train_all, args.num_train_trials, args.num_train_seconds)
    if labelled_samples(train) == 0:
        raise ValueError(
            f"the kept train data of session {session_id!r} has no labelled behaviour samples (all NaN or weight 0); "
            "keep more trials / seconds."
        )
    eval_segments = load(args.eval_split)
    if not eval_segments:
        raise ValueError(f"session {session_id!r} has no {args.eval_split!r} split to evaluate on; pick --eval_split.")

    freeze = list(args.freeze or [])
    check_freeze_patterns(model, "unit-identification" if args.mode == "unit-identification" else "full", freeze)
    if args.mode == "from-scratch":
        model, processor = _fresh_model_like(model, train, session_id, info["unit_ids"], args.namespace_units)
        units, old = list(processor.unit_vocab), {"units": 1, "sessions": 1}
    else:
        units, old = add_new_session(model, processor, session_id, info["unit_ids"], args.namespace_units)
    if args.push_to_hub or args.push_delta_to_hub:
        try:
            from ..hub.publish import publish  # noqa: F401
        except ImportError as err:
            raise ValueError(f"--push_to_hub needs poyo_hf.hub.publish, which cannot be imported: {err}") from err
    return {
        "corpus": corpus,
        "session_id": session_id,
        "session_info": info,
        "model": model,
        "processor": processor,
        "resolved": resolved,
        "units": units,
        "old": old,
        "train": train,
        "train_all": train_all,
        "eval": eval_segments,
        "readout": name,
        "freeze": freeze,
    }


def _fresh_model_like(base: Any, train: Sequence[Segment], session_id: str, unit_ids: Sequence[str], ns: bool):
    """A newly initialised model of the base's shape for the new session only, z-scoring targets
    with the statistics of the kept train data (what a from-scratch user would do)."""
    from poyo_hf import PoyoForDecoding, PoyoProcessor

    cfg = base.config.to_dict()
    for k in ("transformers_version", "architectures", "auto_map", "_name_or_path", "dtype"):
        cfg.pop(k, None)
    units = [f"{session_id}/{u}" for u in unit_ids] if ns else [str(u) for u in unit_ids]
    values = np.concatenate([s.behavior_values[s.weights > 0] for s in train]).astype(np.float64)
    name = next(iter(base.config.readout_dims))
    cfg.update(
        unit_vocab_size=len(units) + 1,
        session_vocab_size=2,
        target_mean={name: values.mean(0).tolist()},
        target_std={name: np.maximum(values.std(0), 1e-6).tolist()},
    )
    config = type(base.config)(**cfg)
    processor = PoyoProcessor.from_config(config, {session_id: units})
    return PoyoForDecoding(config), processor


def train_adapter(prep: dict[str, Any], args: AdaptArguments) -> dict[str, Any]:
    """Train with ``transformers.Trainer``; returns run statistics (steps, windows, timing)."""
    from transformers import Trainer, TrainingArguments

    model, processor = prep["model"], prep["processor"]
    mode, freeze = args.mode, prep["freeze"]
    length = float(processor.sequence_length)
    train_ds = TrainWindows(prep["train"], length, seed=args.seed)
    if len(train_ds) == 0:
        raise ValueError("no training windows: the kept train data is empty.")
    steps_per_epoch = math.ceil(len(train_ds) / args.batch_size)
    epochs = float(args.num_train_epochs)
    if args.max_steps <= 0 and args.min_steps > 0 and epochs * steps_per_epoch < args.min_steps:
        epochs = math.ceil(args.min_steps / steps_per_epoch)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(epochs * steps_per_epoch)

    handles: list[Any] = []
    ui_steps = None
    if mode == "unit-identification":
        handles = freeze_for_unit_identification(model, prep["old"], freeze)
    elif mode == "full-finetune":
        ui_epochs = args.ui_epochs if args.ui_epochs is not None else 0.1 * (total_steps / steps_per_epoch)
        ui_steps = int(round(ui_epochs * steps_per_epoch))
        handles = freeze_for_unit_identification(model, prep["old"], freeze)
        if ui_steps == 0:
            unfreeze_all(model, freeze)
    else:  # from-scratch
        unfreeze_all(model, freeze)

    c = model.config
    dropout = (
        UnitDropout(c.unit_dropout_min, c.unit_dropout_mode, c.unit_dropout_max, c.unit_dropout_peak)
        if args.unit_dropout
        else None
    )
    collator = AdaptCollator(processor, dropout, seed=args.seed)
    optimizer = build_adapt_optimizer(model, args.learning_rate, args.weight_decay, args.embedding_learning_rate)
    phase = _PhaseCallback(model, ui_steps, freeze, train_ds)
    out = Path(args.output_dir)
    targs = TrainingArguments(
        output_dir=str(out / "trainer"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        num_train_epochs=epochs,
        max_steps=args.max_steps if args.max_steps > 0 else -1,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        lr_scheduler_type=args.lr_scheduler_type,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        logging_steps=args.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        label_names=list(LABEL_NAMES),
        dataloader_num_workers=0,
        seed=args.seed,
        data_seed=args.seed,
        disable_tqdm=not args.progress,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train_ds,
        data_collator=collator,
        compute_metrics=make_compute_metrics(prep["session_id"]),
        optimizers=(optimizer, None),
        callbacks=[phase],
    )
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    train_windows = collator.windows
    for h in handles:
        h.remove()
    trainer_eval = trainer.evaluate(EvalWindows(prep["eval"], length), metric_key_prefix="eval")
    model.eval()
    return {
        "trainer": trainer,
        "steps": int(trainer.state.global_step),
        "epochs": float(trainer.state.epoch or 0.0),
        "steps_per_epoch": steps_per_epoch,
        "train_windows_per_epoch": len(train_ds),
        "train_windows_seen": int(train_windows),
        "wall_seconds": wall,
        "ui_steps": ui_steps,
        "unfrozen_at_step": phase.unfrozen_at,
        "trainer_eval": {k: float(v) for k, v in trainer_eval.items() if isinstance(v, (int, float))},
        "log_history": trainer.state.log_history,
        "device": str(trainer.args.device),
    }


def trainable_summary(model: Any, mode: str, old: dict[str, int]) -> dict[str, int | float]:
    """How many parameters the route updates (unit identification: only the new rows)."""
    total = sum(p.numel() for p in model.parameters())
    if mode == "unit-identification":
        d = model.config.hidden_size
        n = (model.config.unit_vocab_size - old["units"] + model.config.session_vocab_size - old["sessions"]) * d
    else:
        n = total
    return {"trainable_parameters": int(n), "total_parameters": int(total), "trainable_fraction": n / total}


def adapt(args: AdaptArguments) -> dict[str, Any]:
    """Run an adaptation end to end; returns the results (also written to disk)."""
    from .evaluation import evaluate_decoder, plot_sessions, public_results, write_results
    from .session_delta import save_session_delta

    torch.manual_seed(args.seed)
    prep = prepare(args)
    model, processor, sid = prep["model"], prep["processor"], prep["session_id"]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    before = evaluate_decoder(model, processor, prep["eval"], with_baseline=False, batch_size=args.eval_batch_size)
    run = train_adapter(prep, args)
    res = evaluate_decoder(model, processor, prep["eval"], prep["train"], batch_size=args.eval_batch_size)
    results = public_results(res)
    n_trials = int(sum(s.trial_start.size for s in prep["train"]))
    results.update(
        session_id=sid,
        mode=args.mode,
        split=args.eval_split,
        base_model=prep["resolved"]["base_model"],
        base_revision=prep["resolved"]["base_revision"],
        r2_before_adaptation=before["r2"],
        trainer_eval_r2=run["trainer_eval"].get("eval_r2"),
        trainer_eval_window_r2=run["trainer_eval"].get("eval_window_r2"),
        n_train_trials=n_trials,
        n_train_seconds=float(sum(s.duration for s in prep["train"])),
        n_train_windows_per_epoch=run["train_windows_per_epoch"],
        steps=run["steps"],
        epochs=run["epochs"],
        unfrozen_at_step=run["unfrozen_at_step"],
        wall_seconds=run["wall_seconds"],
        dataset_sources=prep["corpus"].sources,
        readout=prep["readout"],
        target_scale=args.target_scale,
        **trainable_summary(model, args.mode, prep["old"]),
    )
    if args.mode == "from-scratch":
        return results

    # The checkpoint folder: save_pretrained + eval_results.json + training_info.json.
    model_dir = out / "model"
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    write_results(tmp / "eval_results.json", results)
    recipe = {
        k: v for k, v in dataclasses.asdict(args).items() if k not in ("push_to_hub", "push_delta_to_hub", "progress")
    }
    info = {
        "kind": args.mode,
        "base_model": prep["resolved"]["base_model"],
        "base_revision": prep["resolved"]["base_revision"],
        "base_weights_sha256": prep["resolved"]["weights_sha256"],
        "datasets": prep["corpus"].provenance([sid]),
        "recipe": recipe,
        "compute": {
            "device": run["device"],
            "processes": 1,
            "precision": "fp32",
            "steps": run["steps"],
            "wall_seconds": run["wall_seconds"],
            "train_windows_seen": run["train_windows_seen"],
        },
    }
    write_results(tmp / "training_info.json", info)
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)
    write_results(out / "eval" / "results.json", results)
    if args.plots:
        results["plots"] = [str(p) for p in plot_sessions(res, prep["eval"], out / "eval")]
    if args.mode == "unit-identification" and args.save_delta:
        delta = save_session_delta(
            model,
            processor,
            prep["resolved"]["base_model"],
            prep["resolved"]["base_revision"],
            out / "session_delta",
            base_dir=prep["resolved"]["local_dir"],
        )
        for extra in ("eval_results.json", "training_info.json"):
            shutil.copy2(model_dir / extra, delta / extra)
        sizes = delta_size_ratio(delta, model_dir)
        results.update(delta_dir=str(delta), **sizes)
    if args.push_to_hub:
        from ..hub.publish import publish

        results["pushed"] = {"repo_id": args.push_to_hub, "commit": publish(model_dir, args.push_to_hub)}
    if args.push_delta_to_hub:
        from .session_delta import push_session_delta

        results["pushed_delta"] = {
            "repo_id": args.push_delta_to_hub,
            "commit": push_session_delta(out / "session_delta", args.push_delta_to_hub),
        }
    write_results(out / "eval" / "results.json", results)
    return results


def delta_size_ratio(delta_dir: Path, model_dir: Path) -> dict[str, float | int]:
    """Bytes of the session delta's weights+vocab vs the full checkpoint's weights+config+vocab."""
    from .session_delta import DELTA_FILES

    full_files = ("model.safetensors", "config.json", "preprocessor_config.json")
    delta_bytes = sum((delta_dir / f).stat().st_size for f in DELTA_FILES)
    full_bytes = sum((model_dir / f).stat().st_size for f in full_files)
    return {"delta_bytes": delta_bytes, "full_bytes": full_bytes, "delta_size_ratio": delta_bytes / full_bytes}


def format_summary(results: dict[str, Any]) -> str:
    w = results.get("wiener_r2")
    lines = [
        f"session {results['session_id']} ({results['mode']}), {results['n_train_trials']} train trials "
        f"({results['n_train_seconds']:.1f} s), {results['steps']} steps",
        f"  held-out {results['split']} R^2: POYO {results['r2']:.3f} (before adaptation "
        f"{results['r2_before_adaptation']:.3f}), Wiener {'n/a' if w is None else format(w, '.3f')}",
        f"  trained {results['trainable_parameters']} of {results['total_parameters']} parameters "
        f"({100 * results['trainable_fraction']:.2f} %)",
    ]
    if "delta_size_ratio" in results:
        lines.append(
            f"  session delta: {results['delta_bytes']} bytes = {100 * results['delta_size_ratio']:.2f} % of the "
            f"full checkpoint ({results['full_bytes']} bytes)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    import poyo_hf  # noqa: F401  (Auto registration)

    argv = list(sys.argv[1:] if argv is None else argv)
    # `poyo-hf adapt BASE DATA [--options]`: the two positionals map onto --base / --data.
    positional = []
    while argv and not argv[0].startswith("-") and len(positional) < 2:
        positional.append(argv.pop(0))
    argv = [x for pair in zip(("--base", "--data"), positional) for x in pair] + argv
    parser = HfArgumentParser(AdaptArguments)
    parser.prog = "poyo-hf adapt BASE NEW_SESSION_DATA"
    parser.description = __doc__.split("\n\n")[0]
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        results = adapt(args)
    except ValueError as err:
        print(f"poyo-hf adapt: error: {err}", file=sys.stderr)
        return 2
    print(format_summary(results))
    keys = ("r2", "wiener_r2", "r2_before_adaptation", "trainer_eval_r2", "n_train_trials", "steps", "delta_size_ratio")
    print(json.dumps({k: results.get(k) for k in keys}, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
