"""NDT: a Transformer encoder over binned spike counts, trained by masked modelling.

Ye & Pandarinath, "Representation learning for neural population activity with Neural Data
Transformers", 2021 (reference code: snel-repo/neural-data-transformers).

Data flow (one trial of T = observed + forward bins)::

    counts (B, T, N_in)  --zero held-out channels-->  (B, T, N)   [forward bins are zero rows]
        |  masking (training): whole bins chosen, entries zeroed / randomised / kept
        v
    embedding (identity | count | linear) * sqrt(D) + learned position[t]  -> dropout
        v
    L x [ x += Drop(Attn(LN(x)), banded)  ;  x += Drop(FFN_relu(LN(x))) ]   (pre-norm)
        v
    LayerNorm -> dropout -> Linear(D, N) = log-rates  (Poisson NLL, log input)

The loss covers the held-in entries of masked bins, every held-out entry of every observed bin
and every entry of every forward bin, averaged over those entries (as the reference does).

Shape legend used in the comments:
    B      trials in the batch
    T      bins: observed + forward, padded to the longest trial of the batch
    N_in   held-in neurons (input channels)
    N_out  held-out neurons
    N      N_in + N_out (readout width)
    F      forward bins
    D      hidden size
    H      attention heads
    Dh     head dim (D / H)

Attention mask convention: boolean, True = attend. Bin t attends to keys
``[t - context_backward, t + context_forward]`` (clipped to the trial), never to padding bins;
a padding bin attends to itself only, which keeps every softmax row finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_ndt import NdtConfig

_ONEDNN_LINEAR: Any
_ONEDNN_LINEAR_ADD: Any
_ONEDNN_PACK: Any
try:  # oneDNN's fused linear (bias + ReLU / residual add): about 2x faster than the MKL addmm
    # behind F.linear for these shapes on the AMD EPYC CPUs we bench on. Inference only (no autograd).
    _ONEDNN_LINEAR = torch.ops.mkldnn._linear_pointwise.default
    _ONEDNN_LINEAR_ADD = torch.ops.mkldnn._linear_pointwise.binary
    # Weights pre-packed into oneDNN's blocked layout skip a reorder on every call.
    _ONEDNN_PACK = torch.ops.mkldnn._reorder_linear_weight.default
except (AttributeError, RuntimeError):  # torch built without oneDNN
    _ONEDNN_LINEAR = _ONEDNN_LINEAR_ADD = _ONEDNN_PACK = None

_Linear: Any
_Dropout: Any
_cpu_dropout_attention: Any
try:  # CPU training kernels shared with POYO (the same layers and measurements as there):
    # * PoyoLinear (an nn.Linear subclass: same parameters, init and state-dict keys) runs the forward
    #   and both gradients of the larger products through oneDNN on x86-64 (cpu_kernels.use_onednn);
    # * PoyoDropout and cpu_dropout_attention draw dropout masks from a seed in one compiled pass
    #   instead of F.dropout's serial bernoulli_ (27% of an NDT training step before).
    # Elsewhere (GPU, eval, other dtypes) they are nn.Linear / nn.Dropout / the attention interface.
    # Measured (MC_Maze-sized model, 2 threads, old and new interleaved in one process, 2026-11-22):
    # a training step 1.16-1.20x faster from the linear layers alone, 1.81-1.99x with all three
    # (nine runs; batch 32: 422-476 -> 213-255 ms, batch 64: 862-920 -> 436-482 ms).
    # This file also ships alone as the Hub's remote code: without poyo_hf installed, plain torch.
    from poyo_hf.models.poyo.cpu_kernels import PoyoLinear as _Linear
    from poyo_hf.models.poyo.modeling_poyo import PoyoDropout as _Dropout
    from poyo_hf.models.poyo.modeling_poyo import cpu_dropout_attention as _cpu_dropout_attention
except ImportError:
    _Linear, _Dropout, _cpu_dropout_attention = nn.Linear, nn.Dropout, None


def _onednn_ok(x: torch.Tensor) -> bool:
    return (
        _ONEDNN_LINEAR is not None
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
    )


def _width(config: NdtConfig) -> int:
    """``config.hidden_size`` (always set by ``NdtConfig.__post_init__``)."""
    if config.hidden_size is None:
        raise ValueError("NdtConfig.hidden_size is None; build the config through NdtConfig(...) so it is derived.")
    return config.hidden_size


# ----------------------------------------------------------------------------------------
# Primitives (plain scalars in, testable against closed-form math)
# ----------------------------------------------------------------------------------------


def banded_attention_mask(
    length: int,
    context_backward: int | None,
    context_forward: int | None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """(T, T) bool, True where query bin t may attend to key bin s, i.e.
    ``t - context_backward <= s <= t + context_forward``; ``None`` for a side means unlimited.
    Returns ``None`` (no mask at all) when both sides are unlimited."""
    if context_backward is None and context_forward is None:
        return None
    idx = torch.arange(length, device=device)
    offset = idx[None, :] - idx[:, None]  # (T, T): key - query
    allowed = torch.ones(length, length, dtype=torch.bool, device=device)
    if context_backward is not None:
        allowed &= offset >= -context_backward
    if context_forward is not None:
        allowed &= offset <= context_forward
    return allowed


def span_expand_probability(step: int, ramp_start: int, ramp_end: int) -> float:
    """Probability that a training batch uses spans wider than one bin: 0 before ``ramp_start``,
    rising linearly to 1 at ``ramp_end`` (the reference's ``expand_prob``)."""
    if ramp_end <= ramp_start:
        return 1.0 if step >= ramp_start else 0.0
    return min(max((step - ramp_start) / (ramp_end - ramp_start), 0.0), 1.0)


def expand_spans(seeds: torch.Tensor, width: int) -> torch.Tensor:
    """seeds (B, T) bool -> (B, T) bool where every seed at t masks the ``width`` bins
    ``[t - (width - 1) // 2, t - (width - 1) // 2 + width)`` (centred, like the reference's
    convolution), clipped to the sequence."""
    if width <= 1:
        return seeds
    out = torch.zeros_like(seeds)
    T = seeds.shape[-1]
    for k in range(width):
        shift = k - (width - 1) // 2  # seed at t marks t + shift
        if shift >= 0:
            out[:, shift:] |= seeds[:, : T - shift]
        else:
            out[:, : T + shift] |= seeds[:, -shift:]
    return out


def sample_bin_mask(
    maskable: torch.Tensor, ratio: float, width: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Whole-bin mask: seeds drawn Bernoulli(``ratio / width``) on the ``maskable`` bins (B, T),
    each expanded to a span of ``width`` bins, then restricted to the maskable bins again.
    Expected masked fraction is about ``ratio`` (a little less where spans overlap or clip)."""
    probs = torch.full(maskable.shape, ratio / max(width, 1), device=maskable.device)
    seeds = torch.bernoulli(probs, generator=generator).bool() & maskable  # (B, T)
    return expand_spans(seeds, width) & maskable


def replace_masked_entries(
    spikes: torch.Tensor,
    bin_mask: torch.Tensor,
    token_ratio: float,
    random_ratio: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corrupt the entries of masked bins, independently per (trial, bin, neuron) as the reference
    does: a ``token_ratio`` fraction is set to 0; of the rest, a ``random_ratio`` fraction gets a
    count drawn uniformly from ``[0, max count of the batch]``; the others stay intact.

    spikes (B, T, N_in), bin_mask (B, T) bool -> (corrupted spikes, zeroed, randomised), the last
    two (B, T, N_in) bool.
    """
    entry = bin_mask[..., None].expand_as(spikes)  # (B, T, N_in)
    u = torch.rand(spikes.shape, device=spikes.device, generator=generator)
    zeroed = (u < token_ratio) & entry
    u = torch.rand(spikes.shape, device=spikes.device, generator=generator)
    randomised = (u < random_ratio) & entry & ~zeroed
    high = int(spikes.max().item()) if spikes.numel() else 0
    random_counts = torch.randint(
        0, high + 1, spikes.shape, device=spikes.device, generator=generator
    ).to(spikes.dtype)
    out = torch.where(zeroed, torch.zeros_like(spikes), spikes)
    out = torch.where(randomised, random_counts, out)
    return out, zeroed, randomised


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

    query/key/value (B, H, T, Dh); attention_mask bool (B|1, 1, T, T), True = attend.
    Returns (B, T, H, Dh) like the transformers attention interface, and the weights.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, T, T)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value)  # (B, H, T, Dh)
    return out.transpose(1, 2), weights  # (B, T, H, Dh)


# Init roles, read by NdtPreTrainedModel._init_weights (tags live on the leaf modules, so the
# init never depends on visiting a parent module).
_ROLE = "_ndt_init_role"


_M = TypeVar("_M", bound=nn.Module)


def _tag(module: _M, role: str) -> _M:
    setattr(module, _ROLE, role)
    return module


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    """Boolean mask (True = attend) -> float bias: 0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _dense(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    onednn: bool,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inference linear ``act(x W^T + b) (+ residual)``, through oneDNN with the ReLU or the residual
    add fused when ``onednn`` (CPU float32, no autograd), else ``F.linear``."""
    if onednn:
        if residual is not None:
            return _ONEDNN_LINEAR_ADD(x, residual, weight, bias, "add")
        if activation == "relu":
            return _ONEDNN_LINEAR(x, weight, bias, "relu", [], "")
        y = _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    else:
        y = F.linear(x, weight, bias)
        if residual is not None:
            return residual + y
    if activation == "relu":
        return F.relu(y)
    return F.gelu(y) if activation == "gelu" else y


class NdtAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection (with bias, like
    ``nn.MultiheadAttention``) and an output projection. Takes plain scalars."""

    is_causal = False  # bidirectional: SDPA must not assume a causal mask
    qkv_proj: nn.Linear
    o_proj: nn.Linear

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}).")
        self.heads = heads
        self.head_dim = dim // heads
        self.dropout = dropout
        self.scaling = self.head_dim**-0.5
        self.qkv_proj = _tag(_Linear(dim, 3 * dim), "qkv")
        self.o_proj = _tag(_Linear(dim, dim), "fixup_out")

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        attn_implementation: str = "sdpa",
    ) -> torch.Tensor:
        """hidden_states (B, T, D), attention_mask bool (B|1, 1, T, T) or None -> (B, T, D)."""
        B, T, D = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(B, T, 3, self.heads, self.head_dim)  # (B, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, T, Dh)
        if (
            _cpu_dropout_attention is not None
            and self.training
            and 0.0 < self.dropout < 1.0
            and attn_implementation == "sdpa"  # "eager" stays the explicit reference
            and q.device.type == "cpu"
            and q.dtype == torch.float32
        ):  # every query row has a key (a padding bin attends to itself), as the kernel requires
            out = _cpu_dropout_attention(q, k, v, attention_mask, self.scaling, self.dropout)  # (B, T, H, Dh)
            return self.o_proj(out.reshape(B, T, D))
        attention_interface = eager_attention_forward
        if attn_implementation != "eager":
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn_implementation, eager_attention_forward)
        out, _ = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            scaling=self.scaling,
            dropout=self.dropout if self.training else 0.0,
        )  # (B, T, H, Dh)
        return self.o_proj(out.reshape(B, T, D))  # (B, T, H*Dh) -> (B, T, D)


class NdtFeedForward(nn.Module):
    """Linear(D, I) -> ReLU (or GELU) -> dropout -> Linear(I, D)."""

    fc1: nn.Linear
    fc2: nn.Linear

    def __init__(self, dim: int, intermediate: int, dropout: float = 0.0, activation: str = "relu"):
        super().__init__()
        self.fc1 = _tag(_Linear(dim, intermediate), "fixup_ffn")
        self.fc2 = _tag(_Linear(intermediate, dim), "fixup_ffn")
        self.dropout = _Dropout(dropout)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # (B, T, I)
        h = F.relu(h) if self.activation == "relu" else F.gelu(h)
        return self.fc2(self.dropout(h))  # (B, T, D)


# ----------------------------------------------------------------------------------------
# Blocks (take the config)
# ----------------------------------------------------------------------------------------


class NdtEmbedding(nn.Module):
    """Counts (B, T, N) -> tokens (B, T, D): embed, multiply by sqrt(D), add the learned position
    of each bin, dropout (reference: ``embedder(src) * sqrt(num_input)`` then ``pos_encoder``)."""

    count_emb: nn.Embedding
    linear: nn.Linear
    position_emb: nn.Embedding

    def __init__(self, config: NdtConfig):
        super().__init__()
        self.kind = config.embedding
        self.max_count = config.max_count
        if self.kind == "count":
            self.count_emb = _tag(nn.Embedding(config.max_count + 1, config.count_embedding_dim), "count")
        elif self.kind == "linear":
            self.linear = _tag(_Linear(config.num_total_neurons, _width(config)), "default")
        self.position_emb = _tag(nn.Embedding(config.num_positions, _width(config)), "position")
        self.scale = math.sqrt(_width(config))
        self.dropout = _Dropout(config.embedding_dropout)

    def embed_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """counts (B, T, N) -> (B, T, D), before scaling and positions."""
        if self.kind == "identity":
            return counts
        if self.kind == "count":
            index = counts.clamp(0, self.max_count).long()  # (B, T, N)
            return self.count_emb(index).flatten(-2)  # (B, T, N, E) -> (B, T, N*E)
        return self.linear(counts)

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        T = counts.shape[1]
        x = self.embed_counts(counts) * self.scale + self.position_emb.weight[:T]  # (B, T, D)
        return self.dropout(x)


class NdtLayer(nn.Module):
    """Pre-norm encoder layer: x += Drop(Attn(LN(x))); x += Drop(FFN(LN(x)))."""

    norm1: nn.LayerNorm
    self_attn: NdtAttention
    norm2: nn.LayerNorm
    ffn: NdtFeedForward

    def __init__(self, config: NdtConfig):
        super().__init__()
        d = _width(config)
        self.norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.self_attn = NdtAttention(d, config.num_attention_heads, config.attention_dropout)
        self.norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.ffn = NdtFeedForward(d, config.intermediate_size, config.hidden_dropout, config.hidden_act)
        self.dropout = _Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None, attn_implementation: str) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.norm1(x), attention_mask, attn_implementation))
        return x + self.dropout(self.ffn(self.norm2(x)))


# ----------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------


@dataclass
class NdtModelOutput(ModelOutput):
    """
    last_hidden_state: (B, T, D) encoder states after the final LayerNorm.
    """

    last_hidden_state: torch.Tensor | None = None


@dataclass
class NdtMaskedModelingOutput(ModelOutput):
    """
    loss: scalar Poisson NLL (``poisson_nll_loss(log_input=True, full=False)``: ``exp(x) - y * x``)
        averaged over the scored entries, when there is anything to score.
    log_rates: (B, T, N) predicted log firing rates per bin (held-in then held-out neurons).
    rates: (B, T, N) ``exp(log_rates)``, expected counts per bin.
    mask: (B, T) bool, the bins that were masked (None when no masking was applied).
    last_hidden_state: (B, T, D).
    """

    loss: torch.Tensor | None = None
    log_rates: torch.Tensor | None = None
    rates: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------


class NdtPreTrainedModel(PreTrainedModel):
    config: NdtConfig
    config_class = NdtConfig
    base_model_prefix = "ndt"
    main_input_name = "spikes"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _no_split_modules = ["NdtLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Reference init (NDT ``init_weights`` + ``fixup_initialization``):

        * QKV: Xavier-uniform over the packed (3D, D) matrix, bias 0 (``nn.MultiheadAttention``).
        * attention output and both feed-forward weights: PyTorch's Linear default
          U(+-1/sqrt(fan_in)) times ``0.67 * L ** -0.25`` (T-Fixup, Huang et al. 2020);
          the attention output bias is 0, the feed-forward biases keep the Linear default.
          The reference also multiplies a ``v_proj`` weight by sqrt(2), but torch's packed MHA
          has no such parameter, so the released models never got it; neither do we.
        * readout: U(-0.1, 0.1), bias 0; count embedding: U(-0.1, 0.1); positions N(0, 1).
        * LayerNorms: weight 1, bias 0.
        """
        c = self.config
        role = getattr(module, _ROLE, None)
        fixup = 0.67 * c.num_hidden_layers**-0.25 if c.fixup_init else 1.0
        if isinstance(module, nn.Linear):
            fan_in = module.weight.shape[1]
            bound = 1.0 / math.sqrt(fan_in)
            if role == "qkv":
                init.xavier_uniform_(module.weight)
                init.zeros_(module.bias)
            elif role == "fixup_out":
                init.uniform_(module.weight, -fixup * bound, fixup * bound)
                init.zeros_(module.bias)
            elif role == "fixup_ffn":
                init.uniform_(module.weight, -fixup * bound, fixup * bound)
                init.uniform_(module.bias, -bound, bound)
            elif role == "readout":
                init.uniform_(module.weight, -c.readout_init_range, c.readout_init_range)
                init.zeros_(module.bias)
            else:  # PyTorch's default Linear init
                init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                if module.bias is not None:
                    init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.Embedding):
            if role == "position":
                init.normal_(module.weight, mean=0.0, std=c.position_init_std)
            else:
                init.uniform_(module.weight, -0.1, 0.1)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class _LayerWeights(NamedTuple):
    """One layer's tensors for ``NdtModel._fast_encode_single`` (see ``_inference_weights``)."""

    norm1_weight: torch.Tensor
    norm1_bias: torch.Tensor
    wq: torch.Tensor  # (D, D) query rows of the QKV projection, times Dh^-1/2
    bq: torch.Tensor  # (D,)
    wkv: torch.Tensor  # (2D, D) key rows, then value rows
    wo: torch.Tensor  # (D, D)
    bo: torch.Tensor  # (D,) b_o + W_o b_v
    norm2_weight: torch.Tensor
    norm2_bias: torch.Tensor
    w1: torch.Tensor  # (I, D)
    b1: torch.Tensor
    w2: torch.Tensor  # (D, I)
    b2: torch.Tensor


def _trial_lengths(attention_mask: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor:
    """(B,) number of real bins per trial (observed + forward)."""
    if attention_mask is None:
        return torch.full((B,), T, dtype=torch.long, device=device)
    return attention_mask.long().sum(-1)


class NdtModel(NdtPreTrainedModel):
    """The NDT encoder: binned counts -> hidden states (B, T, D).

    Inputs (as made by :class:`~poyo_hf.models.ndt.NdtProcessor`):
        spikes: (B, T, N_in) held-in counts, float; forward bins and padding bins are zero.
            The held-out channels are appended here as zeros.
        attention_mask: optional (B, T), 1/True for real bins (observed + forward), 0 for the
            padding that follows a shorter trial. Padding never influences real bins.

    Inference paths. The modules (``NdtLayer`` ...) define the model and run whenever gradients
    are on, in training, or with ``attn_implementation="eager"`` (the reference). In eval mode with
    gradients off and the ``sdpa`` implementation, :meth:`encode` instead runs the same
    computation written against the raw weights, without dropout calls, attention-interface
    dispatch or per-module overhead:

    * a single trial on the CPU in float32 (the latency case): :meth:`_fast_encode_single`, 2-D
      matmuls through oneDNN with bias/ReLU/residual fused, attention per head as two matmuls
      and a softmax (see there);
    * otherwise :meth:`_fast_encode`: batched linears and ``F.scaled_dot_product_attention``.

    Both equal the eager reference to float32 rounding (tested). Masks: none at all at full
    context without padding; the band is built once per (T, device) and cached.
    """

    embeddings: NdtEmbedding
    norm: nn.LayerNorm

    def __init__(self, config: NdtConfig):
        super().__init__(config)
        self.embeddings = NdtEmbedding(config)
        self.layers = nn.ModuleList(NdtLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(_width(config), eps=config.layer_norm_eps)
        self._mask_cache: dict[tuple, torch.Tensor | None] = {}
        self._weight_cache: tuple[tuple, list[_LayerWeights]] | None = None
        self.post_init()

    def _layers(self) -> list[NdtLayer]:
        return list(self.layers)  # type: ignore[arg-type]

    def __getstate__(self) -> dict[str, Any]:
        # The inference caches are derived data (and hold oneDNN-packed tensors, which cannot be
        # copied or pickled): deepcopy / pickle get a model that rebuilds them on first use.
        state = dict(super().__getstate__())
        state["_mask_cache"] = {}
        state["_weight_cache"] = None
        return state

    # -- masks ------------------------------------------------------------------------------
    def band_mask(self, length: int, device: torch.device) -> torch.Tensor | None:
        """The (T, T) banded context mask, built once per (T, device) and cached (None = full)."""
        c = self.config
        key = ("band", length, str(device), c.context_backward, c.context_forward)
        if key not in self._mask_cache:
            self._mask_cache[key] = banded_attention_mask(length, c.context_backward, c.context_forward, device)
        return self._mask_cache[key]

    def _additive_band(self, length: int, device: torch.device) -> torch.Tensor | None:
        """The band as a float (T, T) bias, 0 where allowed and -inf elsewhere (cached)."""
        c = self.config
        key = ("additive", length, str(device), c.context_backward, c.context_forward)
        if key not in self._mask_cache:
            band = self.band_mask(length, device)
            self._mask_cache[key] = None if band is None else _additive(band)
        return self._mask_cache[key]

    def _padding(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B, T) bool of real bins, or None when there is no padding at all."""
        if attention_mask is None:
            return None
        valid = attention_mask.bool()
        return None if bool(valid.all()) else valid

    def attention_bias(
        self, attention_mask: torch.Tensor | None, length: int, device: torch.device
    ) -> torch.Tensor | None:
        """Boolean (B|1, 1, T, T) mask for the attention (True = attend), or None when every bin
        may attend to every bin (full context, no padding): SDPA then runs unmasked."""
        return self._combine(self._padding(attention_mask), length, device)

    def _combine(self, valid: torch.Tensor | None, length: int, device: torch.device) -> torch.Tensor | None:
        band = self.band_mask(length, device)  # (T, T) or None
        if valid is None:
            return None if band is None else band[None, None]
        eye = torch.eye(length, dtype=torch.bool, device=device)
        keys = valid[:, None, :] | eye  # (B, T, T): real keys, plus itself for a padding query
        allowed = keys if band is None else keys & band
        return allowed[:, None]  # (B, 1, T, T)

    # -- inference weights --------------------------------------------------------------------
    def _inference_weights(self) -> list[_LayerWeights]:
        """Per-layer tensors for :meth:`_fast_encode_single`, cached until any of them changes
        (keyed on each parameter's identity, storage and version counter, so optimiser steps,
        in-place edits, ``.to()`` and state-dict loads are all seen). Derived tensors:

        * wq, bq: the query rows of the QKV projection times ``Dh ** -0.5`` (the softmax scale);
        * wq, wo, w1, w2 are pre-packed into oneDNN's blocked layout (only ever used as weights);
        * wkv: the key and value rows (a view, no copy); the key bias is dropped, exactly: it adds
          ``q . b_k`` to every score of a query row, which the softmax ignores;
        * bo: ``b_o + W_o b_v``: attention rows sum to one, so the value bias passes through the
          attention unchanged and folds into the output bias.
        """
        # Plain dict lookups, not nn.Module.__getattr__: this check runs on every fast call.
        params: list[torch.Tensor | None] = []
        for layer in self.layers._modules.values():
            for sub in layer._modules.values():  # type: ignore[union-attr]
                for leaf in (sub, *sub._modules.values()):  # type: ignore[union-attr]
                    params.extend(leaf._parameters.values())  # type: ignore[union-attr]
        key = tuple((id(p), p.data_ptr(), p._version) for p in params if p is not None)
        if self._weight_cache is None or self._weight_cache[0] != key:
            rows = self.config.num_positions

            def pack(w: torch.Tensor) -> torch.Tensor:  # a weight used only as lp's weight argument
                w = w.detach().contiguous()
                return w if _ONEDNN_PACK is None else _ONEDNN_PACK(w, rows)

            prepared = []
            with torch.no_grad():
                for layer in self._layers():
                    attn, ffn = layer.self_attn, layer.ffn
                    D = attn.heads * attn.head_dim
                    w, b = attn.qkv_proj.weight, attn.qkv_proj.bias  # (3D, D), (3D,)
                    prepared.append(
                        _LayerWeights(
                            layer.norm1.weight,
                            layer.norm1.bias,
                            wq=pack(w[:D] * attn.scaling),
                            bq=(b[:D] * attn.scaling).contiguous(),
                            wkv=w[D:].detach().contiguous(),  # used as lp's input: plain layout
                            wo=pack(attn.o_proj.weight),
                            bo=torch.addmv(attn.o_proj.bias, attn.o_proj.weight, b[2 * D :]),
                            norm2_weight=layer.norm2.weight,
                            norm2_bias=layer.norm2.bias,
                            w1=pack(ffn.fc1.weight),
                            b1=ffn.fc1.bias,
                            w2=pack(ffn.fc2.weight),
                            b2=ffn.fc2.bias,
                        )
                    )
            self._weight_cache = (key, prepared)
        return self._weight_cache[1]

    # -- forward ------------------------------------------------------------------------------
    def _check_spikes(self, spikes: torch.Tensor) -> torch.Tensor:
        c = self.config
        if spikes.dim() != 3:
            raise ValueError(
                f"spikes must be (B, T, num_neurons) binned counts, got shape {tuple(spikes.shape)}; "
                "use NdtProcessor to bin spike times."
            )
        if spikes.shape[-1] != c.num_neurons:
            raise ValueError(
                f"spikes has {spikes.shape[-1]} neurons (last dim) but config.num_neurons is {c.num_neurons} "
                "held-in neurons; pass the held-in counts only (held-out channels are added as zeros)."
            )
        if spikes.shape[1] > c.num_positions:
            raise ValueError(
                f"spikes has {spikes.shape[1]} bins but the position table holds num_bins + num_forward_bins "
                f"= {c.num_positions}; crop the trial or build the config with a larger num_bins."
            )
        return spikes if torch.is_floating_point(spikes) else spikes.float()

    def _heldout_zeros(self, spikes: torch.Tensor) -> torch.Tensor:
        n_out = self.config.num_heldout_neurons
        return F.pad(spikes, (0, n_out)) if n_out else spikes  # (B, T, N_in) -> (B, T, N)

    def _use_fast_path(self) -> bool:
        impl = self.config._attn_implementation or "sdpa"
        return impl == "sdpa" and not self.training and not torch.is_grad_enabled()

    def _embed_eval(self, counts: torch.Tensor) -> torch.Tensor:
        """Eval-mode embedding (no dropout): counts (B, T, N) -> (B, T, D)."""
        emb = self.embeddings
        pos = emb.position_emb.weight[: counts.shape[1]]  # (T, D)
        if emb.kind == "identity":
            return torch.add(pos, counts, alpha=emb.scale)  # pos + sqrt(D) * counts
        return emb.embed_counts(counts) * emb.scale + pos

    def _fast_encode(self, counts: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Batched inference path: counts (B, T, N) -> normed states (B, T, D); ``mask`` as
        :meth:`attention_bias`. One QKV matmul per layer and SDPA (unmasked at full context)."""
        onednn = _onednn_ok(counts)
        x = self._embed_eval(counts)  # (B, T, D)
        B, T, D = x.shape
        shape = (D,)
        for layer in self._layers():
            attn, ffn = layer.self_attn, layer.ffn
            y = F.layer_norm(x, shape, layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
            qkv = _dense(y, attn.qkv_proj.weight, attn.qkv_proj.bias, onednn)  # (B, T, 3D)
            q, k, v = qkv.view(B, T, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, Dh)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)  # (B, H, T, Dh)
            x = _dense(o.transpose(1, 2).reshape(B, T, D), attn.o_proj.weight, attn.o_proj.bias, onednn, residual=x)
            y = F.layer_norm(x, shape, layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
            h = _dense(y, ffn.fc1.weight, ffn.fc1.bias, onednn, activation=ffn.activation)  # (B, T, I)
            x = _dense(h, ffn.fc2.weight, ffn.fc2.bias, onednn, residual=x)
        return F.layer_norm(x, shape, self.norm.weight, self.norm.bias, self.norm.eps)

    def _fast_encode_single(self, counts: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """One trial on the CPU in float32: counts (1, T, N) -> normed states (T, D).

        ``bias``: optional (T, T) float, 0 = attend, -inf = not. Every matmul is a 2-D oneDNN
        linear with its bias, ReLU or residual add fused. Per layer and head h::

            q = LN(x) Wq^T + bq                       (T, D), pre-scaled by Dh^-1/2
            [K^T; V^T] = [Wk; Wv] LN(x)^T             (2D, T), computed transposed so that
                                                      each head's block is contiguous
            o_h = softmax(q_h K_h^T + bias) V_h       (T, Dh)
            x  += [o_1 .. o_H] Wo^T + (b_o + W_o b_v) (key/value biases: see _inference_weights)
        """
        x = self._embed_eval(counts)[0]  # (T, D)
        D = x.shape[1]
        shape = (D,)
        first = self._layers()[0]
        H, Dh, eps = first.self_attn.heads, first.self_attn.head_dim, first.norm1.eps
        relu = first.ffn.activation == "relu"
        lin, lin_add = _ONEDNN_LINEAR, _ONEDNN_LINEAR_ADD
        for n1w, n1b, wq, bq, wkv, wo, bo, n2w, n2b, w1, b1, w2, b2 in self._inference_weights():
            y = F.layer_norm(x, shape, n1w, n1b, eps)  # (T, D)
            q = lin(y, wq, bq, "none", [], "")  # (T, D)
            if H > 1:
                q = q.view(-1, H, Dh).transpose(0, 1).contiguous()  # (H, T, Dh): one copy, contiguous heads
            kv_t = lin(wkv, y, None, "none", [], "")  # (2D, T): K^T rows, then V^T rows
            heads = []
            for i in range(H):
                q_h = q[i] if H > 1 else q  # (T, Dh)
                k_h = kv_t[i * Dh : (i + 1) * Dh].t()  # (T, Dh), a transposed view of a contiguous block
                if bias is None:
                    scores = lin(q_h, k_h, None, "none", [], "")  # (T, T) = q_h k_h^T
                else:
                    scores = lin_add(q_h, bias, k_h, None, "add")  # q_h k_h^T + bias
                v_t = kv_t[D + i * Dh : D + (i + 1) * Dh]  # (Dh, T)
                heads.append(lin(torch.softmax(scores, dim=-1), v_t, None, "none", [], ""))  # (T, Dh)
            o = heads[0] if H == 1 else torch.cat(heads, dim=1)  # (T, D)
            x = lin_add(o, x, wo, bo, "add")  # x + o Wo^T + bo
            y = F.layer_norm(x, shape, n2w, n2b, eps)
            if relu:
                h = lin(y, w1, b1, "relu", [], "")  # (T, I)
            else:
                h = F.gelu(lin(y, w1, b1, "none", [], ""))
            x = lin_add(h, x, w2, b2, "add")  # x + h W2^T + b2
        return F.layer_norm(x, shape, self.norm.weight, self.norm.bias, self.norm.eps)

    def encode(self, counts: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """counts (B, T, N) with held-out channels already present (zeros) -> (B, T, D)."""
        B, T, _ = counts.shape
        valid = self._padding(attention_mask)
        if self._use_fast_path():
            if B == 1 and _onednn_ok(counts):
                allowed = None if valid is None else self._combine(valid, T, counts.device)
                bias = self._additive_band(T, counts.device) if allowed is None else _additive(allowed[0, 0])
                return self._fast_encode_single(counts, bias)[None]
            return self._fast_encode(counts, self._combine(valid, T, counts.device))
        mask = self._combine(valid, T, counts.device)
        impl = self.config._attn_implementation or "sdpa"
        x = self.embeddings(counts)  # (B, T, D)
        for layer in self._layers():
            x = layer(x, mask, impl)
        return self.norm(x)

    def forward(
        self,
        spikes: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> NdtModelOutput:
        spikes = self._check_spikes(spikes)
        hidden = self.encode(self._heldout_zeros(spikes), attention_mask)
        return NdtModelOutput(last_hidden_state=hidden)


class NdtForMaskedModeling(NdtPreTrainedModel):
    """NDT with its log-rate readout and the masked-modelling Poisson loss: the model users load.

    Inputs:
        spikes: (B, T, N_in) held-in counts (forward and padding bins zero).
        attention_mask: optional (B, T), 1 for real bins (observed + forward), 0 for padding.
            The last ``config.num_forward_bins`` real bins of each trial are its forward bins.
        heldout_spikes: optional (B, T, N_out) or (B, T - F, N_out) held-out counts of the
            observed bins (values at forward / padding bins are ignored). Always in the loss.
        forward_spikes: optional (B, F, N) true counts of the forward bins, held-in then held-out
            neurons. Always in the loss.
        mask: ``None`` (default): mask bins when ``model.training``; ``True`` / ``False``: force
            it on / off; a (B, T) bool tensor: mask exactly these observed bins (the entries are
            still corrupted at random per ``mask_token_ratio`` / ``mask_random_ratio``).
        generator: optional ``torch.Generator`` for the masking draws.

    Masking (only observed real bins are ever masked): see :meth:`sample_mask`. The span ramp
    reads ``self.mask_step``, a plain counter (not saved) advanced by one on every forward that
    samples its own mask; set it (e.g. to ``trainer.state.global_step``) when resuming training.

    The loss is the mean Poisson NLL with log input, ``exp(x) - y * x`` (torch's
    ``poisson_nll_loss(log_input=True, full=False)``), over: held-in entries of masked bins (the
    target is the uncorrupted ``spikes``), held-out entries of all observed bins (when
    ``heldout_spikes`` is given) and all entries of the forward bins (when ``forward_spikes`` is
    given). With nothing to score (eval mode, no targets) ``loss`` is None.
    """

    # Our forward takes **kwargs but returns a plain mean loss: Trainer must divide by
    # gradient-accumulation steps itself (hf-notes).
    accepts_loss_kwargs = False
    ndt: NdtModel
    readout: nn.Linear

    def __init__(self, config: NdtConfig):
        super().__init__(config)
        self.ndt = NdtModel(config)
        self.readout_dropout = _Dropout(config.readout_dropout)
        self.readout = _tag(_Linear(_width(config), config.num_total_neurons), "readout")
        self.mask_step = 0
        self.post_init()

    # -- masking ------------------------------------------------------------------------------
    def sample_mask(
        self,
        maskable: torch.Tensor,
        step: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Draw the bin mask of one batch: (mask (B, T) bool, span width).

        With probability ``span_expand_probability(step, ramp_start, ramp_end)`` (and
        ``mask_max_span > 1``) the batch uses one width ``w ~ U{1..mask_max_span}``, else ``w = 1``;
        seeds are Bernoulli(``mask_ratio / w``) on ``maskable`` and each covers ``w`` bins
        (reference ``Masker.mask_batch``, mode "timestep"). ``step`` defaults to ``self.mask_step``.
        """
        c = self.config
        step = self.mask_step if step is None else step
        p = span_expand_probability(step, c.mask_span_ramp_start, c.mask_span_ramp_end)
        width = 1
        if c.mask_max_span > 1 and p > 0.0 and torch.rand((), device=maskable.device, generator=generator).item() < p:
            width = int(torch.randint(1, c.mask_max_span + 1, (), device=maskable.device, generator=generator))
        return sample_bin_mask(maskable, c.mask_ratio, width, generator), width

    # -- forward ------------------------------------------------------------------------------
    def forward(
        self,
        spikes: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        heldout_spikes: torch.Tensor | None = None,
        forward_spikes: torch.Tensor | None = None,
        mask: bool | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_loss: bool = True,
        **kwargs,
    ) -> NdtMaskedModelingOutput:
        c = self.config
        spikes = self.ndt._check_spikes(spikes)
        B, T, _ = spikes.shape
        device = spikes.device
        F_ = c.num_forward_bins

        wants_mask = isinstance(mask, torch.Tensor) or mask is True or (mask is None and self.training)
        wants_targets = return_loss and (heldout_spikes is not None or forward_spikes is not None)
        observed: torch.Tensor | None = None  # (B, T) bool, observed (maskable) real bins
        n_obs: torch.Tensor | None = None  # (B,) observed bins per trial
        if wants_mask or wants_targets:
            lengths = _trial_lengths(attention_mask, B, T, device)  # (B,) real bins
            n_obs = lengths - F_
            if bool((n_obs < 1).any()):
                raise ValueError(
                    f"every trial needs at least one observed bin, but a trial has {int(lengths.min())} real bins "
                    f"and num_forward_bins is {F_}; check attention_mask (1 for observed and forward bins)."
                )
            observed = torch.arange(T, device=device)[None, :] < n_obs[:, None]  # (B, T)

        bin_mask = None
        inputs = spikes
        if observed is not None and isinstance(mask, torch.Tensor):
            if mask.shape != (B, T):
                raise ValueError(f"mask must be a (B, T) = {(B, T)} bool tensor of bins, got {tuple(mask.shape)}.")
            bin_mask = mask.bool() & observed
        elif observed is not None and wants_mask:
            bin_mask, _ = self.sample_mask(observed, generator=generator)
            if mask is None:
                self.mask_step += 1
        if bin_mask is not None:
            inputs, _, _ = replace_masked_entries(
                spikes, bin_mask, c.mask_token_ratio, c.mask_random_ratio, generator
            )

        hidden = self.ndt.encode(self.ndt._heldout_zeros(inputs), attention_mask)  # (B, T, D)
        if self.ndt._use_fast_path():  # eval, no autograd: no dropout call, oneDNN linear on the CPU
            log_rates = _dense(hidden, self.readout.weight, self.readout.bias, _onednn_ok(hidden))  # (B, T, N)
        else:
            log_rates = self.readout(self.readout_dropout(hidden))  # (B, T, N)

        loss = None
        if return_loss and observed is not None and n_obs is not None and (bin_mask is not None or wants_targets):
            loss = self.loss_function(log_rates, spikes, bin_mask, observed, heldout_spikes, forward_spikes, n_obs)
        return NdtMaskedModelingOutput(
            loss=loss,
            log_rates=log_rates,
            rates=log_rates.exp(),
            mask=bin_mask,
            last_hidden_state=hidden,
        )

    def loss_function(
        self,
        log_rates: torch.Tensor,
        spikes: torch.Tensor,
        bin_mask: torch.Tensor | None,
        observed: torch.Tensor,
        heldout_spikes: torch.Tensor | None,
        forward_spikes: torch.Tensor | None,
        n_obs: torch.Tensor,
    ) -> torch.Tensor:
        """Mean Poisson NLL (log input, no Stirling term) over the scored entries; see the class
        docstring. Returns 0 (with a graph) when no entry is scored."""
        c = self.config
        B, T, N = log_rates.shape
        n_in, F_ = c.num_neurons, c.num_forward_bins
        targets = torch.zeros_like(log_rates)  # (B, T, N)
        scored = torch.zeros(B, T, N, dtype=torch.bool, device=log_rates.device)
        if bin_mask is not None:
            targets[..., :n_in] = spikes.to(targets.dtype)
            scored[..., :n_in] |= bin_mask[..., None]
        if heldout_spikes is not None and c.num_heldout_neurons:
            h = heldout_spikes.to(targets.dtype)
            if h.dim() != 3 or h.shape[0] != B or h.shape[2] != c.num_heldout_neurons or h.shape[1] not in (T, T - F_):
                raise ValueError(
                    f"heldout_spikes must be (B, T, N_out) = ({B}, {T}, {c.num_heldout_neurons}) or (B, T - F, N_out) "
                    f"= ({B}, {T - F_}, {c.num_heldout_neurons}), got {tuple(heldout_spikes.shape)}."
                )
            targets[:, : h.shape[1], n_in:] = h
            scored[..., n_in:] |= observed[..., None]
        if forward_spikes is not None and F_:
            f = forward_spikes.to(targets.dtype)
            if tuple(f.shape) != (B, F_, N):
                raise ValueError(
                    f"forward_spikes must be (B, F, N) = ({B}, {F_}, {N}): the forward bins' counts of the held-in "
                    f"then held-out neurons; got {tuple(forward_spikes.shape)}."
                )
            rows = n_obs[:, None] + torch.arange(F_, device=log_rates.device)  # (B, F) positions of forward bins
            batch = torch.arange(B, device=log_rates.device)[:, None]  # (B, 1)
            targets[batch, rows] = f
            scored[batch, rows] = True
        # A masked sum rather than log_rates[scored]: boolean indexing runs serial nonzero passes and an
        # index_put in backward. Loss + backward at MC_Maze size, batch 32, CPU: 11 vs 20 ms (~4% of a step).
        # Unscored entries get log-rate 0 first, so a huge unscored log-rate cannot make 0 * inf = NaN.
        x = log_rates.masked_fill(~scored, 0.0)
        nll = F.poisson_nll_loss(x, targets, log_input=True, full=False, reduction="none")  # (B, T, N)
        return torch.where(scored, nll, 0.0).sum() / scored.sum().clamp(min=1)


__all__ = [
    "NdtAttention",
    "NdtForMaskedModeling",
    "NdtMaskedModelingOutput",
    "NdtModel",
    "NdtModelOutput",
    "NdtPreTrainedModel",
    "banded_attention_mask",
    "expand_spans",
    "replace_masked_entries",
    "sample_bin_mask",
    "span_expand_probability",
]
