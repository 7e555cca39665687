"""Real-time POYO decoding: spikes arrive in chunks, the velocity of the newest timestamps comes out.

:class:`PoyoStreamingDecoder` keeps the last ``window`` seconds of spikes and, at each step, runs
the same computation as the offline path (``PoyoProcessor`` + ``PoyoForDecoding.forward`` on the
window ``[t_now - window, t_now]`` with the same query timestamps), minus every piece of work
that does not change from one step to the next. Equality with the offline path is tested to 1e-5.

Where the offline batch-1 forward spends its time (poyo-mp, 1 s window, 100 units at 20 Hz:
~2300 tokens; 1 thread; measured with ``torch.profiler`` on a shared 2-core machine, so read the
shares, not the absolute values):

* module timings at low load: encoder 8.7 ms (token K/V projection 1.1 ms, attention of 128
  latents over all tokens ~3.3 ms, the rest per-token embedding/rotary work), each of the 6
  self-attention layers 1.8 ms (QKV projection 0.30, SDPA 0.55, FFN 0.24, the rest small ops and
  module overhead), decoder 0.3 ms, processor (numpy tokenization) 0.8 ms;
* per op class under load (per step, offline -> streaming): linear layers 12.7 -> 9.7 ms, latent
  and decoder SDPA 8.4 -> 6.7, elementwise/copies/gathers 7.6 -> 5.6, encoder SDPA 5.2 -> 4.9,
  other ops 6.5 -> 2.2, Python/dispatch (incl. the processor) 11.8 -> 5.6; total 52 -> 35 ms.

What is left is the FLOP floor of the model: ~480 MFLOP for the latent stack plus ~150 MFLOP
(100 units) or ~430 MFLOP (300 units) of encoder attention per step. ``poyo-hf bench streaming``
measures both paths end to end.

Two later changes (session 3, A/B interleaved in one process, poyo-mp, 100 units, 2 threads):

* the latent self-attention and the decoder use explicit bmm + softmax with the attention scale
  folded into the queries (:func:`_attend`): 0.63 vs 0.72 ms per layer; the encoder keeps SDPA,
  which is ~2x faster than bmm over ~2300 strided keys;
* :meth:`PoyoStreamingDecoder.prepare`, called in the slack after a step, computes the next
  window's encoder attention over the spikes already pushed as softmax partial sums; the next
  step adds only the new chunk (~40 spikes) and merges. This moves the encoder's ~1.5-2 ms (SDPA
  over ~2300 keys, plus the per-spike rotation) off the path from a chunk's arrival to its
  decode: p50 7.1 vs 9.8 ms for the session-2 decoder in the same run (a slow phase of this
  shared machine). The rest - the 6-layer latent stack, ~3.8 ms at ~130-145 GFLOP/s - is the
  float32 matmul floor here (the 2-thread fp32 GEMM peak measured ~170 GFLOP/s).

Later (session 7): the products on the latent rows that pass ``cpu_kernels.use_onednn``'s size rule
(each layer's QKV, out-projection and fc1, the encoder's fc1) go through oneDNN with weights
packed once at construction, as ``PoyoLinear`` does at inference: p50 5.31 -> 4.87 ms and p99
8.87 -> 8.15 ms at 100 units (400 prepared steps, interleaved A/B; MKL's sgemm runs these at about
half oneDNN's speed on the AMD machine measured). The attention products stay on torch's bmm/SDPA
(oneDNN has no batched entry point in torch, and per-head calls cost more than they save).

Session 9: where the CPU kernels are built (``cpu_kernels``), every attention of a step runs in the
fused attention kernel (the encoder's, the latent layers', the decoder's; prepare()'s partial sums
come from its log-sum-exp), every product in the small-product linear kernel, and the spike phases
in the compiled phase loop; otherwise the paths above. Interleaved A/B in one process (two decoders
on the same chunks, 400 prepared steps, 2 threads), kernels vs the session-8 paths: 100 units
p50 3.37 vs 4.54 ms, p99 5.15 vs 6.88, prepare() 1.01 vs 1.71; 300 units p50 3.46 vs 4.55, p99
5.13 vs 6.68, prepare() 2.39 vs 4.26.

Evaluated and dropped (measured slower or not exact): caching each spike's rotation against a
fixed stream origin (not equal to the offline path within 1e-5, see below), ``torch.compile`` of the latent stack (46 s to compile, no gain:
inductor does not generate code for complex ops and the time is in matmul/SDPA), SDPA on 3-D
inputs (falls back to the unfused math path, ~2x slower than 4-D), advanced indexing of the complex
per-unit table (~6x slower than ``index_select``). The spike phases used cos/sin until session 8,
then ``torch.polar`` (on torch 2.13 the faster of the two: 2300 spikes 93 vs 213 us), then the
compiled phase loop (session 9: 19-21 vs 99-103 us for ``torch.polar``).

What the decoder caches, and why it is exact:

* **Per-unit K/V.** A spike token is ``unit_emb[u] + token_type_emb[spike]``, so its LayerNorm
  and K/V projection depend on the unit only: they are computed once per unit (not per spike per
  step). The start/end tokens of every unit sit at the fixed window times 0 and L, so their K/V,
  rotation included, are constants.
* **Latent queries.** The latent embeddings and the latent time grid (relative to the window
  start) are the same at every step, so the encoder's rotated latent queries, the latent rotary
  phases and the decoder's output query (``session_emb``) projection are constants.
* **Only the newest outputs.** The output cross-attention reads the latents; only the requested
  timestamps are decoded (the offline path decodes every padded query).
* **No processor, no dropout, no module overhead.** The forward is re-expressed with the model's
  own weights (``F.linear`` / ``F.layer_norm`` / SDPA), rotations applied in place.

What is recomputed at every step, and why:

* **Spike rotations.** Each spike's K/V are rotated by its time relative to the window start, as
  float32 angles ``float32(t - t0) * omega`` exactly like the offline path. Caching the rotation
  once per spike (keys rotated by time from a fixed stream origin, queries likewise, the origin
  re-anchored now and then) is exact in real arithmetic, but cannot reproduce the offline path's
  float32 rounding: the fastest rotary pair turns at ~6e4 rad/s, so float32 times and angles
  near 1 s are off by up to a few 1e-3 rad. Running the offline path with float64-accurate
  phases moved a randomly initialised poyo-mp's outputs by 1.8e-5 (and a 3e-8 s shift of all
  spike times by 1.8e-5): that is the offline path's own rounding noise, but above the 1e-5
  equality bound, so the rotation is recomputed per step (cos/sin of ~16 angles per spike plus
  one complex product per K/V pair, far below the attention's cost). Relative times are formed
  in float64 from absolute ones, so a clock far from 0 loses no precision (tested at 3 days).
* **The latent stack.** The latent grid is tied to the window start, which moves every step, and
  every latent reads every spike, so the encoder output and all self-attention layers change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..models.poyo.cpu_kernels import (
    SMALL_LINEAR_MAX_ROWS,
    attention_available,
    pack_small,
    pack_weight,
    packed_linear,
    rotary_phases,
    small_linear,
    use_onednn,
    use_small_linear,
)
from ..models.poyo.cpu_kernels import _attention as cpu_attention
from ..models.poyo.modeling_poyo import PoyoForDecoding, rotary_frequencies
from ..models.poyo.processing_poyo import TOKEN_END, TOKEN_SPIKE, TOKEN_START, PoyoProcessor

# prepare()'s work serves a step whose time differs from the prepared one by at most this many ulps
# (float64 rounding of the caller's clock arithmetic; see PoyoStreamingDecoder._prepared_fits).
PREPARED_ULPS = 4

# Shape legend: N spikes in the window, C buffer slots, U units of the session, N_lat latents,
# n_out outputs of one step, D hidden size, H heads, Dh head dim, R = Dh / 4 rotating pairs.


@dataclass
class StreamingOutput:
    """One step's decode.

    timestamps: (n_out,) float64 absolute times of the outputs (seconds, the stream's clock).
    predictions: (n_out, Do) float32 behaviour in physical units (the readout's dims only).
    window_start: float, the start ``t_now - window`` of the window that was decoded.
    num_spikes: int, spikes in that window.
    """

    timestamps: np.ndarray
    predictions: np.ndarray
    window_start: float
    num_spikes: int


def _rotate_(x: torch.Tensor, phase: torch.Tensor) -> None:
    """Rotate, in place, the first ``2 * R`` dims of ``x`` (..., Dh) as interleaved pairs by
    ``phase`` (complex, broadcastable to (..., R)); same arithmetic as ``apply_rotary``."""
    rot = 2 * phase.shape[-1]
    pairs = torch.view_as_complex(x[..., :rot].unflatten(-1, (-1, 2)))  # (..., R) complex view of x
    pairs.mul_(phase)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T) v for (H, Nq, Dh), (H, Nk, Dh) x 2 -> (Nq, H, Dh); ``q`` comes pre-scaled.

    The path without the CPU kernels (where they are built, ``cpu_kernels.attention`` takes the
    rotations too): explicit bmm + softmax, which beat SDPA at the latent self-attention's shape
    (batch 1, 8 heads x 128 x 128; fp32, 2 threads: 0.63 vs 0.72 ms p50 per layer). The result is
    the same softmax to float32 rounding (~1e-7)."""
    scores = torch.bmm(q, k.transpose(1, 2))  # (H, Nq, Nk)
    return torch.bmm(torch.softmax(scores, dim=-1), v).transpose(0, 1)


class PoyoStreamingDecoder:
    """Decode a live spike stream with a trained :class:`~poyo_hf.PoyoForDecoding`.

    Args:
        model: the decoder (any dtype is run in float32 on its device; eval semantics, no dropout).
        processor: the matching :class:`~poyo_hf.PoyoProcessor` (vocabularies, window length).
        session_id: the session being decoded (registered in ``processor``); its unit table gives
            the start/end tokens, exactly as the offline processor builds them.
        step: seconds between decodes (default 0.02); with ``outputs_per_step`` it sets the
            default output timestamps of :meth:`step`.
        window: context length in seconds; must equal ``config.sequence_length`` (the latent grid
            and the end tokens are laid out for it). Default: that value.
        outputs_per_step: default number of outputs per step, evenly spaced in
            ``(t_now - step, t_now]`` (the newest is ``t_now``).
        readout: readout name (default: the config's first).
        initial_capacity: spike slots allocated up front (default: 4x the spikes of a window at
            20 Hz per unit); the buffer grows by itself when a window holds more.

    The model's weights are read once, at construction: build a new decoder after changing them.

    Usage::

        dec = PoyoStreamingDecoder(model, processor, "session_a")
        for chunk_times, chunk_units, t_now in stream:   # absolute seconds, unit id strings
            dec.push(chunk_times, chunk_units)
            out = dec.step(t_now)                        # out.predictions: (1, 2) velocity
            dec.prepare()                                # optional: next step's work, in the slack

    For the lowest latency in a live loop, call :meth:`prepare` right after :meth:`step` and
    poll for the next chunk rather than block: a loop that sleeps between chunks starts each
    step on idle cores (``poyo-hf bench streaming``'s paced rows, 100 units, 2 threads, three
    runs: 0.0-0.6 ms more at p50 than spinning).
    """

    def __init__(
        self,
        model: PoyoForDecoding,
        processor: PoyoProcessor,
        session_id: str,
        step: float = 0.02,
        window: float | None = None,
        outputs_per_step: int = 1,
        readout: str | None = None,
        initial_capacity: int | None = None,
    ):
        if not isinstance(model, PoyoForDecoding):
            raise TypeError(f"model must be a PoyoForDecoding, got {type(model).__name__}.")
        if not isinstance(processor, PoyoProcessor):
            raise TypeError(f"processor must be a PoyoProcessor, got {type(processor).__name__}.")
        config = model.config
        processor.check_config(config)
        self.session_row = processor.session_row(session_id)  # ValueError naming an unknown session
        if session_id not in processor.session_units:
            raise ValueError(
                f"session {session_id!r} has no registered units; register them with "
                "processor.add_session(session_id, unit_ids)."
            )
        L = float(config.sequence_length)
        window = L if window is None else float(window)
        if not math.isclose(window, L, rel_tol=0.0, abs_tol=1e-9):
            raise ValueError(
                f"window ({window} s) must equal config.sequence_length ({L} s): the latent grid and the "
                "units' end tokens are laid out for that length."
            )
        if not (isinstance(step, (int, float)) and math.isfinite(step) and 0 < step <= L):
            raise ValueError(f"step must be a number of seconds in (0, {L}], got {step!r}.")
        if not (isinstance(outputs_per_step, int) and outputs_per_step >= 1):
            raise ValueError(f"outputs_per_step must be an int >= 1, got {outputs_per_step!r}.")
        readout = readout if readout is not None else config.readout_names[0]
        if readout not in config.readout_dims:
            raise ValueError(f"readout {readout!r} unknown; choose from {config.readout_names}.")

        self.model = model
        self.session_id = session_id
        self.window = L
        self.step_size = float(step)
        self.outputs_per_step = outputs_per_step
        self.readout = readout
        self._units = list(processor.session_units[session_id])
        self._local = {u: i for i, u in enumerate(self._units)}  # unit id -> row of the session table
        self._last_time = -math.inf  # newest spike pushed
        self._last_now = -math.inf  # newest step
        self._prepared: tuple | None = None  # (t_next, spikes done, softmax partial) from prepare()
        self._build_constants(processor)
        if initial_capacity is None:
            initial_capacity = max(256, int(4 * len(self._units) * L * 20))
        if not (isinstance(initial_capacity, int) and initial_capacity >= 1):
            raise ValueError(f"initial_capacity must be an int >= 1, got {initial_capacity!r}.")
        self._reset_buffer(capacity=initial_capacity)

    # -- constants (computed once) -----------------------------------------------------------
    @torch.inference_mode()
    def _build_constants(self, processor: PoyoProcessor) -> None:
        m = self.model.poyo
        c = self.model.config
        p0 = next(self.model.parameters())
        self.device = p0.device
        self.dtype = torch.float32
        dev, f32 = self.device, self.dtype
        # Weights in float32 on the model's device (a no-op copy for a float32 model).
        self._w = {k: v.detach().to(dev, f32) for k, v in self.model.state_dict().items() if v.is_floating_point()}
        self.H_x = c.num_cross_attention_heads
        self.H_s = c.num_self_attention_heads
        self.Dh = c.head_dim
        self.R = c.head_dim // 4
        scale = c.head_dim**-0.5  # the model's attention scaling, folded into every query once
        self.omega = rotary_frequencies(c.head_dim, c.rotary_t_min, c.rotary_t_max, dev)  # (R,)
        enc = "poyo.encoder.cross_attn."

        # Per-unit K/V of spike / start / end tokens: LN_c(unit_emb[u] + type_emb[k]) @ Wkv.
        rows = torch.as_tensor(processor.unit_rows(self._units), device=dev)  # (U,)
        unit_vec = self._w["poyo.unit_emb.weight"][rows]  # (U, D)
        types = self._w["poyo.token_type_emb.weight"]  # (T, D)

        def kv_of(token_type: int) -> torch.Tensor:
            ctx = self._ln(unit_vec + types[token_type], enc + "context_norm")  # (U, D)
            return F.linear(ctx, self._w[enc + "kv_proj.weight"]).unflatten(-1, (2 * self.H_x, self.Dh))  # (U, 2H, Dh)

        self._unit_kv = kv_of(TOKEN_SPIKE).transpose(0, 1).contiguous()  # (2H, U, Dh)
        rot_dims = self._unit_kv[..., : 2 * self.R].unflatten(-1, (-1, 2)).contiguous()  # (2H, U, R, 2)
        self._unit_kv_rot = torch.view_as_complex(rot_dims)  # (2H, U, R) complex
        start = kv_of(TOKEN_START)  # (U, 2H, Dh), time 0
        end = kv_of(TOKEN_END)  # (U, 2H, Dh), time L
        _rotate_(start, self._phase(torch.zeros(1, device=dev))[:, None, :])  # (1, 1, R)
        _rotate_(end, self._phase(torch.full((1,), self.window, device=dev))[:, None, :])
        # Offline order: per unit (start, end) pairs, then spikes; any order gives the same softmax.
        self._edge_kv = torch.stack([start, end], dim=1).flatten(0, 1).transpose(0, 1).contiguous()  # (2H, 2U, Dh)

        # Latent grid (relative to the window start; the same at every step).
        lat_index, lat_times = m.latent_grid(dev)
        self._lat_phase = self._phase(lat_times)  # (N_lat, R)
        self._latents0 = self._w["poyo.latent_emb.weight"][lat_index]  # (N_lat, D)
        q = F.linear(self._ln(self._latents0, enc + "norm"), self._w[enc + "q_proj.weight"])  # (N_lat, H*Dh)
        q = q.unflatten(-1, (self.H_x, self.Dh))  # (N_lat, H, Dh)
        _rotate_(q, self._lat_phase[:, None, :])
        self._enc_q = (q * scale).transpose(0, 1).contiguous()  # (H, N_lat, Dh), pre-scaled
        # The start/end tokens' softmax partial (the same at every step), where prepare() starts.
        H = self.H_x
        s_edge = torch.bmm(self._enc_q, self._edge_kv[:H].transpose(1, 2))  # (H, N_lat, 2U)
        m_edge = s_edge.amax(dim=-1, keepdim=True)  # (H, N_lat, 1)
        p_edge = torch.exp(s_edge - m_edge)
        self._edge_partial = (m_edge, p_edge.sum(dim=-1, keepdim=True), torch.bmm(p_edge, self._edge_kv[H:]))

        # Decoder query: session embedding -> LN -> q_proj (rotated per step by the output times).
        dec = "poyo.decoder.cross_attn."
        s = self._w["poyo.session_emb.weight"][self.session_row]  # (D,)
        self._dec_query = s[None, :]  # (1, D)
        self._dec_q = F.linear(self._ln(s[None, :], dec + "norm"), self._w[dec + "q_proj.weight"]) * scale  # (1, H*Dh)

        # Self-attention layers: the query rows of each QKV projection pre-scaled (rotation is
        # linear, so scaling before it is the same as scaling the scores).
        self._layers = []
        for i in range(c.num_hidden_layers):
            a = f"poyo.layers.{i}.self_attn."
            qkv_w = self._w[a + "qkv_proj.weight"].clone()  # (3*H*Dh, D)
            qkv_w[: self.H_s * self.Dh] *= scale
            self._layers.append((f"poyo.layers.{i}.", qkv_w))

        # The products of every step, with packed weights: through cpu_kernels.small_linear where it
        # applies (the model's own rule, PoyoLinear at inference on few rows: a step ~10% faster than
        # with oneDNN / MKL), else through oneDNN where cpu_kernels.use_onednn says so (7-13% faster
        # at p50 than F.linear, 100 units, three interleaved A/B runs of 400 steps), else F.linear.
        self._packed: dict[int, tuple[str, object]] = {}  # id(weight) -> (kind, packed copy)
        n_lat, n_out = self._latents0.shape[0], self.outputs_per_step
        lat = [(enc + "o_proj.weight", enc + "o_proj.bias"), (dec + "kv_proj.weight", None)]  # on the latent rows
        out = [(dec + "o_proj.weight", dec + "o_proj.bias"), (f"readouts.{self.readout}.weight", f"readouts.{self.readout}.bias")]
        for block in ["poyo.encoder.ffn."] + [p + "ffn." for p, _ in self._layers]:
            lat += [(block + "fc1.weight", block + "fc1.bias"), (block + "fc2.weight", block + "fc2.bias")]
        out += [("poyo.decoder.ffn.fc1.weight", "poyo.decoder.ffn.fc1.bias"), ("poyo.decoder.ffn.fc2.weight", "poyo.decoder.ffn.fc2.bias")]
        pairs = [(self._w[w], None if b is None else self._w[b], n) for names, n in ((lat, n_lat), (out, n_out)) for w, b in names]
        pairs += [(qkv_w, None, n_lat) for _, qkv_w in self._layers]
        pairs += [(self._w[p + "self_attn.o_proj.weight"], self._w[p + "self_attn.o_proj.bias"], n_lat) for p, _ in self._layers]
        for w, b, rows in pairs:
            probe = torch.empty(rows, w.shape[1], device=dev)
            if use_small_linear(probe, w, b):  # (in inference mode here: no gradient)
                self._packed[id(w)] = ("small", pack_small(w, b))
            elif use_onednn(probe, w):
                self._packed[id(w)] = ("onednn", pack_weight(w, rows))

        # The fused CPU attention kernel (cpu_kernels.attention) where it applies: float32 CPU,
        # a supported head dim, the kernels built. Checked once, here.
        self._fused = attention_available(self._latents0, self.Dh)

        # Readout head and target statistics (physical units).
        self._head = f"readouts.{self.readout}."
        d = c.readout_dims[self.readout]
        self._mean = torch.tensor(c.target_mean[self.readout][:d], dtype=f32, device=dev)
        self._std = torch.tensor(c.target_std[self.readout][:d], dtype=f32, device=dev)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear``, or the same product with the weight's packed copy where one was made (a
        small-product copy holds its bias, the one passed here)."""
        kind, packed = self._packed.get(id(weight), (None, None))
        if kind == "small" and x.shape[-2] <= SMALL_LINEAR_MAX_ROWS:
            return small_linear(x, packed)
        if kind == "onednn":
            return packed_linear(x, packed, bias)
        return F.linear(x, weight, bias)

    def _ln(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        w, b = self._w[prefix + ".weight"], self._w[prefix + ".bias"]
        return F.layer_norm(x, w.shape, w, b)

    def _phase(self, rel_times: torch.Tensor) -> torch.Tensor:
        """float32 seconds (...) -> complex64 (..., R); the offline rotary embedding's arithmetic."""
        return rotary_phases(rel_times, self.omega)  # (..., R)

    # -- the spike buffer ----------------------------------------------------------------------
    def _reset_buffer(self, capacity: int) -> None:
        """Slots [0, 2U) are scratch for the units' start/end tokens, which are copied right in
        front of the window's first spike at each step so SDPA sees one contiguous key range."""
        U2 = 2 * len(self._units)
        C = U2 + capacity
        self._kv = torch.zeros(2 * self.H_x, C, self.Dh, device=self.device)  # (2H, C, Dh) rotated K|V
        self._times = torch.zeros(C, dtype=torch.float64, device=self.device)  # (C,) absolute spike times
        self._unit = torch.zeros(C, dtype=torch.long, device=self.device)  # (C,) session-local unit row
        self._lo = self._hi = U2  # live spikes are slots [lo, hi)

    def _make_room(self, n: int) -> None:
        U2 = 2 * len(self._units)
        C = self._kv.shape[1]
        if self._hi + n <= C:
            return
        live = self._hi - self._lo
        if U2 + live + n > C - (C - U2) // 4:  # grow (keep a quarter free so compaction stays rare)
            old_kv, old_t, old_u, lo, hi = self._kv, self._times, self._unit, self._lo, self._hi
            self._reset_buffer(capacity=2 * (live + n) + 256)
            self._kv[:, U2 : U2 + live] = old_kv[:, lo:hi]
            self._times[U2 : U2 + live] = old_t[lo:hi]
            self._unit[U2 : U2 + live] = old_u[lo:hi]
        else:  # compact: move the live spikes to the front
            lo, hi = self._lo, self._hi
            self._kv[:, U2 : U2 + live] = self._kv[:, lo:hi].clone()
            self._times[U2 : U2 + live] = self._times[lo:hi].clone()
            self._unit[U2 : U2 + live] = self._unit[lo:hi].clone()
        self._lo, self._hi = U2, U2 + live

    def push(self, spike_times: Sequence[float] | np.ndarray, unit_ids: Sequence[str] | np.ndarray) -> None:
        """Add a chunk of spikes: ``spike_times`` (S,) absolute seconds, non-decreasing and not
        before any spike already pushed; ``unit_ids`` (S,) unit id strings of the session."""
        times = np.asarray(spike_times, dtype=np.float64).reshape(-1)
        ids = list(np.asarray(unit_ids, dtype=object).reshape(-1)) if not isinstance(unit_ids, list) else unit_ids
        if len(ids) != times.size:
            raise ValueError(f"push got {times.size} spike_times but {len(ids)} unit_ids; give one unit per spike.")
        if times.size == 0:
            return
        if not np.all(np.isfinite(times)):
            raise ValueError("spike_times contains NaN or inf; drop those spikes before push().")
        if np.any(np.diff(times) < 0):
            i = int(np.argmax(np.diff(times) < 0))
            raise ValueError(
                f"spike_times must be non-decreasing within a chunk, got {times[i]!r} then {times[i + 1]!r} "
                f"at positions {i} and {i + 1}; sort the chunk by time."
            )
        if times[0] < self._last_time:
            raise ValueError(
                f"spike time {times[0]!r} is before the newest spike already pushed ({self._last_time!r}); "
                "spikes must arrive in time order (sort or merge chunks before pushing)."
            )
        try:
            local = [self._local[u] for u in ids]
        except (KeyError, TypeError):
            unknown = sorted({repr(u) for u in ids if not isinstance(u, str) or u not in self._local})
            raise ValueError(
                f"unit ids {', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''} are not units of session "
                f"{self.session_id!r}; register them with processor.add_session(...) and "
                "model.grow_vocabularies(processor), then build a new PoyoStreamingDecoder."
            ) from None
        n = times.size
        self._make_room(n)
        hi = self._hi
        self._times[hi : hi + n] = torch.from_numpy(times).to(self.device)
        local_t = torch.as_tensor(local, dtype=torch.long, device=self.device)  # (n,)
        self._unit[hi : hi + n] = local_t
        rot = 2 * self.R  # pass-through dims never change: written once per spike
        self._kv[:, hi : hi + n, rot:] = self._unit_kv[:, local_t, rot:]  # (2H, n, Dh - 2R)
        self._hi = hi + n
        self._last_time = float(times[-1])

    # -- one decode ----------------------------------------------------------------------------
    def default_output_times(self, t_now: float) -> np.ndarray:
        """The ``outputs_per_step`` timestamps evenly spaced in ``(t_now - step, t_now]``."""
        n = self.outputs_per_step
        back = np.arange(n - 1, -1, -1, dtype=np.float64) * (self.step_size / n)  # (n,) seconds before t_now
        return t_now - back  # the newest is exactly t_now (t_now - step + step may round past it)

    def _window_slots(self, t0: float, t_now: float) -> tuple[int, int]:
        """Buffer slots [lo, hi) of the live spikes with t0 <= t <= t_now (the offline crop)."""
        live = self._times[self._lo : self._hi]
        lo = self._lo + int(torch.searchsorted(live, t0, right=False))
        hi = self._lo + int(torch.searchsorted(live, t_now, right=True))
        return lo, hi

    def _rotate_spikes(self, lo: int, hi: int, t0: float) -> None:
        """Write the K/V of the spikes in slots [lo, hi) rotated by float32(t - t0): the rotating
        dims of the per-unit projections, over the buffer's rotating dims (push wrote the rest)."""
        # The offline float32 angles float32(t - t0) * omega, through cpu_kernels.rotary_phases as
        # offline (torch.polar where the kernels are not built).
        phase = self._phase(self._times[lo:hi] - t0)  # (N, R) complex
        dst = torch.view_as_complex(self._kv[:, lo:hi, : 2 * self.R].unflatten(-1, (-1, 2)))  # (2H, N, R) view
        torch.mul(self._unit_kv_rot.index_select(1, self._unit[lo:hi]), phase, out=dst)  # index_select: ~6x aten::index

    def _attend_spikes(self, lo: int, hi: int, t0: float, partial: tuple) -> tuple:
        """Fold the spikes in slots [lo, hi) (rotated for the window starting at ``t0``) into the
        encoder's softmax partial ``(m, denom, acc)``: running max (H, N_lat, 1), sum of exp(s - m)
        (H, N_lat, 1) and the exp-weighted sum of values (H, N_lat, Dh) - the online softmax of
        flash attention, written out because SDPA does not return its partial sums."""
        m, denom, acc = partial
        if hi <= lo:
            return m, denom, acc
        self._rotate_spikes(lo, hi, t0)
        H = self.H_x
        k, v = self._kv[:H, lo:hi], self._kv[H:, lo:hi]  # (H, n, Dh) each
        if self._fused:  # the kernel's normalised output and log-sum-exp are the partial (lse, 1, out)
            out, lse = cpu_attention(self._enc_q[None], k[None], v[None], scale=1.0, return_lse=True)
            m_part, p_sum, p_acc = lse[0, :, :, None], 1.0, out[0].transpose(0, 1)  # (H, N_lat, 1), (H, N_lat, Dh)
            m_new = torch.maximum(m, m_part)
            decay, decay_part = torch.exp(m - m_new), torch.exp(m_part - m_new)  # (H, N_lat, 1) each
            return m_new, denom * decay + decay_part * p_sum, acc * decay + p_acc * decay_part
        s = torch.bmm(self._enc_q, k.transpose(1, 2))  # (H, N_lat, n)
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        p = torch.exp(s - m_new)  # (H, N_lat, n)
        decay = torch.exp(m - m_new)  # (H, N_lat, 1)
        denom = denom * decay + p.sum(dim=-1, keepdim=True)
        acc = torch.baddbmm(acc * decay, p, v)  # acc * decay + p @ v
        return m_new, denom, acc

    @torch.inference_mode()
    def prepare(self, t_next: float | None = None) -> None:
        """Do the next step's work that does not wait for new spikes, in the slack between steps.

        Optional. For the step at ``t_next`` (default: the last step's ``t_now`` + ``step``), the
        encoder's attention over every spike already pushed into ``[t_next - window, t_next]``
        (rotation, scores, softmax partial sums) is computed now; :meth:`step` at ``t_next`` (or
        within ``PREPARED_ULPS`` float64 ulps of it, as a clock computed ``start + k * step`` lands
        against the default, with the same spikes in the window) then only adds the spikes pushed
        since, and otherwise ignores this work and runs in full. The result equals the unprepared
        step to float32 rounding (the softmax is summed in two parts). Call it right after :meth:`step` returns: it moves ~1/4 of the
        per-step compute (poyo-mp, 100 units) off the path from a chunk's arrival to its decode.
        """
        t_next = self._last_now + self.step_size if t_next is None else float(t_next)
        if not math.isfinite(t_next) or t_next < self._last_now:
            raise ValueError(
                f"t_next must be finite and not before the last step ({self._last_now!r}), got {t_next!r}; "
                "call step() first or pass t_next."
            )
        t0 = t_next - self.window
        lo, hi = self._window_slots(t0, t_next)
        self._prepared = (t_next, hi - lo, *self._attend_spikes(lo, hi, t0, self._edge_partial))

    def _prepared_fits(self, prepared: tuple, t_now: float, lo: int, hi: int) -> bool:
        """Whether prepare()'s work (for the step at ``t_next = prepared[0]``) serves the step at ``t_now``.

        Exactly when ``t_next == t_now``. Also when they differ by float64 rounding alone (at most
        ``PREPARED_ULPS`` ulps of ``t_now``: a loop stepping ``t = start + k * step`` lands an ulp away
        from prepare()'s default ``last t_now + step`` in some steps, 35% of bench streaming's), provided
        the spikes are the same: none between the two window starts, and none of the prepared ones
        after ``t_now``. The prepared spikes were then rotated by ``float32(t - t_next + window)``
        instead of ``float32(t - t_now + window)``, which differ only where the shift crosses a
        float32 rounding boundary (a fraction ~shift / 6e-8 of the spikes: ~3e-8 for one ulp at a
        clock near 10 s), by one float32 ulp: the size of the rounding the relative times carry anyway.
        """
        t_next, n_done = prepared[0], prepared[1]
        if t_next == t_now:
            return True
        if abs(t_next - t_now) > PREPARED_ULPS * math.ulp(t_now):
            return False
        # Slots [lo, hi) hold this step's spikes (times sorted); slot lo - 1 an earlier spike, or a
        # scratch zero (then at worst the step runs in full). prepare() took the first spike >= t0p.
        t0, t0p, times = t_now - self.window, t_next - self.window, self._times
        if t0p < t0 and lo > 0 and float(times[lo - 1]) >= t0p:
            return False  # prepared a spike in [t0p, t0), before this window
        if t0p > t0 and lo < hi and float(times[lo]) < t0p:
            return False  # this window starts with a spike in [t0, t0p) that prepare() skipped
        return n_done == 0 or float(times[lo + n_done - 1]) <= t_now  # none prepared after t_now

    @torch.inference_mode()
    def step(self, t_now: float, output_timestamps: Sequence[float] | np.ndarray | None = None) -> StreamingOutput:
        """Decode the window ``[t_now - window, t_now]`` at ``output_timestamps`` (absolute
        seconds inside that window; default :meth:`default_output_times`). ``t_now`` must not
        go backwards. Spikes pushed with times after ``t_now`` wait for a later step."""
        t_now = float(t_now)
        if not math.isfinite(t_now) or t_now < self._last_now:
            raise ValueError(f"t_now must be finite and non-decreasing, got {t_now!r} after {self._last_now!r}.")
        t0 = t_now - self.window
        if output_timestamps is None:
            out_t = self.default_output_times(t_now)
        else:
            out_t = np.asarray(output_timestamps, np.float64).reshape(-1)
        rel_out = out_t - t0
        if out_t.size == 0 or not np.all(np.isfinite(rel_out)) or rel_out.min() < 0 or rel_out.max() > self.window:
            raise ValueError(
                f"output_timestamps must be a non-empty list of times in the window [{t0!r}, {t_now!r}], got {out_t!r}."
            )
        self._last_now = t_now

        # Evict spikes older than the window start; select those up to t_now.
        lo, hi = self._window_slots(t0, t_now)
        self._lo = lo
        N = hi - lo
        prepared, self._prepared = self._prepared, None
        H = self.H_x
        if prepared is not None and self._prepared_fits(prepared, t_now, lo, hi):
            # prepare(t_now) already attended over the spikes pushed before it: only the newer
            # ones are rotated and attended here, and the two softmax partials merged.
            _, n_done, *partial = prepared
            _, denom, acc = self._attend_spikes(lo + n_done, hi, t0, tuple(partial))
            a = (acc / denom).transpose(0, 1)  # (N_lat, H, Dh)
        else:
            self._rotate_spikes(lo, hi, t0)
            U2 = self._edge_kv.shape[1]
            kv = self._kv
            kv[:, lo - U2 : lo] = self._edge_kv  # start/end tokens just in front (slots of evicted spikes)
            k = kv[:H, lo - U2 : hi]  # (H, 2U + N, Dh)
            v = kv[H:, lo - U2 : hi]  # (H, 2U + N, Dh)
            if self._fused:
                a = cpu_attention(self._enc_q[None], k[None], v[None], scale=1.0)[0]  # (N_lat, H, Dh)
            else:  # SDPA, not bmm: over ~2300 strided spike keys torch's fused kernel is ~2x faster
                a = F.scaled_dot_product_attention(self._enc_q[None], k[None], v[None], scale=1.0)[0].transpose(0, 1)

        enc = "poyo.encoder."
        _rotate_(a, self._lat_phase.conj()[:, None, :])  # rotate back by -t_lat
        a = a.flatten(1)  # (N_lat, H*Dh)
        x = self._latents0 + self._linear(
            a, self._w[enc + "cross_attn.o_proj.weight"], self._w[enc + "cross_attn.o_proj.bias"]
        )
        x = x + self._ffn(x, enc + "ffn.")  # (N_lat, D)
        for prefix, qkv_w in self._layers:
            x = self._self_layer(x, prefix, qkv_w)

        # Decoder: only the requested outputs.
        dec = "poyo.decoder."
        n_out = out_t.size
        rel32 = torch.as_tensor(rel_out.astype(np.float32), device=self.device)  # (n_out,) like the processor
        out_phase = self._phase(rel32)  # (n_out, R)
        ctx = self._ln(x, dec + "cross_attn.context_norm")
        lkv = self._linear(ctx, self._w[dec + "cross_attn.kv_proj.weight"]).unflatten(
            -1, (2 * H, self.Dh)
        )  # (N_lat, 2H, Dh)
        lk, lv = lkv.split(H, dim=1)  # (N_lat, H, Dh) each
        q = self._dec_q.expand(n_out, -1).unflatten(-1, (H, self.Dh))  # (n_out, H, Dh), not yet rotated
        if self._fused:  # the kernel rotates Q by the output times and K by the latent times
            o = cpu_attention(
                q.transpose(0, 1)[None], lk.transpose(0, 1)[None], lv.transpose(0, 1)[None], None, 1.0, False,
                out_phase[None], self._lat_phase[None],
            )[0]  # (n_out, H, Dh)
        else:
            q = q.clone()
            _rotate_(q, out_phase[:, None, :])
            lk = lk.contiguous()
            _rotate_(lk, self._lat_phase[:, None, :])
            o = _attend(q.transpose(0, 1), lk.transpose(0, 1), lv.transpose(0, 1))
        o = o.flatten(1)  # (n_out, H*Dh)
        y = self._dec_query + self._linear(
            o, self._w[dec + "cross_attn.o_proj.weight"], self._w[dec + "cross_attn.o_proj.bias"]
        )
        y = y + self._ffn(y, dec + "ffn.")  # (n_out, D)
        pred = self._linear(y, self._w[self._head + "weight"], self._w[self._head + "bias"])  # (n_out, Do)
        pred = pred * self._std + self._mean
        return StreamingOutput(out_t, pred.cpu().numpy(), t0, N)

    def _ffn(self, x: torch.Tensor, p: str) -> torch.Tensor:
        h, gate = self._linear(self._ln(x, p + "norm"), self._w[p + "fc1.weight"], self._w[p + "fc1.bias"]).chunk(2, dim=-1)
        return self._linear(h * F.gelu(gate), self._w[p + "fc2.weight"], self._w[p + "fc2.bias"])

    def _self_layer(self, x: torch.Tensor, p: str, qkv_w: torch.Tensor) -> torch.Tensor:
        H, Dh = self.H_s, self.Dh
        a = p + "self_attn."
        qkv = self._linear(self._ln(x, a + "norm"), qkv_w).unflatten(
            -1, (3 * H, Dh)
        )  # (N_lat, 3H, Dh)
        if self._fused:  # Q, K and V rotated by the latent times and the output back, in the kernel
            q, k, v = qkv.transpose(0, 1)[None].split(H, dim=1)  # (1, H, N_lat, Dh) each
            phase = self._lat_phase[None]  # (1, N_lat, R)
            o = cpu_attention(q, k, v, None, 1.0, False, phase, phase, True)[0]  # (N_lat, H, Dh)
        else:
            _rotate_(qkv, self._lat_phase[:, None, :])  # Q, K and V rotated by the latent times
            q, k, v = qkv.transpose(0, 1).split(H, dim=0)  # (H, N_lat, Dh) each
            o = _attend(q, k, v)  # (N_lat, H, Dh)
            _rotate_(o, self._lat_phase.conj()[:, None, :])  # rotate back by -t_lat
        o = o.flatten(1)  # (N_lat, H*Dh)
        x = x + self._linear(o, self._w[a + "o_proj.weight"], self._w[a + "o_proj.bias"])
        return x + self._ffn(x, p + "ffn.")


__all__ = ["PoyoStreamingDecoder", "StreamingOutput"]
