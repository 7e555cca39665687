"""PoyoStreamingDecoder: equal to the offline path (processor + forward on the same window and
timestamps) step after step, and loud on bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoProcessor

from poyo_hf import PoyoConfig, PoyoForDecoding, PoyoProcessor, PoyoStreamingDecoder

TOL = 1e-5


def offline(model, processor, session_id, times, ids, t_now, out_t, readout=None):
    """The reference: crop [t_now - L, t_now], tokenize with the processor, run forward."""
    L = processor.sequence_length
    t0 = t_now - L
    sel = (times >= t0) & (times <= t_now)
    batch = processor(
        {
            "session_id": session_id,
            "spike_times": times[sel] - t0,
            "spike_unit_ids": ids[sel],
            "output_timestamps": np.asarray(out_t) - t0,
            "readout": readout,
        }
    )
    with torch.inference_mode():
        pred = model(**batch).predictions[0, : len(out_t)]
    return pred.numpy(), int(sel.sum())


def poisson(units, duration, rate, rng, start=0.0):
    counts = rng.poisson(rate * duration, len(units))
    unit = np.repeat(np.arange(len(units)), counts)
    t = start + rng.uniform(0.0, duration, unit.size)
    order = np.argsort(t, kind="stable")
    return t[order], np.asarray(units, dtype=object)[unit[order]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batch-1 decoding of small models gains nothing from a second thread, and on a busy
    2-core machine OpenMP's spinning second thread makes it many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mp_like():
    """poyo-mp widths (hidden 64, head dim 64: all 16 rotary pairs), fewer layers/latents/heads to
    stay fast; two readouts with non-trivial statistics."""
    units = [f"s/u{i}" for i in range(12)]
    config = PoyoConfig.from_preset(
        "poyo-mp",
        num_hidden_layers=2,
        num_latents_per_step=4,
        num_self_attention_heads=2,
        unit_vocab_size=len(units) + 4,
        session_vocab_size=3,
        readout_dims={"hand_vel": 2, "force": 3},
        target_mean={"hand_vel": [0.5, -1.0], "force": [0.0, 1.0, 2.0]},
        target_std={"hand_vel": [3.0, 2.0], "force": [1.0, 0.5, 4.0]},
    )
    processor = PoyoProcessor.from_config(config, {"s": units, "other": ["o/u0", "o/u1", "o/u2"]})
    torch.manual_seed(0)
    model = PoyoForDecoding(config).eval()
    return model, processor, units


def stream_and_compare(model, processor, session_id, times, ids, steps, rng, decoder, out_times=None, prepare=False):
    """Push random-size chunks (empty ones, ones running ahead of t_now), step, compare. With
    ``prepare``, ``decoder.prepare(next t_now)`` runs after each step (before the next chunks)."""
    pushed, worst = 0, 0.0
    for k, t_now in enumerate(steps):
        if prepare and k > 0:
            decoder.prepare(t_now)
        target = int(np.searchsorted(times, t_now + rng.uniform(-0.01, 0.03), side="right"))
        while pushed < target:  # several chunks of random size per step
            n = int(rng.integers(0, 15))
            decoder.push(times[pushed : min(pushed + n, target)], list(ids[pushed : min(pushed + n, target)]))
            pushed = min(pushed + n, target)
        out = decoder.step(t_now, None if out_times is None else out_times(t_now))
        ref, n_ref = offline(
            model, processor, session_id, times[:pushed], ids[:pushed], t_now, out.timestamps, decoder.readout
        )
        assert out.num_spikes == n_ref
        assert out.window_start == t_now - processor.sequence_length
        d = model.config.readout_dims[decoder.readout]
        np.testing.assert_allclose(out.predictions, ref[:, :d], atol=TOL, rtol=0)
        worst = max(worst, float(np.abs(out.predictions - ref[:, :d]).max()))
    return worst


def test_streaming_equals_offline_over_many_steps(mp_like, rng):
    model, processor, units = mp_like
    times, ids = poisson(units, 3.0, 20.0, rng)
    # Spikes exactly on the first windows' edges: kept at t0 and at t_now, as the offline crop does.
    edge = np.array([0.2, 1.2, 1.3])
    times = np.concatenate([times, edge])
    ids = np.concatenate([ids, np.asarray(["s/u1", "s/u2", "s/u3"], dtype=object)])
    order = np.argsort(times, kind="stable")
    times, ids = times[order], ids[order]
    decoder = PoyoStreamingDecoder(model, processor, "s", step=0.05, outputs_per_step=3, initial_capacity=8)
    steps = [1.2, 1.25, 1.3] + list(1.3 + 0.071 * np.arange(1, 22))  # window start crosses many spikes
    stream_and_compare(model, processor, "s", times, ids, steps, rng, decoder)
    assert decoder._kv.shape[1] > 8 + 2 * len(units)  # the buffer grew from its tiny start (and compacted)


def test_explicit_output_times_other_readout_and_far_clock(mp_like, rng):
    """A stream clock far from 0 (relative times are formed in float64, so nothing drifts),
    explicit output times anywhere in the window, the second readout."""
    model, processor, units = mp_like
    start = 86_400.0 * 3  # three days of uptime
    times, ids = poisson(units, 2.0, 30.0, rng, start=start)
    decoder = PoyoStreamingDecoder(model, processor, "s", readout="force")
    steps = start + 1.0 + 0.02 * np.arange(12)
    stream_and_compare(
        model, processor, "s", times, ids, steps, rng, decoder, out_times=lambda t: [t - 1.0, t - 0.31, t]
    )


def test_tiny_checkpoint_through_auto_classes(tiny_checkpoint, rng):
    model = AutoModel.from_pretrained(tiny_checkpoint).eval()
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    units = processor.session_units["sess_a"]
    times, ids = poisson(units, 2.5, 40.0, rng)
    decoder = PoyoStreamingDecoder(model, processor, "sess_a", step=0.02)
    steps = 1.0 + 0.02 * np.arange(1, 30)
    stream_and_compare(model, processor, "sess_a", times, ids, steps, rng, decoder)


def test_empty_window_and_new_outputs_only(mp_like):
    model, processor, _ = mp_like
    decoder = PoyoStreamingDecoder(model, processor, "s", step=0.02, outputs_per_step=2)
    out = decoder.step(5.0)
    np.testing.assert_allclose(out.timestamps, [4.99, 5.0])
    assert out.timestamps[-1] == 5.0 and out.num_spikes == 0
    ref, _ = offline(model, processor, "s", np.zeros(0), np.zeros(0, dtype=object), 5.0, out.timestamps)
    np.testing.assert_allclose(out.predictions, ref[:, :2], atol=TOL, rtol=0)


def test_bad_input_is_refused_with_a_message(mp_like):
    model, processor, _ = mp_like
    with pytest.raises(ValueError, match="'nope'.*add_session"):
        PoyoStreamingDecoder(model, processor, "nope")
    with pytest.raises(ValueError, match="window .*sequence_length"):
        PoyoStreamingDecoder(model, processor, "s", window=0.5)
    with pytest.raises(ValueError, match="step"):
        PoyoStreamingDecoder(model, processor, "s", step=0.0)
    with pytest.raises(ValueError, match="readout 'grip'"):
        PoyoStreamingDecoder(model, processor, "s", readout="grip")
    with pytest.raises(TypeError, match="PoyoProcessor"):
        PoyoStreamingDecoder(model, object(), "s")
    dec = PoyoStreamingDecoder(model, processor, "s")
    with pytest.raises(ValueError, match="non-decreasing within a chunk"):
        dec.push([0.3, 0.2], ["s/u0", "s/u1"])
    with pytest.raises(ValueError, match=r"'s/u99'.*'o/u0'|'o/u0'.*'s/u99'"):
        dec.push([0.1, 0.2, 0.3], ["s/u0", "s/u99", "o/u0"])  # another session's unit is not this one's
    with pytest.raises(ValueError, match="2 spike_times but 1 unit_ids"):
        dec.push([0.1, 0.2], ["s/u0"])
    with pytest.raises(ValueError, match="NaN"):
        dec.push([float("nan")], ["s/u0"])
    dec.push([0.5, 0.6], ["s/u0", "s/u1"])
    with pytest.raises(ValueError, match="before the newest spike"):
        dec.push([0.55], ["s/u0"])
    dec.push([0.6], ["s/u2"])  # a tie with the newest spike is fine
    dec.step(1.0)
    with pytest.raises(ValueError, match="non-decreasing"):
        dec.step(0.9)
    with pytest.raises(ValueError, match="output_timestamps"):
        dec.step(1.1, [0.05])  # before the window [0.1, 1.1]
    # Refused input left the stream as it was: still equal to the offline path.
    out = dec.step(1.2)
    ref, n = offline(
        model, processor, "s", np.array([0.5, 0.6, 0.6]), np.array(["s/u0", "s/u1", "s/u2"]), 1.2, out.timestamps
    )
    assert n == 3
    np.testing.assert_allclose(out.predictions, ref[:, :2], atol=TOL, rtol=0)


def _record_attends(decoder) -> list[tuple[bool, int]]:
    """(inside step()?, spikes attended) for every _attend_spikes call of ``decoder`` from now on.
    A step that used prepare()'s work makes one call; a step run in full makes none."""
    calls, in_step = [], [False]
    inner_attend, inner_step = decoder._attend_spikes, decoder.step

    def attend(lo, hi, t0, partial):
        calls.append((in_step[0], hi - lo))
        return inner_attend(lo, hi, t0, partial)

    def step(*a, **k):
        in_step[0] = True
        try:
            return inner_step(*a, **k)
        finally:
            in_step[0] = False

    decoder._attend_spikes, decoder.step = attend, step
    return calls


def test_prepared_steps_equal_offline_and_attend_only_new_spikes(mp_like, rng):
    """prepare() in the slack, then chunks pushed (random sizes, some running ahead of t_now,
    the buffer growing and compacting from a tiny start), then step: equal to offline, and the
    step itself attends only over the spikes pushed after prepare()."""
    model, processor, units = mp_like
    times, ids = poisson(units, 4.0, 25.0, rng)
    decoder = PoyoStreamingDecoder(model, processor, "s", step=0.02, outputs_per_step=2, initial_capacity=8)
    attended = _record_attends(decoder)
    steps = 1.0 + 0.02 * np.arange(1, 60)
    stream_and_compare(model, processor, "s", times, ids, steps, rng, decoder, prepare=True)
    at_step = [n for during, n in attended if during]
    at_prepare = [n for during, n in attended if not during]
    assert len(at_prepare) == len(steps) - 1 and len(at_step) == len(steps) - 1  # every step after the first used it
    # A window holds ~12 units x 25 Hz = 300 spikes; a step adds what arrived in ~20-50 ms.
    assert np.mean(at_prepare) > 200 and max(at_step) < 60
    assert decoder._kv.shape[1] > 8 + 2 * len(units)  # grew (and compacted) between prepare and step


def test_prepare_for_another_time_is_ignored(mp_like, rng):
    """A step at a time other than the prepared one runs in full (and stays equal to offline);
    prepare() refuses times before the last step."""
    model, processor, units = mp_like
    times, ids = poisson(units, 3.0, 25.0, rng)
    decoder = PoyoStreamingDecoder(model, processor, "s", step=0.05)
    pushed = int(np.searchsorted(times, 1.5, side="right"))
    decoder.push(times[:pushed], ids[:pushed])
    decoder.step(1.5)
    decoder.prepare()  # for 1.55, the default next step
    assert decoder._prepared[0] == 1.55
    more = int(np.searchsorted(times, 1.57, side="right"))
    decoder.push(times[pushed:more], ids[pushed:more])
    out = decoder.step(1.57)  # a late step: the prepared partial is for another window
    assert decoder._prepared is None
    ref, n = offline(model, processor, "s", times[:more], ids[:more], 1.57, out.timestamps)
    assert out.num_spikes == n
    np.testing.assert_allclose(out.predictions, ref[:, :2], atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="t_next .*last step"):
        decoder.prepare(1.5)
    with pytest.raises(ValueError, match="t_next"):
        decoder.prepare(float("nan"))



def test_default_prepare_survives_clock_rounding(mp_like, rng):
    """A loop stepping at t = 1 + 0.02 k and calling prepare() without t_next: prepare's
    ``last t_now + step`` misses t by an ulp in some steps (4 of these 48; 35% of bench streaming's
    410 steps up to 9.2 s), and the prepared work still serves every step, equal to offline."""
    model, processor, units = mp_like
    times, ids = poisson(units, 3.0, 25.0, rng)
    decoder = PoyoStreamingDecoder(model, processor, "s", step=0.02)
    calls = _record_attends(decoder)
    steps = 1.0 + 0.02 * np.arange(1, 50)
    assert np.sum(steps[:-1] + 0.02 != steps[1:]) >= 3  # the rounding this is about
    pushed = 0
    for k, t_now in enumerate(steps):
        j = int(np.searchsorted(times, t_now, side="right"))
        decoder.push(times[pushed:j], ids[pushed:j])
        pushed = j
        out = decoder.step(t_now)
        assert sum(during for during, _ in calls) == k  # every step after the first used prepare()'s work
        ref, n = offline(model, processor, "s", times[:j], ids[:j], t_now, out.timestamps)
        assert out.num_spikes == n
        np.testing.assert_allclose(out.predictions, ref[:, :2], atol=TOL, rtol=0)
        decoder.prepare()


@pytest.mark.parametrize("direction", [-1, 1])
def test_prepared_work_is_not_used_when_a_spike_sits_between_rounded_window_starts(mp_like, rng, direction):
    """prepare() for t_next one ulp before (after) t_now: a spike exactly at the prepared window's
    start (at this window's start) belongs to one window only, so the step runs in full, equal to
    offline; without that spike the prepared work is used."""
    model, processor, units = mp_like
    base_times, base_ids = poisson(units, 2.0, 25.0, rng)
    t_now = 1.5
    t_next = float(np.nextafter(t_now, t_now + direction))
    edge = (t_next if direction < 0 else t_now) - 1.0  # in [t_next - 1, ...) xor [t_now - 1, ...)
    for with_edge_spike in (True, False):
        keep = np.abs(base_times - edge) > 1e-3
        times, ids = base_times[keep], base_ids[keep]
        if with_edge_spike:
            at = int(np.searchsorted(times, edge))
            times, ids = np.insert(times, at, edge), np.insert(ids, at, units[0])
        decoder = PoyoStreamingDecoder(model, processor, "s", step=0.05)
        calls = _record_attends(decoder)
        first = int(np.searchsorted(times, 1.45, side="right"))
        decoder.push(times[:first], ids[:first])
        decoder.step(1.45)
        decoder.prepare(t_next)
        j = int(np.searchsorted(times, t_now, side="right"))
        decoder.push(times[first:j], ids[first:j])
        out = decoder.step(t_now)
        assert (not any(during for during, _ in calls)) is with_edge_spike  # in full iff the spike sets differ
        ref, n = offline(model, processor, "s", times[:j], ids[:j], t_now, out.timestamps)
        assert out.num_spikes == n
        np.testing.assert_allclose(out.predictions, ref[:, :2], atol=TOL, rtol=0)


@pytest.mark.parametrize("kernels", ["small", "onednn"])
def test_packed_products_equal_offline(rng, monkeypatch, kernels):
    """Every product of a step goes through cpu_kernels.small_linear with packed weights where the
    CPU kernels are built; without them (``POYO_HF_CPU_KERNELS=0``) the large per-step products at
    poyo-mp's latent count and heads (128 latent rows, 8 heads) go through oneDNN with packed weights
    (cpu_kernels.use_onednn). Either way the decode stays equal to the offline path, and
    ``POYO_HF_ONEDNN_LINEAR=0`` then builds a decoder without packed copies."""
    import shutil

    from poyo_hf.models.poyo.cpu_kernels import onednn_linear_enabled

    if kernels == "onednn":
        monkeypatch.setenv("POYO_HF_CPU_KERNELS", "0")
        if not onednn_linear_enabled():
            pytest.skip("torch built without oneDNN, or not an x86-64 machine")
    elif shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: the small-product kernel cannot be built")
    units = [f"s/u{i}" for i in range(12)]
    config = PoyoConfig.from_preset("poyo-mp", num_hidden_layers=2, unit_vocab_size=len(units) + 1, session_vocab_size=2)
    processor = PoyoProcessor.from_config(config, {"s": units})
    torch.manual_seed(0)
    model = PoyoForDecoding(config).eval()
    times, ids = poisson(units, 2.0, 20.0, rng)
    decoder = PoyoStreamingDecoder(model, processor, "s", step=0.02, outputs_per_step=2)
    kinds = [kind for kind, _ in decoder._packed.values()]
    if kernels == "small":
        # Per layer QKV, out-projection, fc1, fc2; the encoder's and decoder's fc1 and fc2, the
        # encoder's out-projection, the decoder's K/V and out-projection, the readout: all of them.
        assert kinds == ["small"] * (2 * 4 + 8)
    else:
        # Per layer QKV (128 x 64 -> 1536), out-projection (512 -> 64) and fc1 (64 -> 512), and the
        # encoder's fc1, pass the size threshold; every fc2, the encoder's out-projection (128 -> 64)
        # and the decoder's products stay below it.
        assert kinds == ["onednn"] * (2 * 3 + 1)
    stream_and_compare(model, processor, "s", times, ids, 1.0 + 0.05 * np.arange(1, 12), rng, decoder, prepare=True)
    if kernels == "onednn":
        monkeypatch.setenv("POYO_HF_ONEDNN_LINEAR", "0")
        assert PoyoStreamingDecoder(model, processor, "s")._packed == {}


@pytest.mark.parametrize("kernels", ["fused", "torch"])
def test_attention_paths_equal_offline(mp_like, rng, monkeypatch, kernels):
    """The decoder attends with the fused CPU kernel (cpu_kernels.attention, also serving
    prepare()'s partial sums through its log-sum-exp) where it is built, and with bmm / SDPA
    otherwise (``POYO_HF_CPU_KERNELS=0``, which the offline reference then follows too): both,
    with and without prepare(), stay equal to the offline path."""
    import shutil

    from poyo_hf.models.poyo import cpu_kernels

    if kernels == "torch":
        monkeypatch.setenv("POYO_HF_CPU_KERNELS", "0")
    elif shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: only the torch path can run")
    model, processor, units = mp_like
    times, ids = poisson(units, 3.0, 20.0, rng)
    steps = 1.0 + 0.03 * np.arange(1, 30)
    for prepare in (False, True):
        decoder = PoyoStreamingDecoder(model, processor, "s", step=0.03, outputs_per_step=2)
        assert decoder._fused == (kernels == "fused") == (cpu_kernels.kernels() is not None)
        stream_and_compare(model, processor, "s", times, ids, steps, rng, decoder, prepare=prepare)
