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

import functools
import math
import os
import sys
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


_WORKER_NICENESS = 10  # see _produce
_ALIGN = 64  # byte offset alignment of each tensor inside a slot (any dtype's view stays aligned)


@functools.cache
def _numpy_dtype(dtype: torch.dtype) -> np.dtype | None:
    """numpy's equivalent of a torch dtype, or None (bfloat16, float8, ...)."""
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:
        return None


def _produce(stream: Any, conn: Any, slots: int) -> None:
    """Worker process of :class:`BackgroundBatches`: one batch per credit received, written into a
    slot of a shared-memory ring; only the slot's offset, the layout and the stream state travel on
    the pipe (the ring itself once, when it is (re)allocated for a larger batch)."""
    import pickle
    import traceback

    torch.set_num_threads(1)  # numpy/Python work; the cores belong to the training step
    if hasattr(os, "nice"):
        # Lower priority, so that the credit ``next`` sends does not hand the loop's core to this
        # process: at equal priority the woken worker preempted the loop and made its batch there,
        # and ``next`` took 1.4 ms (median, quickstart pretraining on the 2-core VM) instead of
        # 0.05 ms. Niceness 10 still leaves it ~10% of a contended core, >10x what it needs; at 19
        # or SCHED_IDLE it starved and the loop waited for the batches instead.
        os.nice(_WORKER_NICENESS)
    ring: torch.Tensor | None = None
    slot_bytes = 0
    try:
        for i, batch in enumerate(stream.epochs()):
            try:
                if conn.recv() is None:  # a credit, or None: stop
                    return
            except EOFError:  # the training process is gone (killed): nothing to report to
                return
            layout, others, nbytes = [], {}, 0
            for k, v in batch.items():
                if isinstance(v, torch.Tensor):
                    v = v.detach().contiguous()
                    layout.append((k, v, nbytes))
                    nbytes += -(-v.nbytes // _ALIGN) * _ALIGN
                else:
                    others[k] = v
            new_ring = None
            if ring is None or nbytes > slot_bytes:
                slot_bytes = max(1 << 20, -(-nbytes * 5 // 4 // _ALIGN) * _ALIGN)  # 25% headroom
                ring = new_ring = torch.empty(slots * slot_bytes, dtype=torch.uint8).share_memory_()
            base = (i % slots) * slot_bytes
            for _, v, off in layout:
                ring[base + off : base + off + v.nbytes].view(v.dtype).copy_(v.reshape(-1))
            meta = [(k, v.dtype, _numpy_dtype(v.dtype), tuple(v.shape), off) for k, v, off in layout]
            conn.send(("batch", new_ring, base, nbytes, meta, others, stream.state_dict(), stream.epoch))
        conn.send(("end",))
    except KeyboardInterrupt:
        return
    except BaseException as err:  # everything else goes back to the training loop, which re-raises it
        tb = traceback.format_exc()
        try:
            try:
                conn.send(("error", err, tb))
            except (pickle.PicklingError, TypeError, AttributeError):  # the exception does not pickle
                conn.send(("error", RuntimeError(f"{type(err).__name__}: {err}"), tb))
        except OSError:  # the training process is gone: say it where it can still be seen
            print(f"poyo_hf batch worker: {tb}", file=sys.stderr)
            return
    # Stay until told to stop: the loop may still be receiving a ring sent above, whose file
    # descriptor this process serves (multiprocessing's resource sharer) until it exits.
    try:
        while conn.recv() is not None:
            pass
    except (EOFError, OSError):
        pass


class BackgroundBatches:
    """Makes a stream's training batches in a worker process, ``depth`` batches ahead.

    ``stream`` is a :class:`PoyoWindowStream` (or any object with ``epochs()``, ``state_dict()`` and
    ``epoch``, like the NDT trial stream). Collating (window cuts, unit dropout, padding) is numpy
    and Python work; in a thread of the training process it would contend for the GIL with the
    training step's own Python (measured: the loop still waited 1.6% of its time vs 1.9% with no
    prefetch), so a worker process makes the batches instead. Batches come out in the order
    ``stream.epochs()`` makes them, identical to it.

    Hand-over: the worker writes each batch into one slot of a shared-memory ring of ``depth``
    slots; ``next`` copies the slot out (one ``memcpy``) and returns tensors viewing that copy,
    then grants the worker one more batch. The worker runs at most ``depth`` batches ahead, so it
    refills a slot only after it was copied out. A ``torch.utils.data.DataLoader`` worker (the
    first version) took 4.6 ms per quickstart batch (12 tensors, 630 kB): every tensor got a
    shared-memory segment of its own and its file descriptor a connection of its own, and each
    item went through the DataLoader's queues and feeder threads; making the batch in the loop
    takes 0.6 ms. Measured on the 2-core VM with the loop idle between batches.

    The worker runs ahead, so the stream's own state in this process does not move: use this
    object's :meth:`state_dict` and :attr:`epoch` for checkpoints and logs (the state right after
    the last batch handed out). A worker error is re-raised by ``next`` (with the worker's
    traceback as a note). :meth:`close` (or the context manager) stops the worker.
    """

    def __init__(self, stream: Any, depth: int = 2, start_method: str | None = None):
        """``start_method``: how the worker starts (``"fork"``, ``"spawn"``, ``"forkserver"``;
        default: the platform's). Under spawn and forkserver ``stream`` is pickled into the worker."""
        import multiprocessing

        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}.")
        methods = multiprocessing.get_all_start_methods()
        if start_method is not None and start_method not in methods:
            raise ValueError(f"start_method must be one of {methods} on this platform, got {start_method!r}.")
        self._state = stream.state_dict()
        self.epoch = stream.epoch
        self._ring_np: np.ndarray | None = None
        self._ring: torch.Tensor | None = None  # kept alive while _ring_np views it
        ctx = multiprocessing.get_context(start_method)
        self._conn, child = ctx.Pipe(duplex=True)
        self._worker = ctx.Process(target=_produce, args=(stream, child, depth), daemon=True, name="poyo_hf-batches")
        self._worker.start()
        child.close()
        self._open = True
        for _ in range(depth):
            self._conn.send(True)  # credits: the worker may run depth batches ahead

    def __iter__(self) -> BackgroundBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self._open:
            raise StopIteration
        try:
            message = self._conn.recv()
        except (EOFError, ConnectionResetError):
            self.close()
            raise RuntimeError(
                f"the batch worker process exited unexpectedly (exit code {self._worker.exitcode}); "
                "rerun with --prefetch_batches 0 to make the batches in the training process and see the error."
            ) from None
        if message[0] != "batch":
            self.close()
            if message[0] == "end":
                raise StopIteration
            _, err, tb = message
            err.add_note(f"raised in the batch worker process:\n{tb}")
            raise err
        _, new_ring, base, nbytes, layout, others, self._state, self.epoch = message
        if new_ring is not None:
            self._ring, self._ring_np = new_ring, new_ring.numpy()
        # numpy's copy runs on this thread; torch's would first wake its idle second thread:
        # 1.2 vs 0.15 ms for a quickstart batch on the 2-core VM.
        buf = self._ring_np[base : base + nbytes].copy()
        try:
            self._conn.send(True)  # the slot is free: one more batch
        except OSError:  # the worker died; the next recv reports it, after the batches it sent
            pass
        # Views made with numpy, then wrapped: ~10x less Python overhead than slicing tensors; torch
        # views for the dtypes numpy lacks (bfloat16, ...).
        batch: dict[str, Any] = {}
        for k, dtype, np_dtype, shape, off in layout:
            raw = buf[off : off + math.prod(shape) * dtype.itemsize]
            if np_dtype is not None:
                batch[k] = torch.from_numpy(raw.view(np_dtype).reshape(shape))
            else:
                batch[k] = torch.from_numpy(raw).view(dtype).view(shape)
        batch.update(others)
        return batch

    def state_dict(self) -> dict[str, int]:
        """The stream state after the last batch handed out (what resuming must continue from)."""
        return dict(self._state)

    def close(self) -> None:
        """Stop the worker process (it finishes the batch in hand, or is terminated after 5 s)."""
        if not self._open:
            return
        self._open = False
        try:
            self._conn.send(None)
        except OSError:  # the worker is gone already
            pass
        self._worker.join(timeout=5)
        if self._worker.is_alive():
            self._worker.terminate()
            self._worker.join()
        self._conn.close()

    def __enter__(self) -> BackgroundBatches:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
