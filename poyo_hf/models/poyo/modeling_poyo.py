"""POYO: a PerceiverIO over spike tokens with rotary time embeddings.

Azabou et al., "A Unified, Scalable Framework for Neural Population Decoding", NeurIPS 2023.

Data flow (one context window, times in seconds relative to the window start)::

    spike tokens (unit_emb + token_type_emb, time t_i)      latents (latent_emb, time grid)
                  \\                                         /
                   rotary cross-attention (Q,K,V rotated; output counter-rotated)
                                        |
                 depth x [rotary self-attention (Q,K,V rotated) + GEGLU FFN]
                                        |
    output queries (session_emb, any times) -> rotary cross-attention (Q,K rotated, V not)
                                        |
                                   GEGLU FFN -> readout

Time enters only through rotary angles; no absolute time embedding is ever added, which makes
the model invariant to a shift of all timestamps (tested).

Shape legend used in the comments:
    B      windows in the batch
    N_in   input tokens (spikes + 2 per unit, padded to a multiple of 8)
    N_lat  latents (latent steps * latents per step)
    N_out  output queries (padded)
    D      hidden size
    H      attention heads
    Dh     head dim (64)
    Do     readout output dim

Rotary convention (pinned by tests): for a token at time t, the first ``Dh/2`` dims of each
head rotate as interleaved pairs (x[2k], x[2k+1]) by angle ``omega_k * t`` with
``omega_k = 2 pi / period_k`` and periods log-spaced from t_min to t_max (both included);
the other half is left as is. A pair rotates as ``(x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_poyo import PoyoConfig
from .cpu_kernels import PoyoLinear, attention_available, draw_seed, kernels, rotary_phases
from .cpu_kernels import _attention as cpu_attention

# ----------------------------------------------------------------------------------------
# Primitives (plain scalars in, testable against closed-form math)
# ----------------------------------------------------------------------------------------


def _kept(module: nn.Module, name: str, key: tuple, make):
    """``make()``, kept on ``module`` (a plain attribute: no state dict, no buffer, no meta-device
    init) and returned again while ``key`` stays the same. Made outside inference mode (an
    inference tensor cannot be saved for backward by a later training forward) and without
    autograd history."""
    cached = module.__dict__.get(name)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.inference_mode(False), torch.no_grad():
        value = make()
    if not torch.compiler.is_compiling():
        module.__dict__[name] = (key, value)
    return value


def rotary_frequencies(
    head_dim: int, t_min: float, t_max: float, device: torch.device | None = None
) -> torch.Tensor:
    """Angular frequencies (rad/s) of the rotating pairs: (head_dim // 4,) float32.

    Periods are log-spaced from ``t_min`` to ``t_max`` with both ends included. Computed in
    float32 exactly as the reference does (exp of a lerp of logs), so converted checkpoints
    see the same angles.
    """
    num = head_dim // 4  # rotate_dim = head_dim // 2 dims -> head_dim // 4 pairs
    exponents = torch.linspace(0.0, 1.0, num, dtype=torch.float32, device=device)
    log_min = torch.tensor(t_min, dtype=torch.float32, device=device).log()
    log_max = torch.tensor(t_max, dtype=torch.float32, device=device).log()
    periods = torch.exp(torch.lerp(log_min, log_max, exponents))  # (Dh/4,)
    return 2 * math.pi / periods


class PoyoRotaryTimeEmbedding(nn.Module):
    """Turns timestamps into unit complex phases ``exp(i * omega_k * t)`` for :func:`apply_rotary`.

    Always computed in float32 with autocast off: sub-millisecond spike timing does not survive
    bf16 angles (the fastest frequency is ~6e4 rad/s). The frequencies are recomputed from the
    scalars instead of being stored as a buffer, so ``from_pretrained`` (meta-device init)
    can never leave them uninitialised; the cost is a handful of scalar ops per forward.
    """

    def __init__(self, head_dim: int, t_min: float, t_max: float):
        super().__init__()
        if head_dim % 4 != 0:
            raise ValueError(f"head_dim must be a multiple of 4, got {head_dim}.")
        self.head_dim = head_dim
        self.t_min = t_min
        self.t_max = t_max

    def frequencies(self, device: torch.device) -> torch.Tensor:
        """:func:`rotary_frequencies` for this embedding on ``device``, kept from the last call (a
        plain attribute, not a buffer: made at forward time, never by meta-device init)."""
        key = (device, self.head_dim, self.t_min, self.t_max)
        return _kept(self, "_omega", key, lambda: rotary_frequencies(self.head_dim, self.t_min, self.t_max, device))

    def forward(self, timestamps: torch.Tensor) -> torch.Tensor:
        """timestamps (...) -> complex64 phases (..., head_dim // 4), one per rotating pair."""
        with torch.autocast(device_type=timestamps.device.type, enabled=False):
            return rotary_phases(timestamps, self.frequencies(timestamps.device))  # (..., Dh/4)


def pad_phase(phase: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Extend phases (..., R) to all ``head_dim // 2`` pairs of a head with phase 1 (angle 0).

    :func:`apply_rotary` then rotates whole heads in one complex product; the padded pairs pass
    through exactly, since (a + ib)(1 + 0i) = (a*1 - b*0) + i(a*0 + b*1) = a + ib in IEEE
    arithmetic for finite a, b. Compute it once per time stream and reuse it in every layer.
    """
    pairs = head_dim // 2
    if phase.shape[-1] == pairs:
        return phase
    if phase.shape[-1] > pairs:
        raise ValueError(f"phase has {phase.shape[-1]} pairs but a head of {head_dim} dims has only {pairs}.")
    ones = torch.ones(*phase.shape[:-1], pairs - phase.shape[-1], dtype=phase.dtype, device=phase.device)
    return torch.cat((phase, ones), dim=-1)


def apply_rotary(x: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``2 * phase.shape[-1]`` dims of every head of ``x`` as interleaved
    pairs (x[2k], x[2k+1]) by the phase's angle; the remaining dims pass through.

    x: (B, N, H, Dh) with heads on dim -2; phase: (B, N, Dh/4) complex (shared by the heads), or
    (B, N, Dh/2) already padded by :func:`pad_phase`. A pair read as the complex number
    x[2k] + i x[2k+1] is multiplied by exp(i * angle), in float32. The whole head goes through
    one complex product (pass-through pairs times 1, exact): split + rotate + cat cost 2.1x as
    much on the benchmark batch's encoder keys (32 x 2194 x 4 heads: 50.9 vs 24.0 ms).
    """
    phase = pad_phase(phase, x.shape[-1])
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, N, H, Dh/2)
    return torch.view_as_real(pairs * phase.unsqueeze(-2)).flatten(-2).to(x.dtype)  # (B, N, H, Dh)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention: explicit softmax(QK^T * scale) V.

    query (B, H, Nq, Dh), key/value (B, H, Nk, Dh), attention_mask bool (B, 1, 1|Nq, Nk) with
    True = attend. Returns (B, Nq, H, Dh) like the transformers attention interface.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, Nq, Nk)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value)  # (B, H, Nq, Dh)
    return out.transpose(1, 2), weights  # (B, Nq, H, Dh)


# ----------------------------------------------------------------------------------------
# CPU training: dropout without ``bernoulli_``
# ----------------------------------------------------------------------------------------
# On the CPU, F.dropout draws its mask with ``bernoulli_``, one float per element from the serial
# mt19937 generator: 117 ms for the encoder's 18.9M attention weights on the benchmark batch (2
# threads), more than that layer's softmax (24 ms) and forward bmm's (~33 ms) together. And SDPA's
# CPU flash kernel refuses dropout, so training used its unfused math path. So on the CPU:
#  * a mask is a function of a seed drawn from torch's generator (``torch.manual_seed`` still makes
#    runs reproducible): element i keeps iff its 16-bit uniform u_i >= round(p * 65536), and kept
#    values are scaled by 1 / P(keep), the exact inverse (P(keep) is 1 - p within 7.7e-6), so
#    E[dropout(x)] = x. Backward regenerates the mask from the seed instead of storing it.
#  * the uniforms come from a counter-based hash in a small compiled loop (cpu_kernels.py; one pass,
#    9 ms for those 18.9M) or, without a C++ compiler, from 64-bit draws of a generator seeded with
#    the seed, split in four (26 ms).
#  * attention keeps P and A = P * M / P(keep) for backward, never the mask (_CpuDropoutAttention).
# GPUs keep F.dropout and SDPA's fused kernels.


def _dropout_threshold(p: float) -> tuple[int, float]:
    """(drop, scale): u16 < drop drops an element; scale = 1 / P(keep)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must lie in [0, 1), got {p}.")
    drop = round(p * 65536)
    return drop, 65536.0 / (65536 - drop)


def seeded_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``x * keep / P(keep)`` for a CPU float32 tensor, with ``keep`` a function of ``seed`` (and of
    the element's flat index): the same seed gives the same mask. P(keep) = 1 - p within 7.7e-6."""
    drop, scale = _dropout_threshold(p)
    ext = kernels()
    if ext is not None:
        return ext.dropout_apply(x, drop, seed, scale)
    n = x.numel()
    gen = torch.Generator().manual_seed(seed % 2**64)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None, generator=gen)
    uniforms = words.view(torch.int16)[:n].view(x.shape)  # u - 32768, uniform over the int16 range
    keep = torch.ge(uniforms, drop - 32768, out=torch.empty(x.shape))  # float 0/1
    return torch.addcmul(x.new_zeros(()), x, keep, value=scale)  # x * keep * scale, one pass


class _CpuDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        ctx.p, ctx.seed = p, draw_seed()
        return seeded_dropout(x, p, ctx.seed)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return seeded_dropout(grad, ctx.p, ctx.seed), None  # the same mask and scale


class PoyoDropout(nn.Dropout):
    """``nn.Dropout`` that trains on CPU float32 tensors with :func:`seeded_dropout` (masks 13x
    cheaper than ``bernoulli_``); elsewhere (eval, GPU, other dtypes, in place) it is ``nn.Dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and 0.0 < self.p < 1.0 and x.device.type == "cpu" and x.dtype == torch.float32 and not self.inplace:
            return _CpuDropout.apply(x, self.p)
        return super().forward(x)


class _CpuDropoutAttention(torch.autograd.Function):
    """out = A v with A = softmax(q k^T * scale, masked) * M / P(keep), M from :func:`seeded_dropout`.

    Saves P and A (the math path saves P, the mask and A). Backward needs no mask: with dA the
    gradient of A, dS_j = P_j (s M_j dA_j - sum_k P_k s M_k dA_k) = A_j dA_j - P_j D, where s is
    the scale and D = sum_k A_k dA_k.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_mask, scale: float, p: float):
        # Heads-major copies, made once: q, k, v arrive as (B, N, H, Dh) transposed views, and
        # matmul would copy each of them again on every use in forward and backward.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # (B, H, N, Dh)
        scores = torch.matmul(q * scale, k.transpose(-1, -2))  # (B, H, Nq, Nk)
        if key_mask is not None:
            scores.masked_fill_(~key_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        del scores
        kept = seeded_dropout(probs, p, draw_seed())  # A, (B, H, Nq, Nk)
        ctx.save_for_backward(q, k, v, probs, kept)
        ctx.scale = scale
        return torch.matmul(kept, v)  # (B, H, Nq, Dh)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs, kept = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_v = torch.matmul(kept.transpose(-1, -2), grad_out)  # (B, H, Nk, Dh)
        grad_s = torch.matmul(grad_out, v.transpose(-1, -2))  # dA, (B, H, Nq, Nk)
        ext = kernels()
        if ext is not None:
            ext.softmax_dropout_grad_(grad_s, kept, probs)  # in place, one pass per row
        else:
            grad_s.mul_(kept)  # A dA
            grad_s.addcmul_(probs, grad_s.sum(-1, keepdim=True), value=-1.0)  # A dA - P D
        grad_q = torch.matmul(grad_s, k).mul_(ctx.scale)  # (B, H, Nq, Dh)
        grad_k = torch.matmul(grad_s.transpose(-1, -2), q).mul_(ctx.scale)  # (B, H, Nk, Dh)
        return grad_q, grad_k, grad_v, None, None, None


def cpu_dropout_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor | None,
    scaling: float,
    dropout: float,
) -> torch.Tensor:
    """Attention with dropout on the weights for CPU float32 training (see the section comment).

    query (B, H, Nq, Dh), key/value (B, H, Nk, Dh), key_mask bool broadcastable to (B, H, Nq, Nk)
    (POYO: (B, 1, 1, Nk); NDT: (B|1, 1, Nq, Nk)), True = attend, every query row with at least one
    key. Returns (B, Nq, H, Dh) like the transformers interface; ``dropout`` in [0, 1) (checked by
    :func:`seeded_dropout`).
    """
    return _CpuDropoutAttention.apply(query, key, value, key_mask, scaling, dropout).transpose(1, 2)


def distinct_rows(codes: torch.Tensor, n_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(codes, return_inverse=True)`` for integer codes in [0, n_codes): the sorted
    distinct codes (M,) and each element's position among them (codes' shape).

    Where the code range is small against the number of codes (POYO: units x token types against
    the batch's tokens), a presence table replaces the sort: same result, ~4x less time on a
    batch-1 window (2300 tokens, 303 codes)."""
    if n_codes > 4 * codes.numel() + 1024:
        return torch.unique(codes, return_inverse=True)
    present = torch.zeros(n_codes, dtype=torch.bool, device=codes.device)
    present[codes.reshape(-1)] = True
    rank = torch.cumsum(present, 0) - 1  # (n_codes,): a present code's position among the present ones
    return present.nonzero().squeeze(1), rank[codes]


class PoyoRotaryAttention(nn.Module):
    """Pre-norm multi-head (cross- or self-) attention with rotary time embeddings.

    Separate LayerNorms for the query and context streams (cross-attention), bias-free
    projections to ``heads * head_dim``, output projection with bias (spec sec. 4).

    ``rotate_value=True`` also rotates V by the key time and rotates the attention output
    back by the query time, so the aggregated values carry relative time t_k - t_q.
    """

    is_causal = False  # bidirectional: SDPA must not assume a causal mask

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        dropout: float = 0.0,
        rotate_value: bool = False,
        self_attention: bool = False,
    ):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.rotate_value = rotate_value
        self.self_attention = self_attention
        self.scaling = head_dim**-0.5
        inner = heads * head_dim
        self.norm = nn.LayerNorm(dim)
        if self_attention:
            self.qkv_proj = PoyoLinear(dim, 3 * inner, bias=False)
        else:
            self.context_norm = nn.LayerNorm(dim)
            self.q_proj = PoyoLinear(dim, inner, bias=False)
            self.kv_proj = PoyoLinear(dim, 2 * inner, bias=False)
        self.o_proj = PoyoLinear(inner, dim)

    def _cpu_dropout_path(self, q: torch.Tensor, mask: torch.Tensor | None, attn_implementation: str) -> bool:
        """Train with :func:`cpu_dropout_attention` instead of SDPA's math fallback: CPU float32
        training with attention dropout under the default "sdpa" implementation ("eager" stays the
        explicit reference), when every window has a real key (SDPA returns zeros for a window without
        any, checked on torch 2.13; that case keeps SDPA)."""
        return (
            self.training
            and 0.0 < self.dropout < 1.0
            and attn_implementation == "sdpa"
            and q.device.type == "cpu"
            and q.dtype == torch.float32
            and (mask is None or bool(mask.any(-1).all()))
        )

    def _fused_inference(self, x: torch.Tensor, attn_implementation: str) -> bool:
        """Attend with the fused CPU kernel (:func:`~poyo_hf.models.poyo.cpu_kernels.attention`:
        rotations, K/V gather, scores, softmax and values in one call, ~2x SDPA's attention speed at
        POYO's shapes) where no gradient is taken and no dropout applies, under the default "sdpa"
        implementation ("eager" stays the explicit reference)."""
        return (
            attn_implementation == "sdpa"
            and not torch.is_grad_enabled()
            and (not self.training or self.dropout == 0.0)
            and attention_available(x, self.head_dim)
        )

    def _fused_forward(self, x, query_phase, context, context_phase, context_mask, context_index) -> torch.Tensor:
        """The forward on the fused kernel; ``x`` is the normalised query stream (B, Nq, D)."""
        H, Dh = self.heads, self.head_dim
        if self.self_attention:
            qkv = self.qkv_proj(x).unflatten(-1, (3 * H, Dh)).transpose(1, 2)  # (B, 3H, N, Dh) view
            q, k, v = qkv.split(H, dim=1)
            key_phase, index, mask = query_phase, None, None
        else:
            q = self.q_proj(x).unflatten(-1, (H, Dh)).transpose(1, 2)  # (B, H, Nq, Dh) view
            kv = self.kv_proj(self.context_norm(context))  # (B, Nk, 2*H*Dh), or (M, 2*H*Dh) per table row
            if context_index is not None:
                kv = kv[None]  # one table (1, M, ...): token j of window b is row context_index[b, j]
            k, v = kv.unflatten(-1, (2 * H, Dh)).transpose(1, 2).split(H, dim=1)  # (B|1, H, Nk|M, Dh) views
            key_phase, index, mask = context_phase, context_index, context_mask
        out = cpu_attention(q, k, v, mask, self.scaling, False, query_phase, key_phase, self.rotate_value, index)
        return self.o_proj(out.flatten(-2))  # (B, Nq, H*Dh) -> (B, Nq, D)

    def forward(
        self,
        hidden_states: torch.Tensor,
        query_phase: torch.Tensor,
        context: torch.Tensor | None = None,
        context_phase: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        attn_implementation: str = "sdpa",
        context_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states (B, Nq, D); context (B, Nk, D) or None for self-attention; phases from
        :class:`PoyoRotaryTimeEmbedding`; context_mask bool (B, Nk), True = real token.
        With ``context_index`` (B, Nk) long, ``context`` is instead a table (M, D) of distinct
        context rows and token j of window b is row ``context_index[b, j]``: the norm and the K/V
        projection run once per row and are gathered per token (same result, row by row).
        Returns (B, Nq, D)."""
        H = self.heads
        x = self.norm(hidden_states)
        if self._fused_inference(x, attn_implementation):
            return self._fused_forward(x, query_phase, context, context_phase, context_mask, context_index)
        if self.self_attention:
            qkv = self.qkv_proj(x).unflatten(-1, (3 * H, self.head_dim))  # (B, N, 3H, Dh)
            # Self-attention: Q, K and V share the token times, so one rotation covers all
            # three (V only when rotate_value).
            if self.rotate_value:
                qkv = apply_rotary(qkv, query_phase)
                q, k, v = qkv.split(H, dim=2)
            else:
                qk, v = qkv.split([2 * H, H], dim=2)
                q, k = apply_rotary(qk, query_phase).split(H, dim=2)
        else:
            q = apply_rotary(self.q_proj(x).unflatten(-1, (H, self.head_dim)), query_phase)  # (B, Nq, H, Dh)
            kv = self.kv_proj(self.context_norm(context))  # (B, Nk, 2*H*Dh), or (M, 2*H*Dh) per table row
            if context_index is not None:
                kv = F.embedding(context_index, kv)  # (B, Nk, 2*H*Dh): gather rows per token
            kv = kv.unflatten(-1, (2 * H, self.head_dim))  # (B, Nk, 2H, Dh): K heads, V heads
            if self.rotate_value:
                k, v = apply_rotary(kv, context_phase).split(H, dim=2)
            else:
                k, v = kv.split(H, dim=2)
                k = apply_rotary(k, context_phase)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, Dh)
        mask = None if context_mask is None else context_mask[:, None, None, :]  # (B, 1, 1, Nk)
        if self._cpu_dropout_path(q, mask, attn_implementation):
            out = cpu_dropout_attention(q, k, v, mask, self.scaling, self.dropout)  # (B, Nq, H, Dh)
        else:
            attention_interface = eager_attention_forward
            if attn_implementation != "eager":
                attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn_implementation, eager_attention_forward)
            out, _ = attention_interface(
                self,
                q,
                k,
                v,
                mask,
                scaling=self.scaling,
                dropout=self.dropout if self.training else 0.0,
            )  # (B, Nq, H, Dh)
        if self.rotate_value:
            out = apply_rotary(out, query_phase.conj())  # rotate back by -t_q
        return self.o_proj(out.flatten(-2))  # (B, Nq, H*Dh) -> (B, Nq, D)


class PoyoFeedForward(nn.Module):
    """LayerNorm -> Linear(D, 2 * mult * D) -> GEGLU -> dropout -> Linear(mult * D, D)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = PoyoLinear(dim, 2 * mult * dim)
        self.dropout = PoyoDropout(dropout)
        self.fc2 = PoyoLinear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.fc1(self.norm(x)).chunk(2, dim=-1)  # (B, N, mult*D) x 2
        return self.fc2(self.dropout(h * F.gelu(gate)))  # GEGLU (Shazeer 2020)


# ----------------------------------------------------------------------------------------
# Blocks (take the config)
# ----------------------------------------------------------------------------------------


class PoyoEncoderLayer(nn.Module):
    """Latents read the spike tokens: lat += CrossAttn(LN(lat), LN(inputs)); lat += FFN(LN(lat))."""

    def __init__(self, config: PoyoConfig):
        super().__init__()
        self.cross_attn = PoyoRotaryAttention(
            config.hidden_size,
            config.num_cross_attention_heads,
            config.head_dim,
            dropout=config.attention_dropout,
            rotate_value=True,
        )
        self.ffn = PoyoFeedForward(config.hidden_size, config.ffn_mult, config.ffn_dropout)

    def forward(self, latents, latent_rotary, inputs, input_rotary, input_mask, attn_implementation, input_index=None):
        latents = latents + self.cross_attn(
            latents, latent_rotary, inputs, input_rotary, input_mask, attn_implementation, input_index
        )
        return latents + self.ffn(latents)


class PoyoProcessorLayer(nn.Module):
    """lat += Drop(SelfAttn(LN(lat))); lat += Drop(FFN(LN(lat)))."""

    def __init__(self, config: PoyoConfig):
        super().__init__()
        self.self_attn = PoyoRotaryAttention(
            config.hidden_size,
            config.num_self_attention_heads,
            config.head_dim,
            dropout=config.attention_dropout,
            rotate_value=True,
            self_attention=True,
        )
        self.ffn = PoyoFeedForward(config.hidden_size, config.ffn_mult, config.ffn_dropout)
        self.dropout = PoyoDropout(config.lin_dropout)

    def forward(self, latents, latent_rotary, attn_implementation):
        latents = latents + self.dropout(
            self.self_attn(latents, latent_rotary, attn_implementation=attn_implementation)
        )
        return latents + self.dropout(self.ffn(latents))


class PoyoDecoderLayer(nn.Module):
    """Queries read the latents (no value rotation): q += CrossAttn(LN(q), LN(lat)); q += FFN(LN(q))."""

    def __init__(self, config: PoyoConfig):
        super().__init__()
        self.cross_attn = PoyoRotaryAttention(
            config.hidden_size,
            config.num_cross_attention_heads,
            config.head_dim,
            dropout=config.attention_dropout,
            rotate_value=False,
        )
        self.ffn = PoyoFeedForward(config.hidden_size, config.ffn_mult, config.ffn_dropout)

    def forward(self, queries, query_rotary, latents, latent_rotary, attn_implementation):
        queries = queries + self.cross_attn(
            queries, query_rotary, latents, latent_rotary, None, attn_implementation
        )
        return queries + self.ffn(queries)


# ----------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------


@dataclass
class PoyoModelOutput(ModelOutput):
    """
    last_hidden_state: (B, N_out, D) decoded output-query states.
    latent_hidden_state: (B, N_lat, D) latents after the processor.
    """

    last_hidden_state: torch.Tensor | None = None
    latent_hidden_state: torch.Tensor | None = None


@dataclass
class PoyoDecodingOutput(ModelOutput):
    """
    loss: scalar weighted MSE on z-scored targets (when ``labels`` are given).
    predictions: (B, N_out, Do) decoded behaviour in physical units (the config's
        normalisation undone); padded queries and unused dims hold values to ignore.
    normalized_predictions: (B, N_out, Do) the same in z-scored units (what the loss sees).
    last_hidden_state: (B, N_out, D); latent_hidden_state: (B, N_lat, D).
    """

    loss: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    normalized_predictions: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    latent_hidden_state: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------


def _weights_path(name_or_path, kwargs: dict) -> str:
    """Where ``from_pretrained`` read ``model.safetensors`` from, for error messages: the local
    file, the cached download of a Hub file, or a description when neither can be found."""
    import os

    subfolder = kwargs.get("subfolder") or ""
    if os.path.isdir(str(name_or_path)):
        return os.path.join(str(name_or_path), subfolder, "model.safetensors")
    try:
        from transformers.utils import cached_file

        path = cached_file(
            str(name_or_path),
            "model.safetensors",
            subfolder=subfolder,
            revision=kwargs.get("revision"),
            cache_dir=kwargs.get("cache_dir"),
            local_files_only=True,
            _raise_exceptions_for_missing_entries=False,
        )
    except Exception:  # the message must not fail while reporting another error
        path = None
    return path or f"model.safetensors of {str(name_or_path)!r}"


class PoyoPreTrainedModel(PreTrainedModel):
    config: PoyoConfig
    config_class = PoyoConfig
    base_model_prefix = "poyo"
    main_input_name = "input_unit_index"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["PoyoEncoderLayer", "PoyoProcessorLayer", "PoyoDecoderLayer"]
    # Tables whose rows the processor's vocabularies address: a size mismatch here is never a
    # head to re-initialise but a checkpoint whose vocabulary and weights disagree.
    _vocabulary_tables = ("unit_emb.weight", "session_emb.weight")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained`` that refuses inconsistent checkpoints clearly.

        * A ``model.safetensors`` that cannot be read (truncated, corrupted) raises ``ValueError``
          naming the file (safetensors' own error does not say which file it was reading).
        * A unit or session embedding table whose shape disagrees with ``config.json``
          (``unit_vocab_size`` / ``session_vocab_size``) raises ``ValueError``, also under
          ``ignore_mismatched_sizes=True``: transformers would silently re-initialise the table,
          and every unit id would then map to a random row.
        * Other shape mismatches raise ``ValueError`` listing them unless
          ``ignore_mismatched_sizes=True`` (then re-initialised, e.g. a new readout head).
        """
        ignore_mismatched = bool(kwargs.pop("ignore_mismatched_sizes", False))
        want_info = bool(kwargs.pop("output_loading_info", False))
        try:
            # Always load with ignore_mismatched_sizes=True and decide here from the loading info:
            # without it transformers raises a RuntimeError that only points at a printed report.
            model, info = super().from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                ignore_mismatched_sizes=True,
                output_loading_info=True,
                **kwargs,
            )
        except Exception as err:
            if type(err).__name__ == "SafetensorError":  # safetensors' Rust error type, matched by name
                path = _weights_path(pretrained_model_name_or_path, kwargs)
                raise ValueError(
                    f"{path} cannot be read as safetensors ({err}): the file is truncated or corrupted. "
                    "Download it again (from_pretrained(..., force_download=True)) or re-export the "
                    "checkpoint with save_pretrained."
                ) from err
            raise
        mismatched = sorted((str(k), tuple(a), tuple(b)) for k, a, b in info.get("mismatched_keys", ()))
        vocab = [m for m in mismatched if m[0].endswith(cls._vocabulary_tables)]
        if vocab:
            details = "; ".join(f"{k}: {a[0]} rows in the weights, {b[0]} in config.json" for k, a, b in vocab)
            raise ValueError(
                f"checkpoint {str(pretrained_model_name_or_path)!r} is inconsistent: its embedding tables disagree "
                f"with config.json ({details}). The vocabularies (preprocessor_config.json), config.json "
                "(unit_vocab_size / session_vocab_size) and model.safetensors must describe the same rows; "
                "re-export the model and processor together with save_pretrained after "
                "model.grow_vocabularies(processor)."
            )
        if mismatched and not ignore_mismatched:
            details = "; ".join(
                f"{k}: {list(a)} in the weights vs {list(b)} from config.json" for k, a, b in mismatched
            )
            raise ValueError(
                f"checkpoint {str(pretrained_model_name_or_path)!r}: weight shapes disagree with config.json "
                f"({details}); fix config.json, or pass ignore_mismatched_sizes=True to re-initialise those "
                "weights (e.g. a new readout head)."
            )
        return (model, info) if want_info else model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            # PyTorch's default Linear init (as the reference keeps): U(+-1/sqrt(fan_in)).
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight.shape[1])
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            # All embeddings N(0, 0.02) (spec sec. 2).
            init.normal_(module.weight, mean=0.0, std=std)


class PoyoModel(PoyoPreTrainedModel):
    """The POYO trunk: tokens -> latents -> processed latents -> decoded output queries.

    Inputs (as made by :class:`~poyo_hf.PoyoProcessor`):
        input_unit_index: (B, N_in) long, rows of the unit table (0 = padding).
        input_timestamps: (B, N_in) float, seconds from the window start.
        input_token_type: (B, N_in) long, 0 spike / 1 unit start / 2 unit end.
        input_mask: (B, N_in) bool, True for real tokens.
        session_index: (B,) long, rows of the session table.
        output_timestamps: (B, N_out) float, seconds from the window start.
        latent_timestamps: optional (B, N_lat) or (N_lat,) float; defaults to the config's
            grid ``k * latent_step + latent_step / 2`` with latents repeated per step.
    """

    def __init__(self, config: PoyoConfig):
        super().__init__(config)
        d = config.hidden_size
        self.unit_emb = nn.Embedding(config.unit_vocab_size, d)
        self.session_emb = nn.Embedding(config.session_vocab_size, d)
        self.token_type_emb = nn.Embedding(config.num_token_types, d)
        self.latent_emb = nn.Embedding(config.num_latents_per_step, d)
        self.rotary_emb = PoyoRotaryTimeEmbedding(config.head_dim, config.rotary_t_min, config.rotary_t_max)
        self.encoder = PoyoEncoderLayer(config)
        self.layers = nn.ModuleList(PoyoProcessorLayer(config) for _ in range(config.num_hidden_layers))
        self.decoder = PoyoDecoderLayer(config)
        self.post_init()

    def latent_grid(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent_index, latent_timestamps), each (N_lat,): K latents repeated at every step."""
        c = self.config
        steps = torch.arange(c.num_latent_steps, device=device, dtype=torch.float32)
        times = steps * c.latent_step + c.latent_step / 2  # (T_lat,)
        index = torch.arange(c.num_latents_per_step, device=device)
        return index.repeat(c.num_latent_steps), times.repeat_interleave(c.num_latents_per_step)

    def _grid_phases(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent_index (N_lat,), phases (N_lat, Dh/4) complex) of :meth:`latent_grid`, kept from the
        last call: they depend on the config's grid and rotary periods only, not on weights or inputs."""
        c = self.config
        key = (device, c.num_latent_steps, c.num_latents_per_step, c.latent_step, c.head_dim, c.rotary_t_min, c.rotary_t_max)

        def make():
            index, times = self.latent_grid(device)
            return index, self.rotary_emb(times)

        return _kept(self, "_grid_cache", key, make)

    def _check_indices(self, name: str, index: torch.Tensor, table: nn.Embedding, how: str) -> None:
        if index.numel() and (int(index.max()) >= table.num_embeddings or int(index.min()) < 0):
            raise ValueError(
                f"{name} holds values in [{int(index.min())}, {int(index.max())}] but the table has "
                f"{table.num_embeddings} rows; {how}"
            )

    def forward(
        self,
        input_unit_index: torch.Tensor,
        input_timestamps: torch.Tensor,
        input_token_type: torch.Tensor,
        session_index: torch.Tensor,
        output_timestamps: torch.Tensor,
        input_mask: torch.Tensor | None = None,
        latent_timestamps: torch.Tensor | None = None,
        latent_index: torch.Tensor | None = None,
        output_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> PoyoModelOutput:
        if input_unit_index.dim() != 2 or input_timestamps.shape != input_unit_index.shape:
            raise ValueError(
                "input_unit_index and input_timestamps must both be (B, N_in), got "
                f"{tuple(input_unit_index.shape)} and {tuple(input_timestamps.shape)}."
            )
        if not torch.is_floating_point(input_timestamps) or not torch.is_floating_point(output_timestamps):
            raise TypeError(
                "input_timestamps and output_timestamps must be floating point seconds, got "
                f"{input_timestamps.dtype} and {output_timestamps.dtype}."
            )
        fix = "register new sessions with processor.add_session(...), then call model.grow_vocabularies(processor)."
        if not torch.compiler.is_compiling():
            self._check_indices("input_unit_index", input_unit_index, self.unit_emb, fix)
            self._check_indices("session_index", session_index, self.session_emb, fix)
            self._check_indices(
                "input_token_type", input_token_type, self.token_type_emb,
                "token types are 0 spike, 1 unit start, 2 unit end (as PoyoProcessor makes them).",
            )
        B = input_unit_index.shape[0]
        impl = self.config._attn_implementation or "sdpa"

        # A spike token's content is its (unit, token type) pair; time enters only through the
        # rotary phases. So the distinct pairs are embedded once (M rows, M <= units x types) and
        # the encoder normalises and projects each once, gathering K/V per token: on the benchmark
        # batch that is ~300 rows instead of 70k tokens.
        T = self.config.num_token_types
        pairs, input_index = distinct_rows(input_unit_index * T + input_token_type, self.unit_emb.num_embeddings * T)
        inputs = self.unit_emb(pairs // T) + self.token_type_emb(pairs % T)  # (M, D)
        # Phases padded to whole heads once here, reused by every layer (see pad_phase); the fused
        # inference kernel rotates only the rotating pairs and takes them unpadded.
        Dh = self.config.head_dim
        fused = impl == "sdpa" and not torch.is_grad_enabled() and attention_available(inputs, Dh)

        def phases(times: torch.Tensor) -> torch.Tensor:
            phase = self.rotary_emb(times)  # (..., Dh/4) complex
            return phase if fused else pad_phase(phase, Dh)  # (..., Dh/2) padded

        input_rotary = phases(input_timestamps)  # (B, N_in, Dh/4 or Dh/2) complex

        if latent_timestamps is None and latent_index is None:  # the config's grid: its phases are kept
            latent_index, latent_phase = self._grid_phases(input_unit_index.device)
            latent_rotary = (latent_phase if fused else pad_phase(latent_phase, Dh)).expand(B, -1, -1)
        else:
            if latent_timestamps is None or latent_index is None:
                grid_index, grid_times = self.latent_grid(input_unit_index.device)
                latent_index = grid_index if latent_index is None else latent_index
                latent_timestamps = grid_times if latent_timestamps is None else latent_timestamps
            if latent_timestamps.dim() == 1:
                latent_timestamps = latent_timestamps.expand(B, -1)
            latent_rotary = phases(latent_timestamps)  # (B, N_lat, Dh/4 or Dh/2)
        if latent_index.dim() == 1:
            latent_index = latent_index.expand(B, -1)  # (N_lat,) -> (B, N_lat)
        latents = self.latent_emb(latent_index)  # (B, N_lat, D)

        queries = self.session_emb(session_index)[:, None, :]  # (B, 1, D)
        queries = queries.expand(-1, output_timestamps.shape[1], -1)  # (B, N_out, D)
        output_rotary = phases(output_timestamps)

        if input_mask is not None:
            input_mask = input_mask.bool()
        latents = self.encoder(latents, latent_rotary, inputs, input_rotary, input_mask, impl, input_index)
        for layer in self.layers:
            latents = layer(latents, latent_rotary, impl)
        hidden = self.decoder(queries, output_rotary, latents, latent_rotary, impl)  # (B, N_out, D)
        return PoyoModelOutput(last_hidden_state=hidden, latent_hidden_state=latents)

    # -- vocabulary growth ------------------------------------------------------------------
    def _grow(self, table: nn.Embedding, new_rows: int) -> nn.Embedding:
        if new_rows < table.num_embeddings:
            raise ValueError(
                f"Cannot shrink an embedding table from {table.num_embeddings} to {new_rows} rows."
            )
        if new_rows == table.num_embeddings:
            return table
        grown = nn.Embedding(new_rows, table.embedding_dim, device=table.weight.device, dtype=table.weight.dtype)
        with torch.no_grad():
            grown.weight[: table.num_embeddings] = table.weight  # old rows bit-identical
            grown.weight[table.num_embeddings :].normal_(0.0, self.config.initializer_range)
        grown.weight.requires_grad_(table.weight.requires_grad)
        return grown

    def resize_embeddings(self, unit_vocab_size: int, session_vocab_size: int) -> None:
        """Grow the unit / session tables to the given row counts; existing rows are kept
        bit-identical and new rows drawn from N(0, initializer_range)."""
        self.unit_emb = self._grow(self.unit_emb, unit_vocab_size)
        self.session_emb = self._grow(self.session_emb, session_vocab_size)
        self.config.unit_vocab_size = unit_vocab_size
        self.config.session_vocab_size = session_vocab_size


class PoyoForDecoding(PoyoPreTrainedModel):
    """POYO with its readout(s) and the weighted-MSE loss: the decoder users load.

    Additional inputs:
        readout_index: optional (B,) long, which readout of ``config.readout_dims`` each window
            uses (default: the first for all).
        labels: optional (B, N_out, Do) targets in physical units (NaN = missing).
        output_weights: optional (B, N_out) per-timestep loss weights (default 1).
        output_mask: optional (B, N_out) bool, True for real output queries.

    The loss is sum_i w_i * mean_d((pred_id - y_id)^2) / sum_i w_i over unmasked queries with
    finite labels (the mean runs over the finite dims of each query), computed on z-scored targets (config.target_mean / target_std), so Trainer
    needs no custom loss. Predictions are returned in physical units.
    """

    # Our forward takes **kwargs but returns a plain mean loss: Trainer must divide by
    # gradient-accumulation steps itself (hf-notes).
    accepts_loss_kwargs = False

    def __init__(self, config: PoyoConfig):
        super().__init__(config)
        self.poyo = PoyoModel(config)
        self.readouts = nn.ModuleDict(
            {name: PoyoLinear(config.hidden_size, d) for name, d in config.readout_dims.items()}
        )
        self.post_init()

    def _target_stats(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, Do) mean and std per readout, padded with 0 / 1 to the widest readout.

        Built from the config (which may change, e.g. when statistics are set after pretraining)
        and kept for the next call while the config's values, the device and the dtype stay the same:
        building them took ~0.1 ms, 1-2% of a batch-1 forward."""
        c = self.config
        key = (
            device, dtype,
            tuple((name, d, tuple(c.target_mean[name]), tuple(c.target_std[name])) for name, d in c.readout_dims.items()),
        )

        def make():
            mean = torch.zeros(len(c.readout_dims), c.max_output_dim, dtype=dtype)
            std = torch.ones(len(c.readout_dims), c.max_output_dim, dtype=dtype)
            for r, name in enumerate(c.readout_dims):
                d = c.readout_dims[name]
                mean[r, :d] = torch.tensor(c.target_mean[name], dtype=dtype)
                std[r, :d] = torch.tensor(c.target_std[name], dtype=dtype)
            return mean.to(device), std.to(device)

        return _kept(self, "_target_stats_cache", key, make)

    def _readout(self, hidden: torch.Tensor, readout_index: torch.Tensor | None) -> torch.Tensor:
        """hidden (B, N_out, D) -> normalised predictions (B, N_out, Do_max)."""
        heads = list(self.readouts.values())
        width = self.config.max_output_dim
        if readout_index is None or len(heads) == 1:
            out = heads[0](hidden)  # (B, N_out, d_0)
            return F.pad(out, (0, width - out.shape[-1]))
        out = hidden.new_zeros(*hidden.shape[:-1], width)
        for r, head in enumerate(heads):
            rows = readout_index == r  # (B,)
            if bool(rows.any()):
                pred = head(hidden[rows])  # (b_r, N_out, d_r)
                out[rows] = F.pad(pred, (0, width - pred.shape[-1]))
        return out

    def forward(
        self,
        input_unit_index: torch.Tensor,
        input_timestamps: torch.Tensor,
        input_token_type: torch.Tensor,
        session_index: torch.Tensor,
        output_timestamps: torch.Tensor,
        input_mask: torch.Tensor | None = None,
        latent_timestamps: torch.Tensor | None = None,
        latent_index: torch.Tensor | None = None,
        output_mask: torch.Tensor | None = None,
        readout_index: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_weights: torch.Tensor | None = None,
        **kwargs,
    ) -> PoyoDecodingOutput:
        trunk = self.poyo(
            input_unit_index=input_unit_index,
            input_timestamps=input_timestamps,
            input_token_type=input_token_type,
            session_index=session_index,
            output_timestamps=output_timestamps,
            input_mask=input_mask,
            latent_timestamps=latent_timestamps,
            latent_index=latent_index,
        )
        hidden = trunk.last_hidden_state
        if readout_index is not None and not torch.compiler.is_compiling():
            if int(readout_index.max()) >= len(self.readouts) or int(readout_index.min()) < 0:
                raise ValueError(
                    f"readout_index must lie in [0, {len(self.readouts)}) for readouts "
                    f"{list(self.readouts)}, got values up to {int(readout_index.max())}."
                )
        normalized = self._readout(hidden, readout_index)  # (B, N_out, Do)
        mean, std = self._target_stats(normalized.device, normalized.dtype)  # (R, Do)
        r = (
            torch.zeros(normalized.shape[0], dtype=torch.long, device=normalized.device)
            if readout_index is None
            else readout_index.long()
        )
        mean_b, std_b = mean[r][:, None, :], std[r][:, None, :]  # (B, 1, Do)
        predictions = normalized * std_b + mean_b

        loss = None
        if labels is not None:
            loss = self.loss_function(normalized, labels, mean_b, std_b, r, output_mask, output_weights)
        return PoyoDecodingOutput(
            loss=loss,
            predictions=predictions,
            normalized_predictions=normalized,
            last_hidden_state=hidden,
            latent_hidden_state=trunk.latent_hidden_state,
        )

    def loss_function(self, normalized, labels, mean_b, std_b, readout_index, output_mask, output_weights):
        """Weighted MSE on z-scored targets (spec sec. 6). Non-finite labels and masked queries
        get weight 0 and are never fed to the loss."""
        if labels.shape[:2] != normalized.shape[:2]:
            raise ValueError(
                f"labels has shape {tuple(labels.shape)} but the outputs are {tuple(normalized.shape)}; "
                "expected (B, N_out, output_dim)."
            )
        width = normalized.shape[-1]
        labels = labels.to(normalized.dtype)
        if labels.shape[-1] < width:
            labels = F.pad(labels, (0, width - labels.shape[-1]), value=float("nan"))
        elif labels.shape[-1] > width:
            raise ValueError(
                f"labels has {labels.shape[-1]} dims but the widest readout has {width}; "
                "check config.readout_dims."
            )
        dims = torch.tensor(list(self.config.readout_dims.values()), device=normalized.device)
        dim_mask = torch.arange(width, device=normalized.device)[None, :] < dims[readout_index][:, None]  # (B, Do)
        finite = torch.isfinite(labels) & dim_mask[:, None, :]  # (B, N_out, Do)
        target = torch.where(finite, (labels - mean_b) / std_b, torch.zeros_like(labels))
        sq = torch.where(finite, (normalized - target) ** 2, torch.zeros_like(target))
        per_step = sq.sum(-1) / finite.sum(-1).clamp_min(1)  # (B, N_out): mean over the finite dims
        weights = torch.ones_like(per_step) if output_weights is None else output_weights.to(per_step.dtype)
        valid = finite.any(-1) if output_mask is None else finite.any(-1) & output_mask.bool()
        weights = torch.where(valid, weights, torch.zeros_like(weights))
        return (weights * per_step).sum() / weights.sum().clamp_min(1e-8)

    def resize_embeddings(self, unit_vocab_size: int, session_vocab_size: int) -> None:
        """Grow the unit / session tables (old rows bit-identical); see :meth:`PoyoModel.resize_embeddings`."""
        self.poyo.resize_embeddings(unit_vocab_size, session_vocab_size)

    def grow_vocabularies(self, processor) -> None:
        """Make the tables as large as ``processor``'s vocabularies (after ``add_session``)."""
        self.resize_embeddings(processor.unit_vocab_size, processor.session_vocab_size)


__all__ = [
    "PoyoPreTrainedModel",
    "PoyoModel",
    "PoyoForDecoding",
    "PoyoModelOutput",
    "PoyoDecodingOutput",
    "PoyoRotaryTimeEmbedding",
    "PoyoRotaryAttention",
    "apply_rotary",
    "pad_phase",
    "rotary_frequencies",
]
