"""CPU training kernels: two small C++ loops compiled on first use (dropout masks without
``bernoulli_``), and linear layers routed through oneDNN (:func:`linear`, see its section below).

Why by hand: on the CPU, ``F.dropout`` draws one float per element from the serial mt19937
generator (``bernoulli_``: 117 ms for the 18.9M encoder attention weights of the benchmark batch,
2 threads), and nothing in torch, numpy or elsewhere draws dropout masks faster on the CPU. Here
each group of four elements gets its 16-bit uniforms from one counter-based hash (the output
function of SplitMix64, Steele, Lea & Flood 2014, the generator of ``java.util.SplittableRandom``,
applied to ``seed + group * golden ratio``), so:

* a mask costs one pass over the tensor, threads split it without sharing generator state, and
  it is the same whatever the thread count;
* backward regenerates the mask from the seed instead of storing it;
* the seed is drawn from torch's default generator, so ``torch.manual_seed`` still makes runs
  reproducible.

``dropout_apply(x, drop, seed, scale)`` returns ``x * scale`` where an element's 16-bit uniform is
>= ``drop`` and 0 elsewhere (``modeling_poyo.seeded_dropout`` passes drop = round(p * 65536) and
scale = 1 / P(keep));
``softmax_dropout_grad_(grad, kept, probs)`` is the softmax-with-dropout backward row kernel
(see ``_CpuDropoutAttention``). The C++ is compiled once per machine with
``torch.utils.cpp_extension.load_inline`` (~30 s, cached in ``TORCH_EXTENSIONS_DIR``); without a
C++ compiler, or with ``POYO_HF_CPU_KERNELS=0``, :func:`kernels` returns None and callers use plain
torch ops instead (same distributions, slower).
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>

// One build, vectorised for the CPU it runs on: GCC/clang emit AVX-512 / AVX2 / baseline
// versions of the hot loops and pick one when the library loads.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define POYO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define POYO_CLONES
#endif

namespace {

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ULL;
constexpr int64_t kGroups = 256;  // hashes per block: 1024 elements

inline uint64_t mix64(uint64_t z) {  // SplitMix64 finaliser (Steele, Lea & Flood 2014)
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// out[i] = u16(i) >= drop ? x[i] * scale : 0 for elements [4 * g0, min(4 * g1, n)); element i
// reads 16-bit lane (i % 4) of mix64(seed + (i / 4) * golden).
POYO_CLONES void apply_groups(const float* x, float* out, int64_t g0, int64_t g1, int64_t n,
                              uint64_t seed, uint32_t drop, float scale) {
  uint64_t words[kGroups];
  uint16_t lanes[kGroups * 4];
  for (int64_t g = g0; g < g1; g += kGroups) {
    const int64_t gn = std::min(kGroups, g1 - g);
    for (int64_t j = 0; j < gn; ++j) words[j] = mix64(seed + (uint64_t)(g + j) * kGolden);
    std::memcpy(lanes, words, sizeof(uint64_t) * gn);  // little-endian lanes, no aliasing
    const int64_t base = g * 4, count = std::min(gn * 4, n - base);
    const float* xb = x + base;
    float* ob = out + base;
#pragma omp simd
    for (int64_t k = 0; k < count; ++k) ob[k] = lanes[k] >= drop ? xb[k] * scale : 0.0f;
  }
}

// Rows of the softmax-with-dropout backward, in place: g <- A * g - P * sum(A * g).
POYO_CLONES void grad_rows(float* g, const float* a, const float* p, int64_t r0, int64_t r1, int64_t cols) {
  for (int64_t r = r0; r < r1; ++r) {
    float* gr = g + r * cols;
    const float* ar = a + r * cols;
    const float* pr = p + r * cols;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t c = 0; c < cols; ++c) {
      const float t = ar[c] * gr[c];
      gr[c] = t;
      dot += t;
    }
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) gr[c] -= pr[c] * dot;
  }
}

}  // namespace

torch::Tensor dropout_apply(torch::Tensor x, int64_t drop, int64_t seed, double scale) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.device().is_cpu(), "dropout_apply: float32 CPU tensor expected");
  TORCH_CHECK(drop >= 0 && drop < 65536, "dropout_apply: drop threshold out of range");
  x = x.contiguous();
  auto out = torch::empty_like(x);
  const int64_t n = x.numel();
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, (n + 3) / 4, 16384, [&](int64_t g0, int64_t g1) {
    apply_groups(xp, op, g0, g1, n, (uint64_t)seed, (uint32_t)drop, (float)scale);
  });
  return out;
}

torch::Tensor softmax_dropout_grad_(torch::Tensor grad, torch::Tensor kept, torch::Tensor probs) {
  TORCH_CHECK(grad.is_contiguous() && kept.is_contiguous() && probs.is_contiguous(), "contiguous tensors expected");
  TORCH_CHECK(grad.sizes() == kept.sizes() && grad.sizes() == probs.sizes(), "shapes differ");
  TORCH_CHECK(grad.scalar_type() == torch::kFloat && kept.scalar_type() == torch::kFloat && probs.scalar_type() == torch::kFloat, "float32 expected");
  const int64_t cols = grad.size(-1), rows = cols ? grad.numel() / cols : 0;
  float* g = grad.data_ptr<float>();
  const float* a = kept.data_ptr<float>();
  const float* p = probs.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)), [&](int64_t r0, int64_t r1) {
    grad_rows(g, a, p, r0, r1, cols);
  });
  return grad;
}
"""

def kernels():
    """The compiled extension module, or None where it cannot be built (no compiler, a build
    error, or ``POYO_HF_CPU_KERNELS=0``); built on the first call and then cached."""
    if os.environ.get("POYO_HF_CPU_KERNELS", "1") == "0":
        return None
    return _build()


# Cached: one build (or one failed attempt and its warning) per process. Two threads racing here
# at most load twice; load_inline holds a file lock around the build itself.
@functools.cache
def _build():
    try:
        from torch.utils.cpp_extension import load_inline
        from transformers.utils import logging

        logging.get_logger(__name__).info("poyo_hf: building the CPU dropout kernels (once per machine, ~30 s)")

        return load_inline(
            name="poyo_hf_cpu_dropout",
            cpp_sources=_SOURCE,
            functions=["dropout_apply", "softmax_dropout_grad_"],
            extra_cflags=["-O3", "-fopenmp-simd"],
            verbose=False,
        )
    except Exception as err:  # no compiler / headers / ninja: fall back to plain torch ops
        warnings.warn(
            f"poyo_hf: could not build the CPU dropout kernels ({type(err).__name__}: {err}); CPU training "
            "uses plain torch ops instead (same results in distribution, slower). Install a C++ compiler "
            "and ninja to enable them, or set POYO_HF_CPU_KERNELS=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A 64-bit seed (as a signed int) from torch's CPU generator, so ``torch.manual_seed`` applies."""
    return int(torch.empty((), dtype=torch.int64).random_(-(2**63), None, generator=generator))


# ----------------------------------------------------------------------------------------
# Linear layers through oneDNN
# ----------------------------------------------------------------------------------------
# Why by hand: torch's float32 ``F.linear`` on the CPU calls MKL's sgemm. On the AMD EPYC machine
# this was measured on (2 threads), MKL runs POYO's projections at about half the speed oneDNN
# does; oneDNN ships inside every x86 torch wheel (torch runs its convolutions with it) and
# ``torch.ops.mkldnn._linear_pointwise`` is the entry point torch's own compiler emits for it.
# No public torch API routes a float32 linear (or its backward) there, hence this module.
# * Training: :class:`_OneDnnLinear` (forward and both gradients through oneDNN). Measured (one
#   process, old/new steps interleaved): a training step 9-17% faster for poyo-mp on the benchmark
#   batch (32 windows, 128 latents each), 19% for poyo-1 (16 windows), 7% for the quickstart's
#   2-layer model (16 windows, 64 latents each); per projection, e.g. the self-attention QKV
#   (4096 x 64 -> 1536) forward 3.6 vs 8.5 ms and input gradient 3.8 vs 8.8 ms.
# * Inference (no gradient): :class:`PoyoLinear` multiplies by a copy of its weight reordered
#   once into oneDNN's blocked layout (:func:`pack_weight`; refreshed when the weight changes).
#   Unpacked, oneDNN was no faster at batch 1 (128 latent rows); packed, the batch-1 forward took
#   ~5% less time and a streaming step 7-13% less at p50 (interleaved A/B).
# * Only products of at least ``ONEDNN_MIN_MACS`` multiply-adds: a oneDNN call costs ~20 us more
#   than MKL's for tiny ones (100 x 64 -> 2: 21 vs 6 us; 128 x 256 -> 64, 2.1M MACs: even;
#   300 x 64 -> 256, 4.9M: 36 vs 58 us).
# Results equal ``F.linear``'s up to float32 rounding (summation order).
# ``POYO_HF_ONEDNN_LINEAR=0`` keeps ``F.linear`` everywhere; ``=1`` also uses oneDNN off x86.

ONEDNN_MIN_MACS = 1 << 22  # rows x in_features x out_features
_ONEDNN_SETTINGS = ("0", "1", "auto")


@functools.cache
def _onednn_available() -> bool:
    return (
        bool(torch.backends.mkldnn.is_available())
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def onednn_linear_enabled() -> bool:
    """Whether :func:`linear` may route float32 CPU products through oneDNN in this process: by
    default on x86-64 where torch was built with oneDNN (``POYO_HF_ONEDNN_LINEAR``: 0, 1 or auto).
    The variable is read at every call (tests and users may change it); its meaning is cached."""
    return _onednn_setting_enabled(os.environ.get("POYO_HF_ONEDNN_LINEAR", "auto"))


@functools.cache
def _onednn_setting_enabled(raw: str) -> bool:
    setting = raw.strip().lower()
    if setting not in _ONEDNN_SETTINGS:
        raise ValueError(
            f"POYO_HF_ONEDNN_LINEAR={setting!r} is not one of {', '.join(_ONEDNN_SETTINGS)}; "
            "use 0 to keep torch's F.linear, 1 to use oneDNN, auto (default) for oneDNN on x86-64."
        )
    if setting == "0" or not _onednn_available():
        return False
    return setting == "1" or platform.machine().lower() in ("x86_64", "amd64")


def use_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``x @ weight^T + bias`` goes through oneDNN here: float32 CPU operands, at least
    ``ONEDNN_MIN_MACS`` multiply-adds, not under autocast or ``torch.compile`` tracing, enabled."""
    return (
        x.numel() * weight.shape[0] >= ONEDNN_MIN_MACS
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled("cpu")
        and onednn_linear_enabled()
    )


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T + bias: (M, N). ``weight`` may be packed (:func:`pack_weight`).
    A transposed ``weight`` view is read in place (oneDNN's "ba" layout); a transposed ``x`` is
    first copied by the op (ONEDNN_VERBOSE shows both)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()  # (M, N)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn(grad, weight.t().contiguous(), None)  # (M, N) @ (N, K): (M, K)
        if ctx.needs_input_grad[1]:
            n, k = weight.shape
            # grad_w = grad^T x, (N, K), from transposed views; of the two orientations, the one
            # whose copied operand (see _onednn) is the smaller measured faster (QKV: 3.5 vs
            # 9.9 ms, MKL 7.1; out-projection 512 -> 64: 1.5 vs 3.4 ms, MKL 2.0).
            grad_w = _onednn(x.t(), grad.t(), None).t() if n > k else _onednn(grad.t(), x.t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


def _tracks_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])  # (..., K) -> (M, K)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, track: bool) -> torch.Tensor:
    """The oneDNN product once :func:`use_onednn` said yes; through :class:`_OneDnnLinear` if ``track``."""
    weight = weight.contiguous()
    apply = _OneDnnLinear.apply if track else _onednn
    return apply(_as_rows(x), weight, bias).view(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where :func:`use_onednn` says so (see above);
    every other case (GPU, autocast, bf16, small products, ``torch.compile`` tracing,
    ``POYO_HF_ONEDNN_LINEAR=0``) is ``F.linear`` itself."""
    if not use_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    return _onednn_linear(x, weight, bias, _tracks_grad(x, weight, bias))


def pack_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """A float32 CPU ``weight`` (N, K) reordered into oneDNN's blocked layout for inputs of about
    ``rows`` rows (any row count gives the same products), for :func:`packed_linear`. A copy, for
    inference: it does not follow later changes of ``weight`` and takes no gradient."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T + bias`` with ``packed = pack_weight(weight, ...)``, for float32 CPU ``x``."""
    return _onednn(_as_rows(x), packed, bias).view(*x.shape[:-1], packed.shape[0])


# Each PoyoLinear's packed weight, beside the module rather than on it, so that deepcopy, pickling,
# state dicts and ``.to()`` never see oneDNN tensors: module -> (weakref to the weight it was packed
# from, (data_ptr, version, shape) then, packed). A new Parameter object, new storage or an
# in-place change (optimizer step, load_state_dict) each make the next call pack again.
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class PoyoLinear(nn.Linear):
    """``nn.Linear`` (same parameters, init and state-dict keys) whose products go through oneDNN
    where :func:`use_onednn` says so: :func:`linear` when gradients flow, otherwise a packed copy
    of the weight (made on first use, remade whenever the weight is replaced or its data or version
    changes, as an optimizer step or ``load_state_dict`` does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if not use_onednn(x, weight, bias):  # decided once per call: linear() would ask again
            return F.linear(x, weight, bias)
        if _tracks_grad(x, weight, bias):
            return _onednn_linear(x, weight, bias, track=True)
        key = (weight.data_ptr(), weight._version, tuple(weight.shape))
        cached = _PACKED.get(self)
        if cached is None or cached[0]() is not weight or cached[1] != key:
            cached = (weakref.ref(weight), key, pack_weight(weight, x.numel() // x.shape[-1]))
            _PACKED[self] = cached
        return packed_linear(x, cached[2], bias)


__all__ = [
    "kernels", "draw_seed", "linear", "PoyoLinear", "onednn_linear_enabled", "use_onednn", "pack_weight",
    "packed_linear", "ONEDNN_MIN_MACS",
]
