"""Streaming segment datasets into POYO batches: from a folder and from a Hub repo id, several
sessions mixed, split across processes, and resumed exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets.distributed import split_dataset_by_node

from poyo_hf import PoyoProcessor
from poyo_hf.data.io import write_dataset
from poyo_hf.data.stream import PoyoWindowStream, iter_segments, load_segments_dataset, mix_datasets
from poyo_hf.data.synthetic import SimulatorConfig, simulate_corpus
from poyo_hf.data.windows import UnitDropout


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    recs = simulate_corpus(SimulatorConfig.small(seed=5))
    out = tmp_path_factory.mktemp("stream") / "ds"
    write_dataset(recs, out, max_segment_s=15.0)
    proc = PoyoProcessor(sequence_length=1.0)
    for r in recs:
        proc.add_session(r.session_id, list(r.unit_ids))
    return out, recs, proc


def test_stream_from_a_folder_yields_every_spike_of_the_split(corpus):
    folder, recs, proc = corpus
    ds = load_segments_dataset(folder, "train", streaming=True)
    segs = list(iter_segments(ds))
    assert {s.session_id for s in segs} == {r.session_id for r in recs}
    # Spikes of the streamed train segments are exactly the recording's train-split spikes.
    for rec in recs:
        mine = np.concatenate([s.spike_times for s in segs if s.session_id == rec.session_id])
        starts, ends = rec.splits["train"]
        inside = np.zeros(rec.spike_times.size, bool)
        for a, b in zip(starts, ends):
            inside |= (rec.spike_times >= a) & (rec.spike_times < b)
        np.testing.assert_array_equal(np.sort(mine), rec.spike_times[inside])
    batch = next(iter(PoyoWindowStream(ds, proc, batch_size=4, shuffle_buffer=8)))
    assert batch["input_unit_index"].shape[0] == 4 and batch["labels"].shape[-1] == 2


def test_missing_split_is_a_clear_error(corpus):
    folder, _, _ = corpus
    with pytest.raises(ValueError, match="no 'holdout' split"):
        load_segments_dataset(folder, "holdout")


def test_mixing_sessions_with_interleave_datasets(corpus):
    folder, recs, proc = corpus
    per_session = [
        load_segments_dataset(folder, "train", streaming=True).filter(lambda r, s=r.session_id: r["session_id"] == s)
        for r in recs[:2]
    ]
    mixed = mix_datasets(per_session, probabilities=[0.5, 0.5], seed=0)
    seen = [s.session_id for s in iter_segments(mixed)]
    assert set(seen) == {recs[0].session_id, recs[1].session_id}
    # Both sources are visited before either is exhausted (interleaving, not concatenation).
    first = seen.index(recs[1].session_id)
    assert first < len([x for x in seen if x == recs[0].session_id])
    with pytest.raises(ValueError, match="probabilities"):
        mix_datasets(per_session, probabilities=[1.0])


def test_split_dataset_by_node_partitions_the_shards(corpus):
    folder, _, _ = corpus
    ds = load_segments_dataset(folder, "train", streaming=True)
    rank0 = [(s.session_id, s.start) for s in iter_segments(split_dataset_by_node(ds, rank=0, world_size=2))]
    rank1 = [(s.session_id, s.start) for s in iter_segments(split_dataset_by_node(ds, rank=1, world_size=2))]
    every = [(s.session_id, s.start) for s in iter_segments(ds)]
    assert rank0 and rank1 and not set(rank0) & set(rank1)
    assert sorted(rank0 + rank1) == sorted(every)


def _training_stream(corpus) -> PoyoWindowStream:
    """A fresh training stream over the corpus (unit dropout and shuffling on, seed 9)."""
    folder, _, proc = corpus
    ds = load_segments_dataset(folder, "train", streaming=True)
    drop = UnitDropout(min_units=10, mode_units=20, max_units=40)
    return PoyoWindowStream(ds, proc, batch_size=4, unit_dropout=drop, shuffle_buffer=16, seed=9)


def test_streamed_training_resumes_exactly(corpus):
    def stream():
        return _training_stream(corpus)

    full = list(stream())
    s = stream()
    it = iter(s)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(s.state_dict()))  # survives a JSON round trip
    resumed = stream()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 3
    for a, b in zip(rest, full[3:]):
        for k in a:
            assert torch.equal(torch.nan_to_num(a[k]), torch.nan_to_num(b[k])), k


def test_stream_from_a_hub_repo_id_into_batches(corpus, tmp_path):
    """Push the folder to the loopback Hub, then stream it by repo id into collated batches
    (in a subprocess: the Hub clients read HF_ENDPOINT when imported)."""
    from poyo_hf.testing import hub_server
    from poyo_hf.testing.hub_env import hub_environment

    folder, recs, _ = corpus
    code = f"""
import json, torch
from poyo_hf import PoyoProcessor
from poyo_hf.data.io import push_dataset_to_hub
from poyo_hf.data.stream import PoyoWindowStream, load_segments_dataset
from poyo_hf.training.corpus import Corpus
push_dataset_to_hub({str(folder)!r}, "tester/synthetic-spikes")
corpus = Corpus.from_sources(["tester/synthetic-spikes"])
proc = PoyoProcessor(sequence_length=1.0)
for s in corpus.sessions:
    proc.add_session(s["session_id"], s["unit_ids"])
ds = load_segments_dataset("tester/synthetic-spikes", "train", streaming=True)
n_windows = n_spikes = 0
for b in PoyoWindowStream(ds, proc, batch_size=8, train=False):
    n_windows += b["input_unit_index"].shape[0]
    n_spikes += int((b["input_mask"] & (b["input_token_type"] == 0)).sum())
local = PoyoWindowStream(load_segments_dataset({str(folder)!r}, "train", streaming=True), proc, batch_size=8, train=False)
print("RESULT=" + json.dumps({{"windows": n_windows, "spikes": n_spikes,
    "local_windows": sum(b["input_unit_index"].shape[0] for b in local), "sessions": len(corpus.sessions)}}))
"""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    with hub_server.serve_hub() as server:
        res = subprocess.run([sys.executable, "-c", code], env=hub_environment(server.url, home), cwd=cwd,
                             capture_output=True, text=True, timeout=300)
    lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT=")]
    assert res.returncode == 0 and lines, res.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT="):])
    assert out["sessions"] == len(recs)
    assert out["windows"] == out["local_windows"] > 0 and out["spikes"] > 0


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(torch.nan_to_num(x[k]), torch.nan_to_num(y[k])), k


def test_background_batches_match_the_stream_and_resume_from_their_own_state(corpus):
    from poyo_hf.data.stream import BackgroundBatches

    def stream():
        return _training_stream(corpus)

    per_epoch = len(list(stream()))
    sync = stream()
    it = sync.epochs()
    expected = [next(it) for _ in range(per_epoch + 3)]  # into the second epoch
    with BackgroundBatches(stream(), depth=3) as bg:
        got = [next(bg) for _ in range(per_epoch + 3)]
        # The producer has run ahead; the state is that of the batches handed out.
        assert bg.state_dict() == sync.state_dict() == {"epoch": 1, "batches_in_epoch": 3, "seed": 9}
        assert bg.epoch == 1
        state = json.loads(json.dumps(bg.state_dict()))
    _same_batches(got, expected)
    resumed = stream()
    resumed.load_state_dict(state)
    again = resumed.epochs()
    _same_batches([next(again) for _ in range(2)], [next(it) for _ in range(2)])


def test_background_batches_under_spawn_pickle_the_stream_into_the_worker(corpus):
    # spawn is the default start method on macOS and Windows (forkserver on Linux from Python 3.14):
    # the stream, its streaming dataset and processor travel by pickle, and the batches are the same.
    from poyo_hf.data.stream import BackgroundBatches

    it = _training_stream(corpus).epochs()
    expected = [next(it) for _ in range(3)]
    it.close()
    with BackgroundBatches(_training_stream(corpus), depth=2, start_method="spawn") as bg:
        got = [next(bg) for _ in range(3)]
        assert bg.state_dict() == {"epoch": 0, "batches_in_epoch": 3, "seed": 9}
    _same_batches(got, expected)
    with pytest.raises(ValueError, match="start_method"):
        BackgroundBatches(_training_stream(corpus), start_method="teleport")


def test_background_batches_reraise_worker_errors_and_stop_on_close(corpus):
    from poyo_hf.data.stream import BackgroundBatches

    class Failing:
        epoch = 0

        def state_dict(self):
            return {"epoch": 0, "batches_in_epoch": 0, "seed": 0}

        def epochs(self):
            yield {"x": torch.zeros(1)}
            raise OSError("shard 3 unreadable")

    bg = BackgroundBatches(Failing(), depth=1)
    assert torch.equal(next(bg)["x"], torch.zeros(1))
    with pytest.raises(OSError, match="shard 3 unreadable"):
        next(bg)
    bg.close()

    class Endless(Failing):
        def epochs(self):
            while True:
                yield {"x": torch.ones(1)}

    bg = BackgroundBatches(Endless(), depth=2)
    worker = bg._worker
    next(bg)
    bg.close()  # the worker is blocked on a full queue: close must still stop it
    assert not worker.is_alive()
    with pytest.raises(StopIteration):
        next(bg)
    with pytest.raises(ValueError, match="depth"):
        BackgroundBatches(Endless(), depth=0)


class _Growing:
    """Batches that outgrow the worker's shared slots (1 MiB each at first), with a non-tensor value."""

    epoch = 0

    def __init__(self, sizes):
        self.sizes, self.done = sizes, 0

    def state_dict(self):
        return {"epoch": 0, "batches_in_epoch": self.done, "seed": 0}

    def epochs(self):
        for n in self.sizes:
            g = torch.Generator().manual_seed(n)
            self.done += 1
            yield {
                "x": torch.randn(n, generator=g),
                "ids": torch.randint(-(2**40), 2**40, (n // 3, 3), generator=g),
                "mask": torch.rand(n, generator=g) > 0.5,
                "t": torch.rand(2, dtype=torch.float64, generator=g),
                "empty": torch.zeros(0, 4),
                "half": torch.randn(5, 2, generator=g).to(torch.bfloat16),  # no numpy equivalent
                "name": f"batch of {n}",
            }


def test_background_batches_hand_over_every_dtype_and_growing_batches_exactly():
    from poyo_hf.data.stream import BackgroundBatches

    sizes = [10, 1000, 600_000, 7, 900_000, 3]  # 600k floats + ids + mask > 1 MiB: the ring is re-made
    expected = list(_Growing(sizes).epochs())
    with BackgroundBatches(_Growing(sizes), depth=2) as bg:
        got = [next(bg) for _ in sizes]
        assert bg.state_dict()["batches_in_epoch"] == len(sizes)
        with pytest.raises(StopIteration):  # a finite stream ends the iteration
            next(bg)
    for g, e in zip(got, expected):
        assert g.keys() == e.keys() and g["name"] == e["name"]
        for k in ("x", "ids", "mask", "t", "empty", "half"):
            assert g[k].dtype == e[k].dtype and torch.equal(g[k], e[k]), k
    # The batches own their memory: the worker reusing its slots later changes none of them.
    assert torch.equal(got[1]["x"], expected[1]["x"])
    got[0]["x"].add_(1)  # writable


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="process priorities are POSIX")
def test_background_batches_worker_runs_at_lower_priority_and_its_death_is_reported():
    from poyo_hf.data.stream import BackgroundBatches

    class Endless:
        epoch = 0

        def state_dict(self):
            return {"epoch": 0, "batches_in_epoch": 0, "seed": 0}

        def epochs(self):
            while True:
                yield {"x": torch.ones(3)}

    bg = BackgroundBatches(Endless(), depth=2)
    next(bg)
    # Its credits must not preempt the training loop (see _produce): a higher niceness.
    assert os.getpriority(os.PRIO_PROCESS, bg._worker.pid) > os.getpriority(os.PRIO_PROCESS, 0)
    os.kill(bg._worker.pid, signal.SIGKILL)
    bg._worker.join()
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        for _ in range(4):  # batches already sent come first
            next(bg)
    with pytest.raises(StopIteration):
        next(bg)
