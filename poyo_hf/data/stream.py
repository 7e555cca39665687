"""Streaming POYO batches from ``datasets`` (local folders or Hub repos).

Segments stream as Arrow record batches (``with_format("arrow")``), are cut into windows
(random offset per epoch for training, a 0.5 s tiling for evaluation), shuffled through a
window buffer and collated by :class:`~poyo_hf.data.windows.PoyoWindowCollator`.

Several datasets mix with ``datasets.interleave_datasets``; several processes split the stream
with ``datasets.distributed.split_dataset_by_node``. Resuming is exact: every random draw of a
batch (window order, unit dropout) comes from an RNG seeded by ``(seed, epoch, batch index)``,
so :meth:`PoyoWindowStream.load_state_dict` replays the epoch's windows up to the saved batch
without collating them and continues with the identical batches.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .windows import PoyoWindowCollator, Segment, UnitDropout, eval_windows, segments_from_arrow, training_windows


def load_segments_dataset(source: str | os.PathLike, split: str, streaming: bool = True) -> Any:
    """A ``datasets`` (Iterable)Dataset of segment rows from a local folder or a Hub repo id."""
    from datasets import load_dataset

    src = str(source)
    if Path(src).is_dir():
        data_files = sorted(str(p) for p in (Path(src) / "data" / split).glob("*.parquet"))
        if not data_files:
            raise ValueError(
                f"dataset folder {src!r} has no {split!r} split (no data/{split}/*.parquet); "
                "check the split name (train / valid / test) or re-convert the data."
            )
        return load_dataset("parquet", data_files={split: data_files}, split=split, streaming=streaming)
    try:
        return load_dataset(src, split=split, streaming=streaming)
    except ValueError as err:
        raise ValueError(f"cannot load split {split!r} of {src!r}: {err}") from err


def mix_datasets(datasets_: Sequence[Any], probabilities: Sequence[float] | None = None, seed: int = 0) -> Any:
    """Mix several segment streams (e.g. one per corpus) with ``interleave_datasets``."""
    from datasets import interleave_datasets

    if len(datasets_) == 1:
        return datasets_[0]
    if probabilities is not None:
        p = np.asarray(probabilities, float)
        if p.size != len(datasets_) or np.any(p < 0) or p.sum() <= 0:
            raise ValueError(f"probabilities {list(probabilities)} must be {len(datasets_)} non-negative weights.")
        probabilities = (p / p.sum()).tolist()
    return interleave_datasets(list(datasets_), probabilities=probabilities, seed=seed,
                               stopping_strategy="all_exhausted")


def iter_segments(dataset: Any, rows_per_batch: int = 16) -> Iterator[Segment]:
    """Segments of a (streaming) dataset, read as Arrow record batches."""
    for table in dataset.with_format("arrow").iter(batch_size=rows_per_batch):
        yield from segments_from_arrow(table)


class PoyoWindowStream(torch.utils.data.IterableDataset):
    """Yields collated POYO batches from a segment dataset, epoch after epoch.

    Args:
        dataset: a ``datasets`` dataset (streaming or not) of segment rows, or a list of
            already-loaded :class:`Segment` (small corpora held in memory).
        processor: the :class:`~poyo_hf.PoyoProcessor` whose vocabularies index the batch.
        batch_size: windows per batch.
        train: random-offset windows, shuffling and unit dropout (else the eval tiling).
        unit_dropout: dropout settings (training only; None disables it).
        shuffle_buffer: windows held for shuffling (training only).
        eval_step: step of the evaluation tiling (s).
        seed: base seed; epoch ``e`` batch ``i`` draws from ``(seed, e, i)``.
        drop_last: drop an incomplete final batch (training).
    """

    def __init__(
        self,
        dataset: Any,
        processor: Any,
        batch_size: int,
        train: bool = True,
        unit_dropout: UnitDropout | None = None,
        shuffle_buffer: int = 2048,
        eval_step: float = 0.5,
        seed: int = 0,
        drop_last: bool = False,
    ):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}.")
        self.dataset = dataset
        self.processor = processor
        self.batch_size = batch_size
        self.train = train
        self.unit_dropout = unit_dropout if train else None
        self.shuffle_buffer = shuffle_buffer
        self.eval_step = eval_step
        self.seed = seed
        self.drop_last = drop_last
        self.length = float(processor.sequence_length)
        self.epoch = 0
        self._skip = 0  # batches of the current epoch already consumed (resume)
        self._in_epoch = 0

    # -- state -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_in_epoch": self._in_epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"stream state was saved with seed {state['seed']}, this stream uses {self.seed}.")
        self.epoch = int(state["epoch"])
        self._skip = int(state["batches_in_epoch"])

    # -- iteration ---------------------------------------------------------------------------
    def _segments(self) -> Iterator[Segment]:
        if isinstance(self.dataset, list):
            order = np.arange(len(self.dataset))
            if self.train:
                np.random.default_rng([self.seed, self.epoch, 1 << 20]).shuffle(order)
            for i in order:
                yield self.dataset[i]
            return
        ds = self.dataset
        if self.train and hasattr(ds, "shuffle"):
            # Shuffle the shard (file) order only: windows are shuffled by our own window
            # buffer, and a row buffer here costs an Arrow `take` per row for nothing.
            try:
                ds = ds.shuffle(seed=self.seed + self.epoch, buffer_size=1)
            except TypeError:  # a map-style Dataset: shuffle(seed=...) only
                ds = ds.shuffle(seed=self.seed + self.epoch)
        yield from iter_segments(ds)

    def _windows(self) -> Iterator[tuple[Segment, float]]:
        rng = np.random.default_rng([self.seed, self.epoch, 1 << 21])
        for seg in self._segments():
            starts = training_windows(seg, self.length, rng) if self.train else eval_windows(seg, self.length, self.eval_step)
            for t0 in starts:
                yield seg, float(t0)

    def _batches_of_windows(self) -> Iterator[list[tuple[Segment, float]]]:
        if not self.train:
            batch: list[tuple[Segment, float]] = []
            for w in self._windows():
                batch.append(w)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch
            return
        rng = np.random.default_rng([self.seed, self.epoch, 1 << 22])
        buffer: list[tuple[Segment, float]] = []
        batch = []
        for w in self._windows():
            if len(buffer) < self.shuffle_buffer:
                buffer.append(w)
                continue
            i = int(rng.integers(len(buffer)))
            batch.append(buffer[i])
            buffer[i] = w
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        rng.shuffle(buffer)
        for w in buffer:
            batch.append(w)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        skip, self._skip = self._skip, 0
        self._in_epoch = 0
        for i, windows in enumerate(self._batches_of_windows()):
            if i < skip:
                self._in_epoch = i + 1
                continue
            collator = PoyoWindowCollator(
                self.processor, unit_dropout=self.unit_dropout, seed=int(np.random.SeedSequence(
                    [self.seed, self.epoch, i]).generate_state(1)[0]),
            )
            batch = collator(windows)
            self._in_epoch = i + 1
            yield batch
        self.epoch += 1
        self._in_epoch = 0

    def epochs(self, n: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Batches over ``n`` epochs (forever when None), continuing from the current state."""
        done = 0
        while n is None or done < n:
            yield from self
            done += 1


class _StreamWithState(torch.utils.data.IterableDataset):
    """``stream.epochs()`` batches, each with the stream's state and epoch right after it."""

    def __init__(self, stream: Any):
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, int], int]]:
        for batch in self.stream.epochs():
            yield batch, self.stream.state_dict(), self.stream.epoch


class BackgroundBatches:
    """Makes a stream's training batches in a worker process, ``depth`` batches ahead.

    ``stream`` is a :class:`PoyoWindowStream` (or any object with ``epochs()``, ``state_dict()`` and
    ``epoch``, like the NDT trial stream). Collating (window cuts, unit dropout, padding) is numpy
    and Python work; in a thread of the training process it would contend for the GIL with the
    training step's own Python (measured: the loop still waited 1.6% of its time vs 1.9% with no
    prefetch), so one ``torch.utils.data.DataLoader`` worker process makes the batches instead.
    Batches come out in the order ``stream.epochs()`` makes them, identical to it.

    The worker runs ahead, so the stream's own state in this process does not move: use this
    object's :meth:`state_dict` and :attr:`epoch` for checkpoints and logs (the state right after
    the last batch handed out). A worker error is re-raised by ``next``. :meth:`close` (or the
    context manager) stops the worker.
    """

    def __init__(self, stream: Any, depth: int = 2):
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}.")
        self._state = stream.state_dict()
        self.epoch = stream.epoch
        loader = torch.utils.data.DataLoader(
            _StreamWithState(stream),
            batch_size=None,  # the stream batches itself
            num_workers=1,
            prefetch_factor=depth,
            # Its own generator: the worker seeds must not consume draws of the global torch RNG,
            # which the model's dropout uses (results then do not depend on prefetching).
            generator=torch.Generator().manual_seed(0),
        )
        self._it: Any = iter(loader)

    def __iter__(self) -> BackgroundBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            raise StopIteration
        batch, self._state, self.epoch = next(self._it)
        return batch

    def state_dict(self) -> dict[str, int]:
        """The stream state after the last batch handed out (what resuming must continue from)."""
        return dict(self._state)

    def close(self) -> None:
        """Stop the worker process."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()  # DataLoader's own shutdown (also what its __del__ calls)

    def __enter__(self) -> BackgroundBatches:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
