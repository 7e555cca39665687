"""CPU kernels: small C++ loops compiled on first use (dropout masks without ``bernoulli_``, the
softmax-with-dropout backward; for inference a fused attention forward, :func:`attention`, a
linear kernel for few rows, :func:`small_linear`, and the rotary phases, :func:`rotary_phases`), and
linear layers routed through oneDNN (:func:`linear`, see its section below). Each section says why
it is written by hand.

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
(see ``_CpuDropoutAttention``); the inference loops are described at their Python entry points. The C++ is
compiled once per machine with ``torch.utils.cpp_extension.load_inline`` (~30-60 s, cached in
``TORCH_EXTENSIONS_DIR``), with OpenMP so that ``at::parallel_for`` uses torch's threads (the
dropout masks of the benchmark batch's encoder attention: 6.8-7.3 ms on 2 threads against
10.2-10.3 ms for the serial build that earlier versions made without noticing); without a C++
compiler, or with ``POYO_HF_CPU_KERNELS=0``, :func:`kernels` returns None and callers use plain
torch ops instead (same distributions and results, slower).
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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>

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


// ---- Attention forward (inference): softmax(q k^T * scale, key mask) v ----------------------
// Per (window, head, block of kQB query rows): S = q k^T in micro-tiles (kMR rows x kNC keys,
// register accumulators, K read transposed so each step is a broadcast-and-FMA), the softmax
// rows in place, then S v in micro-tiles (PR rows x Dh). K is transposed once per call into a
// scratch whose row stride is kept off multiples of 4 KiB (cache-set aliasing halved the speed).

constexpr int kMR = 8;    // query rows per score tile
constexpr int kNC = 32;   // keys per score tile
constexpr int64_t kQB = 32;  // query rows per task

// out[r, c] = scale * sum_k x[r, k] w[k, c] (+ bias[c]) for r < rows, c < cols of a kMR x kNC tile:
// x is kMR rows of K (zero-padded), w is K rows ldw apart. The one product tile of this file: the
// attention scores (x the queries, w the keys transposed) and the small linear layers (w the weight
// transposed). Each step broadcasts one x value against kNC contiguous w values. KC > 0 fixes K at
// compile time (the scores over a head dim: 5-7% faster than the runtime loop, interleaved A/B).
template <int KC>
POYO_CLONES void product_tile(const float* x, int64_t K, const float* w, int64_t ldw, float* out, int64_t ldo,
                              float scale, const float* bias, int rows, int cols) {
  if (KC > 0) K = KC;
  float acc[kMR][kNC];
  for (int r = 0; r < kMR; ++r)
#pragma omp simd
    for (int c = 0; c < kNC; ++c) acc[r][c] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float* wr = w + k * ldw;
    for (int r = 0; r < kMR; ++r) {
      const float xv = x[r * K + k];
#pragma omp simd
      for (int c = 0; c < kNC; ++c) acc[r][c] += xv * wr[c];
    }
  }
  for (int r = 0; r < kMR; ++r)
#pragma omp simd
    for (int c = 0; c < kNC; ++c) acc[r][c] = acc[r][c] * scale + (bias ? bias[c] : 0.f);
  if (rows == kMR && cols == kNC) {
    for (int r = 0; r < kMR; ++r)
#pragma omp simd
      for (int c = 0; c < kNC; ++c) out[r * ldo + c] = acc[r][c];
  } else {
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) out[r * ldo + c] = acc[r][c];
  }
}

// o[r, :] = w[r] * sum_j p[r, j] v[j, :] for r < PR; o rows ldo apart.
template <int DH, int PR>
POYO_CLONES void value_tile(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t n, float* o, int64_t ldo, const float* w) {
  float acc[PR][DH];
  for (int r = 0; r < PR; ++r)
#pragma omp simd
    for (int c = 0; c < DH; ++c) acc[r][c] = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float* vr = v + j * ldv;
    for (int r = 0; r < PR; ++r) {
      const float pv = p[r * ldp + j];
#pragma omp simd
      for (int c = 0; c < DH; ++c) acc[r][c] += pv * vr[c];
    }
  }
  for (int r = 0; r < PR; ++r)
#pragma omp simd
    for (int c = 0; c < DH; ++c) o[r * ldo + c] = acc[r][c] * w[r];
}

// Row max of s[j] + bias[j] (bias 0 or -inf: the key mask; may be null), written back to s.
POYO_CLONES float masked_max(float* s, const float* bias, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  if (bias) {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) {
      const float x = s[j] + bias[j];
      s[j] = x;
      m = m > x ? m : x;
    }
  } else {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) m = m > s[j] ? m : s[j];
  }
  return m;
}

// s[j] <- exp(s[j] - m) in place; returns the sum. Cephes' expf (range reduction by ln 2 in two
// parts, degree-6 polynomial, 2^n from the exponent bits): within ~2 ulp of exp, vectorised;
// arguments below -87.3 (exp < 1.2e-38, masked keys at -inf) give exactly 0.
POYO_CLONES float exp_sum(float* s, int64_t n, float m) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float x0 = s[j] - m;
    const float x = x0 < -87.3f ? -87.3f : x0;
    const float fn = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
    float r = x - fn * 0.693359375f;
    r = r - fn * -2.12194440e-4f;
    float y = 1.9875691500E-4f;
    y = y * r + 1.3981999507E-3f;
    y = y * r + 8.3334519073E-3f;
    y = y * r + 4.1665795894E-2f;
    y = y * r + 1.6666665459E-1f;
    y = y * r + 5.0000001201E-1f;
    y = y * r * r + r + 1.0f;
    y = y * __builtin_bit_cast(float, ((int32_t)fn + 127) << 23);
    y = x0 < -87.3f ? 0.f : y;
    s[j] = y;
    sum += y;
  }
  return sum;
}

// Rotary phases: unit complex numbers (cos, sin), P pairs per token, rows sn floats apart and
// windows sb apart. The first P interleaved pairs (x[2p], x[2p+1]) of a head are multiplied by
// them as complex numbers, (a + ib)(c + id) = (ac - bd) + i(ad + bc) (conj: (ac + bd) + i(bc - ad));
// the other dims pass through, as modeling_poyo.apply_rotary does.
struct Phase {
  const float* p = nullptr;
  int64_t sb = 0, sn = 0, P = 0;
  const float* row(int64_t b, int64_t n) const { return p + b * sb + n * sn; }
};

// Complex products of interleaved pairs, 8 pairs per AVX-512 register where the CPU has it
// (the scalar loop did not vectorise: the rotations took a quarter of a latent layer's attention).
// conj = false: x * ph; conj = true: x * conj(ph). Same products as the scalar form, fused.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define POYO_HAVE_AVX512_PATH 1
template <bool conj>
__attribute__((target("avx512f"))) void complex_mul_avx512(const float* x, const float* ph, float* out, int64_t P) {
  int64_t i = 0;
  for (; i < 2 * P; i += 16) {
    const __mmask16 m = 2 * P - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (2 * P - i)) - 1);
    const __m512 a = _mm512_maskz_loadu_ps(m, x + i);
    const __m512 b = _mm512_maskz_loadu_ps(m, ph + i);
    const __m512 c = _mm512_moveldup_ps(b);           // (c, c)
    const __m512 d = _mm512_movehdup_ps(b);           // (d, d)
    const __m512 sw = _mm512_permute_ps(a, 0xB1);     // (b, a): the pair swapped
    // x * ph: (ac - bd, bc + ad) = fmaddsub(a, c, sw * d); x * conj(ph): (ac + bd, bc - ad) = fmsubadd
    const __m512 r = conj ? _mm512_fmsubadd_ps(a, c, _mm512_mul_ps(sw, d)) : _mm512_fmaddsub_ps(a, c, _mm512_mul_ps(sw, d));
    _mm512_mask_storeu_ps(out + i, m, r);
  }
}
#else
#define POYO_HAVE_AVX512_PATH 0
#endif

static const bool kAvx512 = [] {
#if POYO_HAVE_AVX512_PATH
  __builtin_cpu_init();  // static initialisers may run before libgcc's own
  return (bool)__builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}();

template <bool conj>
inline void complex_mul(const float* x, const float* ph, float* out, int64_t P) {
#if POYO_HAVE_AVX512_PATH
  if (kAvx512) return complex_mul_avx512<conj>(x, ph, out, P);
#endif
  for (int64_t i = 0; i < P; ++i) {
    const float a = x[2 * i], b = x[2 * i + 1], c = ph[2 * i], d = ph[2 * i + 1];
    out[2 * i] = conj ? a * c + b * d : a * c - b * d;
    out[2 * i + 1] = conj ? b * c - a * d : a * d + b * c;
  }
}

inline void rotate_row(const float* src, float* dst, const float* ph, int64_t P, int DH) {
  complex_mul<false>(src, ph, dst, P);
  if (dst != src) std::memcpy(dst + 2 * P, src + 2 * P, (DH - 2 * P) * sizeof(float));
}

inline void unrotate_row_(float* x, const float* ph, int64_t P) { complex_mul<true>(x, ph, x, P); }

// Key/value rows: row j of window b, head h is base + b * sb + h * sh + r * sr with r = index[b, j]
// when an index is given (K/V computed once per distinct token, gathered here), else r = j.
struct Rows {
  const float* p;
  int64_t sb, sh, sr;
  const int64_t* index;
  int64_t Nk;
  const float* row(int64_t b, int64_t h, int64_t j) const {
    const int64_t r = index ? index[b * Nk + j] : j;
    return p + (index ? 0 : b * sb) + h * sh + r * sr;
  }
};

template <int DH, int PR>
void attention_impl(const torch::Tensor& q, const Rows& K, const Rows& V, int64_t Nk, const float* bias, float scale,
                    const Phase& qph, const Phase& kph, bool rotate_value, torch::Tensor& out, float* lse) {
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2);
  const int64_t Nkp = (Nk + kNC - 1) / kNC * kNC;
  const int64_t ld = Nkp + 16;  // scratch row stride, off multiples of 4 KiB
  const int64_t nkb = Nkp / kNC, nqb = (Nq + kQB - 1) / kQB;
  // K^T per (window, head), zero-padded to whole tiles, keys rotated on the way; V gathered and
  // rotated into a contiguous copy only where it needs either.
  const bool v_copy = (rotate_value && kph.p) || V.index;

  // Key blocks [j0, j0 + kNC) of (window, head) bh into kth (DH x ld) and, with v_copy, vch (Nk x DH).
  auto keys = [&](int64_t bh, int64_t kb0, int64_t kb1, float* kth, float* vch) {
    const int64_t b = bh / H, h = bh % H;
    float tmp[DH];
    for (int64_t kb = kb0; kb < kb1; ++kb) {
      const int64_t j0 = kb * kNC;
      float* dst = kth + j0;
      for (int c = 0; c < kNC; ++c) {
        const int64_t j = j0 + c;
        if (j < Nk) {
          const float* src = K.row(b, h, j);
          if (kph.p) {
            rotate_row(src, tmp, kph.row(b, j), kph.P, DH);
            src = tmp;
          }
          for (int d = 0; d < DH; ++d) dst[d * ld + c] = src[d];
          if (v_copy) {
            float* vd = vch + j * DH;
            if (rotate_value && kph.p) rotate_row(V.row(b, h, j), vd, kph.row(b, j), kph.P, DH);
            else std::memcpy(vd, V.row(b, h, j), DH * sizeof(float));
          }
        } else {
          for (int d = 0; d < DH; ++d) dst[d * ld + c] = 0.f;
        }
      }
    }
  };

  float* op = out.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const int64_t qsb = q.stride(0), qsh = q.stride(1), qsr = q.stride(2);
  const int64_t osb = out.stride(0), osr = out.stride(1), osh = out.stride(2);  // out (B, Nq, H, DH)
  const int64_t rows_alloc = (kQB + kMR - 1) / kMR * kMR + PR;

  // Query block [i0, i0 + kQB) of (window, head) bh against kth / vch; S: rows_alloc x ld scratch.
  auto queries = [&](int64_t bh, int64_t i0, const float* kth, const float* vch, float* S) {
    const int64_t nr = std::min(kQB, Nq - i0), b = bh / H, h = bh % H;
    float qt[kMR * DH];
    float w[kQB + PR];
    float otmp[PR * DH];
    for (int64_t r0 = 0; r0 < nr; r0 += kMR) {
      for (int64_t r = 0; r < kMR; ++r) {
        const int64_t i = i0 + r0 + r;
        if (r0 + r >= nr) std::memset(qt + r * DH, 0, DH * sizeof(float));
        else if (qph.p) rotate_row(qp + b * qsb + h * qsh + i * qsr, qt + r * DH, qph.row(b, i), qph.P, DH);
        else std::memcpy(qt + r * DH, qp + b * qsb + h * qsh + i * qsr, DH * sizeof(float));
      }
      for (int64_t j0 = 0; j0 < Nkp; j0 += kNC) product_tile<DH>(qt, DH, kth + j0, ld, S + r0 * ld + j0, ld, scale, nullptr, kMR, kNC);
    }
    const float* brow = bias ? bias + b * Nk : nullptr;
    for (int64_t r = 0; r < nr; ++r) {
      float* sr = S + r * ld;
      const float m = masked_max(sr, brow, Nk);
      float* l = lse ? lse + bh * Nq + i0 + r : nullptr;
      if (m == -std::numeric_limits<float>::infinity()) {  // no key to attend: zeros, as SDPA
        std::memset(sr, 0, Nk * sizeof(float));
        w[r] = 0.f;
        if (l) *l = m;
      } else {
        const float sum = exp_sum(sr, Nk, m);
        w[r] = 1.f / sum;
        if (l) *l = m + std::log(sum);
      }
    }
    const float* vh = v_copy ? vch : V.row(b, h, 0);
    const int64_t vsr = v_copy ? DH : V.sr;
    float* oh = op + b * osb + h * osh;
    for (int64_t r0 = 0; r0 < nr; r0 += PR) {
      const int64_t rows = std::min<int64_t>(PR, nr - r0);
      if (rows == PR) {
        value_tile<DH, PR>(S + r0 * ld, ld, vh, vsr, Nk, oh + (i0 + r0) * osr, osr, w + r0);
      } else {  // the last rows of the block: S holds PR rows more than needed (not read back)
        value_tile<DH, PR>(S + r0 * ld, ld, vh, vsr, Nk, otmp, DH, w + r0);
        for (int64_t r = 0; r < rows; ++r) std::memcpy(oh + (i0 + r0 + r) * osr, otmp + r * DH, DH * sizeof(float));
      }
    }
    if (rotate_value && qph.p)  // values carried t_k: rotate the output back by -t_q
      for (int64_t r = 0; r < nr; ++r) unrotate_row_(oh + (i0 + r) * osr, qph.row(b, i0 + r), qph.P);
  };

  if (B * H >= 2 * at::get_num_threads()) {
    // Enough (window, head) pairs to keep every thread busy: one task per pair, its keys and all
    // its queries on one thread (one parallel region; the keys stay in that core's cache).
    at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
      std::unique_ptr<float[]> kth(new float[DH * ld]);
      std::unique_ptr<float[]> vch(v_copy ? new float[Nk * DH] : nullptr);
      std::unique_ptr<float[]> S(new float[rows_alloc * ld]);
      for (int64_t bh = t0; bh < t1; ++bh) {
        keys(bh, 0, nkb, kth.get(), vch.get());
        for (int64_t qb = 0; qb < nqb; ++qb) queries(bh, qb * kQB, kth.get(), vch.get(), S.get());
      }
    });
    return;
  }
  // Few pairs (a window's encoder: 2 heads over thousands of tokens): keys split over the threads
  // first, then the query blocks.
  auto kt = torch::empty({B * H, DH, ld}, q.options());
  auto vc = v_copy ? torch::empty({B * H, Nk, DH}, q.options()) : torch::empty({0}, q.options());
  float* ktp = kt.data_ptr<float>();
  float* vcp = v_copy ? vc.data_ptr<float>() : nullptr;
  at::parallel_for(0, B * H * nkb, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nkb, kb = t % nkb;
      keys(bh, kb, kb + 1, ktp + bh * DH * ld, v_copy ? vcp + bh * Nk * DH : nullptr);
    }
  });
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t t0, int64_t t1) {
    std::unique_ptr<float[]> S(new float[rows_alloc * ld]);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nqb;
      queries(bh, (t % nqb) * kQB, ktp + bh * DH * ld, v_copy ? vcp + bh * Nk * DH : nullptr, S.get());
    }
  });
}

// ---- Small linear layers (inference): out = x w^T + b for up to a few hundred rows ------------
// product_tile over a copy of w transposed once, (K, N) padded to whole kNC-column tiles (kept by
// the caller between calls).

// ---- Rotary phases: (cos, sin) of float32(t * omega) ---------------------------------------
// The angle is the float32 product, as torch computes it; cos and sin of it are evaluated in
// double (Cody-Waite reduction by pi/2 in two parts, exact for quotients below 2^20, then fdlibm's
// kernel polynomials) and rounded to float32: within one float32 ulp of the true values, where
// torch.polar's float32 evaluation is too. Vectorised, unlike torch.polar on the CPU (~2.5 ns
// per phase measured there).
POYO_CLONES void phase_rows(const float* t, const float* w, float* out, int64_t n0, int64_t n1, int64_t R) {
  constexpr int kChunk = 64;
  double cs[kChunk], sn[kChunk];
  for (int64_t n = n0; n < n1; ++n) {
    const float tn = t[n];
    for (int64_t r0 = 0; r0 < R; r0 += kChunk) {
      const int64_t m = std::min<int64_t>(kChunk, R - r0);
      int big = 0;
#pragma omp simd reduction(| : big)
      for (int64_t j = 0; j < m; ++j) {
        const double x = (double)(tn * w[r0 + j]);  // the float32 angle
        big |= !(std::fabs(x) < 1.6e6);  // beyond the reduction's exact range (or not finite)
        const double q = (x * 0.63661977236758134308 + 6755399441055744.0) - 6755399441055744.0;  // rint(x * 2/pi)
        const double r = (x - q * 1.57079632673412561417e+00) - q * 6.07710050650619224932e-11;
        const double z = r * r;
        const double s = r + r * z * (-1.66666666666666324348e-01 + z * (8.33333333332248946124e-03 +
                         z * (-1.98412698298579493134e-04 + z * (2.75573137070700676789e-06 +
                         z * (-2.50507602534068634195e-08 + z * 1.58969099521155010221e-10)))));
        const double c = 1.0 - 0.5 * z + z * z * (4.16666666666666019037e-02 + z * (-1.38888888888741095749e-03 +
                         z * (2.48015872894767294178e-05 + z * (-2.75573143513906633035e-07 +
                         z * (2.08757232129817482790e-09 + z * -1.13596475577881948265e-11)))));
        const int64_t k = (int64_t)q & 3;  // quadrant: x = q pi/2 + r
        const double sv = (k & 1) ? c : s, cv = (k & 1) ? s : c;
        sn[j] = (k & 2) ? -sv : sv;  // sin x: s, c, -s, -c
        cs[j] = ((k + 1) & 2) ? -cv : cv;  // cos x: c, -s, -c, s
      }
      if (big)  // rare: libm for the whole chunk
        for (int64_t j = 0; j < m; ++j) {
          const double x = (double)(tn * w[r0 + j]);
          cs[j] = std::cos(x);
          sn[j] = std::sin(x);
        }
      float* o = out + (n * R + r0) * 2;
      for (int64_t j = 0; j < m; ++j) {
        o[2 * j] = (float)cs[j];
        o[2 * j + 1] = (float)sn[j];
      }
    }
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

// times (N) float32 contiguous, omega (R) float32 -> (N, R, 2): (cos, sin) of float32(t * omega).
// Angles beyond the reduction's exact range (|t * omega| >= 1.6e6 rad) go through libm.
torch::Tensor rotary_phases(torch::Tensor times, torch::Tensor omega) {
  TORCH_CHECK(times.scalar_type() == torch::kFloat && times.is_contiguous() && omega.scalar_type() == torch::kFloat &&
              omega.is_contiguous() && omega.dim() == 1, "rotary_phases: contiguous float32 times and (R,) omega expected");
  const int64_t N = times.numel(), R = omega.numel();
  auto out = torch::empty({N, R, 2}, times.options());
  const float* tp = times.data_ptr<float>();
  const float* wp = omega.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / std::max<int64_t>(R, 1)), [&](int64_t n0, int64_t n1) {
    phase_rows(tp, wp, op, n0, n1, R);
  });
  return out;
}

// w (N, K) float -> (K, Np) with Np = N rounded up to 32, plus 16 (a row stride off multiples of
// 4 KiB), w^T in the first N columns and zeros after; bias (N) -> (Np) zero-padded (or empty).
std::vector<torch::Tensor> linear_pack(torch::Tensor w, torch::Tensor bias) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat, "linear_pack: float (N, K) weight expected");
  const int64_t N = w.size(0), K = w.size(1), Np = (N + kNC - 1) / kNC * kNC + 16;
  auto packed = torch::zeros({K, Np}, w.options());
  packed.narrow(1, 0, N).copy_(w.t());
  auto b = torch::zeros({bias.numel() ? Np : 0}, w.options());
  if (bias.numel()) b.narrow(0, 0, N).copy_(bias);
  return {packed, b};
}

// x (M, K) float, rows contiguous; packed and bias from linear_pack of an (N, K) weight.
torch::Tensor linear_forward(torch::Tensor x, torch::Tensor packed, torch::Tensor bias, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.stride(1) == 1 && x.stride(0) == x.size(1),
              "linear_forward: contiguous float (M, K) input expected");
  const int64_t M = x.size(0), K = x.size(1), ldw = packed.size(1);
  TORCH_CHECK(packed.size(0) == K && ldw >= (N + kNC - 1) / kNC * kNC, "linear_forward: packed weight does not fit");
  auto out = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t nrb = (M + kMR - 1) / kMR, ncb = (N + kNC - 1) / kNC;
  // Tasks row-block major, so a thread reuses its rows of x across the column tiles.
  at::parallel_for(0, nrb * ncb, 4, [&](int64_t t0, int64_t t1) {
    std::unique_ptr<float[]> xpad;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t rb = t / ncb, cb = t % ncb;
      const int rows = (int)std::min<int64_t>(kMR, M - rb * kMR);
      const int cols = (int)std::min<int64_t>(kNC, N - cb * kNC);
      const float* xr = xp + rb * kMR * K;
      if (rows < kMR) {  // the last rows: a zero-padded copy, so the tile reads kMR rows
        if (!xpad) xpad.reset(new float[kMR * K]);
        std::memset(xpad.get(), 0, sizeof(float) * kMR * K);
        std::memcpy(xpad.get(), xr, sizeof(float) * rows * K);
        xr = xpad.get();
      }
      product_tile<0>(xr, K, wp + cb * kNC, ldw, op + rb * kMR * N + cb * kNC, N, 1.f, bp ? bp + cb * kNC : nullptr,
                      rows, cols);
    }
  });
  return out;
}

// q (B, H, Nq, Dh); k and v (B, H, Nk, Dh), or with kv_index (B, Nk) int64 tables (1, H, M, Dh)
// whose row kv_index[b, j] is key j of window b; float32 CPU, unit stride on the last dim (any
// other strides). key_bias (B, Nk) float 0 / -inf; q_phase (B, Nq, P, 2) and k_phase (B, Nk, P, 2)
// float (cos, sin) rotary phases, rows contiguous (any window / token strides); rotate_value also
// rotates V by the key phase and the output back by the query phase. Empty tensors mean none.
// Returns out (B, Nq, H, Dh) and, when want_lse, lse (B, H, Nq) = log sum_j exp(score_j) (-inf: no key).
static Phase phase_of(const torch::Tensor& ph, int64_t B, int64_t N, int64_t Dh, const char* name) {
  Phase r;
  if (!ph.numel()) return r;
  TORCH_CHECK(ph.scalar_type() == torch::kFloat && ph.dim() == 4 && ph.size(0) == B && ph.size(1) == N &&
              ph.size(3) == 2 && 2 * ph.size(2) <= Dh && ph.stride(3) == 1 && ph.stride(2) == 2,
              "attention_forward: ", name, " must be float (B, N, P, 2) with 2P <= Dh and contiguous pairs");
  r.p = ph.data_ptr<float>();
  r.sb = ph.stride(0);
  r.sn = ph.stride(1);
  r.P = ph.size(2);
  return r;
}

std::vector<torch::Tensor> attention_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor key_bias,
                                             double scale, bool want_lse, torch::Tensor q_phase, torch::Tensor k_phase,
                                             bool rotate_value, torch::Tensor kv_index) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention_forward: 4-d q, k, v expected");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat && v.scalar_type() == torch::kFloat,
              "attention_forward: float32 expected");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attention_forward: unit last-dim stride expected");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Dh = q.size(3);
  const bool indexed = kv_index.dim() == 2;  // an empty 1-d tensor: no index
  const int64_t Nk = indexed ? kv_index.size(1) : k.size(2);
  TORCH_CHECK(k.size(1) == H && v.size(1) == H && v.size(2) == k.size(2) && k.size(3) == Dh && v.size(3) == Dh,
              "attention_forward: shapes differ");
  TORCH_CHECK(indexed ? (k.size(0) == 1 && v.size(0) == 1) : (k.size(0) == B && v.size(0) == B),
              "attention_forward: k and v need B windows, or one table with kv_index");
  const int64_t* index = nullptr;
  if (indexed) {
    TORCH_CHECK(kv_index.scalar_type() == torch::kLong && kv_index.is_contiguous() && kv_index.dim() == 2 &&
                kv_index.size(0) == B, "attention_forward: kv_index (B, Nk) int64 expected");
    index = kv_index.data_ptr<int64_t>();
    if (kv_index.numel()) {  // the one range check (rows are read unchecked below): ValueError in Python
      const auto mm = torch::aminmax(kv_index);
      const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
      TORCH_CHECK_VALUE(lo >= 0 && hi < k.size(2), "kv_index holds rows in [", lo, ", ", hi,
                        "] but the key/value tables have ", k.size(2), " rows.");
    }
  }
  const float* bias = nullptr;
  if (key_bias.numel()) {
    TORCH_CHECK(key_bias.scalar_type() == torch::kFloat && key_bias.is_contiguous() && key_bias.dim() == 2 &&
                key_bias.size(0) == B && key_bias.size(1) == Nk, "attention_forward: key_bias (B, Nk) float expected");
    bias = key_bias.data_ptr<float>();
  }
  const Phase qph = phase_of(q_phase, B, Nq, Dh, "q_phase");
  const Phase kph = phase_of(k_phase, B, Nk, Dh, "k_phase");
  TORCH_CHECK(!rotate_value || (qph.p && kph.p), "attention_forward: rotate_value needs q_phase and k_phase");
  auto out = torch::empty({B, Nq, H, Dh}, q.options());
  auto lse = want_lse ? torch::empty({B, H, Nq}, q.options()) : torch::empty({0}, q.options());
  float* lp = want_lse ? lse.data_ptr<float>() : nullptr;
  const float sc = (float)scale;
  if (B * H * Nq == 0) return {out, lse};
  if (Nk == 0) {
    out.zero_();
    if (want_lse) lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  const Rows K{k.data_ptr<float>(), k.stride(0), k.stride(1), k.stride(2), index, Nk};
  const Rows V{v.data_ptr<float>(), v.stride(0), v.stride(1), v.stride(2), index, Nk};
  switch (Dh) {
    case 8: attention_impl<8, 8>(q, K, V, Nk, bias, sc, qph, kph, rotate_value, out, lp); break;
    case 16: attention_impl<16, 8>(q, K, V, Nk, bias, sc, qph, kph, rotate_value, out, lp); break;
    case 32: attention_impl<32, 8>(q, K, V, Nk, bias, sc, qph, kph, rotate_value, out, lp); break;
    case 64: attention_impl<64, 6>(q, K, V, Nk, bias, sc, qph, kph, rotate_value, out, lp); break;
    case 128: attention_impl<128, 3>(q, K, V, Nk, bias, sc, qph, kph, rotate_value, out, lp); break;
    default: TORCH_CHECK(false, "attention_forward: head dim 8, 16, 32, 64 or 128 expected, got ", Dh);
  }
  return {out, lse};
}
"""

ATTENTION_HEAD_DIMS = (8, 16, 32, 64, 128)  # head dims attention_forward is built for


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
    from torch.utils.cpp_extension import load_inline
    from transformers.utils import logging

    logging.get_logger(__name__).info("poyo_hf: building the CPU kernels (once per machine, ~30-60 s)")
    # -fopenmp: at::parallel_for splits work over torch's threads only in code compiled with OpenMP
    # (ATen/ParallelOpenMP.h); without it every loop here ran on one thread. The extension then
    # uses the libgomp.so.1 torch has already loaded (same soname), so there is one thread pool,
    # sized by torch.set_num_threads. Where OpenMP cannot be built, the serial build is the fallback.
    flag_sets = [(["-fopenmp"], ["-fopenmp"]), ([], [])]
    errors = []
    for cflags, ldflags in flag_sets:
        try:
            return load_inline(
                name="poyo_hf_cpu_kernels" + ("_omp" if cflags else "_serial"),
                cpp_sources=_SOURCE,
                functions=["dropout_apply", "softmax_dropout_grad_", "attention_forward", "linear_pack", "linear_forward", "rotary_phases"],
                extra_cflags=["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", *cflags],
                extra_ldflags=ldflags,
                verbose=False,
            )
        except Exception as err:  # no compiler / headers / ninja / OpenMP: next flags, then plain torch ops
            errors.append(f"{type(err).__name__}: {err}")
    warnings.warn(
        f"poyo_hf: could not build the CPU kernels ({errors[-1]}); CPU training and inference use plain "
        "torch ops instead (same results in distribution, slower). Install a C++ compiler and ninja to "
        "enable them, or set POYO_HF_CPU_KERNELS=0 to silence this.",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A 64-bit seed (as a signed int) from torch's CPU generator, so ``torch.manual_seed`` applies."""
    return int(torch.empty((), dtype=torch.int64).random_(-(2**63), None, generator=generator))


# ----------------------------------------------------------------------------------------
# Attention forward for inference
# ----------------------------------------------------------------------------------------
# Why by hand: on the CPU, torch's float32 attention products (``bmm``, and SDPA's flash kernel,
# whose blocks call the same BLAS) run on MKL, which on the AMD EPYC machine measured runs at
# about half the speed oneDNN reaches (2 threads: 1024^3 matmul 192 vs 433 GFLOP/s), and oneDNN
# has no batched-matmul or attention entry point in torch for float32. ``attention_forward``
# (C++ above) computes the scores, the softmax and the weighted values per block of 32 query rows
# with register-tiled loops the compiler vectorises; at POYO's shapes, 2 threads (median of 200):
# latent self-attention 8 heads x 128 x 128: 104-124 us vs bmm + softmax 226 us, SDPA 273;
# encoder 2 heads x 128 latents x 2300 tokens: 434-447 us vs SDPA 987; x 6300 tokens: 1.35-1.45
# vs 2.7 ms. Forward only (no autograd): callers use it where no gradient is taken.


def attention_available(x: torch.Tensor, head_dim: int) -> bool:
    """Whether the fused attention can take a layer's work on tensors like ``x``: float32 CPU, a
    head dim it is built for (``ATTENTION_HEAD_DIMS``), not while ``torch.compile`` traces, the
    kernels built. :func:`attention_supported` checks given operands on top of this."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and head_dim in ATTENTION_HEAD_DIMS
        and not torch.compiler.is_compiling()
        and kernels() is not None
    )


def attention_supported(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    kv_index: torch.Tensor | None = None,
) -> bool:
    """Whether :func:`attention` takes these operands: float32 CPU tensors that take no gradient
    here, q (B, H, Nq, Dh) and k, v (B, H, Nk, Dh) - or, with ``kv_index`` (B, Nk) int64, tables
    (1, H, M, Dh) - with Dh in ``ATTENTION_HEAD_DIMS`` and unit stride on the last dim;
    ``key_mask`` None or bool (B, Nk) / (B, 1, 1, Nk); not while ``torch.compile`` traces; the
    kernels built."""
    if not (query.dim() == key.dim() == value.dim() == 4):
        return False
    B, H, _, Dh = query.shape
    if kv_index is None:
        n_keys, kv_batch = key.shape[2], B
    elif kv_index.dim() == 2 and kv_index.shape[0] == B and kv_index.dtype == torch.long and kv_index.device.type == "cpu":
        n_keys, kv_batch = kv_index.shape[1], 1
    else:
        return False
    tensors = (query, key, value)
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1 for t in tensors)
        and key.shape[:2] == value.shape[:2] == (kv_batch, H)
        and key.shape[2] == value.shape[2]
        and key.shape[3] == value.shape[3] == Dh
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and (key_mask is None or (key_mask.dtype == torch.bool and key_mask.numel() == B * n_keys
                                  and key_mask.shape[0] == B and key_mask.shape[-1] == n_keys))
        and attention_available(query, Dh)
    )


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    query_phase: torch.Tensor | None = None,
    key_phase: torch.Tensor | None = None,
    rotate_value: bool = False,
    kv_index: torch.Tensor | None = None,
):
    """``softmax(q k^T * scale) v`` over the keys ``key_mask`` keeps (True = attend), for inference
    on the CPU (operands as :func:`attention_supported` requires; ``scale`` defaults to Dh**-0.5).

    POYO's rotary attention in the same pass, optionally: ``query_phase`` (B, Nq, P) and
    ``key_phase`` (B, Nk, P) complex64 unit phases (:class:`~poyo_hf.models.poyo.modeling_poyo.PoyoRotaryTimeEmbedding`,
    2P <= Dh) rotate the first P pairs of every query and key head as ``apply_rotary`` does;
    ``rotate_value`` also rotates the values by the key phase and the output back by the query
    phase. With ``kv_index`` (B, Nk) int64, ``key`` and ``value`` are tables (1, H, M, Dh) and key
    j of window b is row ``kv_index[b, j]`` (POYO's encoder projects each distinct token once).

    Returns the output as (B, Nq, H, Dh), the transformers attention layout, and with
    ``return_lse`` also ``lse`` (B, H, Nq) = log(sum_j exp(score_j)) over the kept keys, for merging
    attentions over disjoint key sets (as flash attention does). A query row with no kept key
    gives zeros (as SDPA does on torch 2.13) and lse -inf. Equal to rotating with ``apply_rotary``
    and calling ``F.scaled_dot_product_attention`` to float32 rounding (summation order; ``exp``
    within ~2 ulp).
    """
    if not attention_supported(query, key, value, key_mask, kv_index):
        raise ValueError(
            f"attention() takes float32 CPU q (B, H, Nq, Dh) and k, v (B, H, Nk, Dh) (or (1, H, M, Dh) tables "
            f"with an int64 (B, Nk) kv_index) with Dh in {ATTENTION_HEAD_DIMS}, no gradient and a bool (B, Nk) "
            f"key_mask, with the CPU kernels built; got q {tuple(query.shape)} {query.dtype}, k {tuple(key.shape)}, "
            f"v {tuple(value.shape)}. Check attention_supported() first and use F.scaled_dot_product_attention otherwise."
        )
    B, _, Nq, Dh = query.shape
    Nk = key.shape[2] if kv_index is None else kv_index.shape[1]
    for name, phase, n in (("query_phase", query_phase, Nq), ("key_phase", key_phase, Nk)):
        if phase is not None and (
            phase.dtype != torch.complex64 or phase.dim() != 3 or phase.shape[:2] != (B, n) or 2 * phase.shape[2] > Dh
        ):
            raise ValueError(
                f"{name} must be complex64 (B, N, P) = ({B}, {n}, P) with 2P <= {Dh}, got "
                f"{tuple(phase.shape)} {phase.dtype}; make it with PoyoRotaryTimeEmbedding."
            )
    if rotate_value and (query_phase is None or key_phase is None):
        raise ValueError("rotate_value=True needs both query_phase and key_phase.")
    return _attention(query, key, value, key_mask, scale, return_lse, query_phase, key_phase, rotate_value, kv_index)


_NONE = torch.empty(0)
_NO_INDEX = torch.empty(0, dtype=torch.long)


def _phase_pairs(phase: torch.Tensor | None) -> torch.Tensor:
    """complex (B, N, P) -> float (B, N, P, 2) (cos, sin), the pairs contiguous; none -> empty."""
    if phase is None:
        return _NONE
    if phase.stride(-1) != 1:
        phase = phase.contiguous()
    return torch.view_as_real(phase)


def _attention(
    query, key, value, key_mask=None, scale=None, return_lse=False, query_phase=None, key_phase=None,
    rotate_value=False, kv_index=None,
):
    """:func:`attention` without the operand checks, for callers that made them (or know their answer)."""
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    if key_mask is None:
        bias = _NONE
    else:  # additive key bias, 0 (attend) or -inf (skip), one row per window
        B = key_mask.shape[0]
        bias = torch.zeros(B, key_mask.numel() // B).masked_fill_(~key_mask.reshape(B, -1), float("-inf"))
    out, lse = kernels().attention_forward(
        query, key, value, bias, scale, return_lse, _phase_pairs(query_phase), _phase_pairs(key_phase),
        rotate_value, _NO_INDEX if kv_index is None else kv_index.contiguous(),
    )
    return (out, lse) if return_lse else out


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
#   ~5% less time and a streaming step 7-13% less at p50 (interleaved A/B). Products of up to
#   ``SMALL_LINEAR_MAX_ROWS`` rows now take :func:`small_linear` instead where the kernels are built.
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


# ----------------------------------------------------------------------------------------
# Rotary phases
# ----------------------------------------------------------------------------------------
# Why by hand: ``torch.polar`` runs ~2.5 ns per phase on this CPU (a batch-1 window's 2300 tokens
# x 16 pairs: 99-103 us; the C++ loop above: 19-21 us, 2 threads), ~3% of a batch-1 forward.


def rotary_phases(times: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """``exp(i * float32(times[..., None] * omega))`` as complex64 (..., R), the phases
    ``PoyoRotaryTimeEmbedding`` makes: through the compiled loop for float32 CPU tensors taking no
    gradient (within one float32 ulp of the true cosines and sines, as ``torch.polar`` is), else
    ``torch.polar``."""
    t = times.float()
    if (
        t.device.type == "cpu"
        and omega.device.type == "cpu"
        and omega.dtype == torch.float32
        and not (torch.is_grad_enabled() and (t.requires_grad or omega.requires_grad))
        and not torch.compiler.is_compiling()
        and kernels() is not None
    ):
        pairs = kernels().rotary_phases(t.reshape(-1).contiguous(), omega.contiguous())  # (N, R, 2)
        return torch.view_as_complex(pairs).view(*t.shape, omega.shape[0])
    angles = t[..., None] * omega  # (..., R)
    return torch.polar(torch.ones_like(angles), angles)


# ----------------------------------------------------------------------------------------
# Small linear layers for inference
# ----------------------------------------------------------------------------------------
# Why by hand: at inference on up to a few hundred rows (a batch-1 POYO forward: 128 latent rows,
# ~100 output rows, ~300 distinct tokens) both torch backends are far from the cores' speed:
# MKL's sgemm on the AMD EPYC machine measured runs its AVX2 code at half the AVX-512 rate, and a
# oneDNN call costs ~20-40 us beyond its arithmetic. ``linear_forward`` (C++ above: 8 x 32
# register tiles over a weight copy transposed and padded once, ``linear_pack``) measured, 2 threads,
# median of 400 calls: 128 x 64 -> 1536 69 vs 83 us (oneDNN packed), 128 x 512 -> 64 21 vs 56,
# 128 x 64 -> 512 25 vs 56, 128 x 256 -> 64 12 vs 35 (MKL), 300 x 64 -> 256 29 vs 66; even at
# 512 rows, oneDNN ahead from ~2048 (hence ``SMALL_LINEAR_MAX_ROWS``). Results equal F.linear's
# to float32 rounding (summation order).

SMALL_LINEAR_MAX_ROWS = 512


def use_small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``x @ weight^T + bias`` goes through :func:`small_linear` here: float32 CPU operands
    taking no gradient, at most ``SMALL_LINEAR_MAX_ROWS`` rows, not under autocast or while
    ``torch.compile`` traces, the CPU kernels built (``POYO_HF_CPU_KERNELS`` not 0)."""
    # Cheapest checks first: this runs on every projection of a batch-1 forward (~35 calls).
    return (
        x.dtype is torch.float32
        and weight.dtype is torch.float32
        and (bias is None or bias.dtype is torch.float32)
        and x.numel() <= SMALL_LINEAR_MAX_ROWS * x.shape[-1]
        and x.device.type == "cpu"
        and not _tracks_grad(x, weight, bias)
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled("cpu")
        and kernels() is not None
    )


def pack_small(weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A copy of ``weight`` (N, K) and ``bias`` laid out for :func:`small_linear` (for inference: it
    does not follow later changes of either)."""
    packed, b = kernels().linear_pack(weight.detach().float().contiguous(), _NONE if bias is None else bias.detach().float())
    return packed, b, weight.shape[0]


def small_linear(x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor, int]) -> torch.Tensor:
    """``x @ weight^T + bias`` with ``packed = pack_small(weight, bias)``, for float32 CPU ``x``
    (..., K) of at most a few hundred rows."""
    if x.dim() == 2 and x.is_contiguous():
        return kernels().linear_forward(x, *packed)
    out = kernels().linear_forward(x.reshape(-1, x.shape[-1]).contiguous(), *packed)
    return out.view(*x.shape[:-1], packed[2])


# Each PoyoLinear's packed weights, beside the module rather than on it, so that deepcopy, pickling,
# state dicts and ``.to()`` never see them: module -> {kind: (weakrefs to the weight and bias they
# were packed from, (data_ptr, version, shape) of each then, packed)}, kind "onednn" or "small".
# A new Parameter object, new storage or an in-place change (optimizer step, load_state_dict) each
# make the next call pack again.
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state(t: torch.Tensor | None):
    return None if t is None else (t.data_ptr(), t._version, tuple(t.shape))


class PoyoLinear(nn.Linear):
    """``nn.Linear`` (same parameters, init and state-dict keys) whose products go, on the CPU in
    float32, through :func:`small_linear` at inference on few rows (:func:`use_small_linear`), and
    otherwise through oneDNN where :func:`use_onednn` says so: :func:`linear` when gradients flow, a
    packed copy of the weight at inference. Packed copies are made on first use and remade
    whenever the weight (or bias) is replaced or its data or version changes, as an optimizer step
    or ``load_state_dict`` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if use_small_linear(x, weight, bias):
            return small_linear(x, self._packed("small", x))
        if not use_onednn(x, weight, bias):  # decided once per call: linear() would ask again
            return F.linear(x, weight, bias)
        if _tracks_grad(x, weight, bias):
            return _onednn_linear(x, weight, bias, track=True)
        return packed_linear(x, self._packed("onednn", x), bias)

    def _packed(self, kind: str, x: torch.Tensor):
        weight, bias = self.weight, self.bias
        entries = _PACKED.get(self)
        if entries is None:
            entries = _PACKED[self] = {}
        cached = entries.get(kind)
        key = (_state(weight), _state(bias))
        if cached is None or cached[0]() is not weight or cached[1]() is not bias or cached[2] != key:
            if kind == "small":
                packed = pack_small(weight, bias)
            else:
                packed = pack_weight(weight, x.numel() // x.shape[-1])
            cached = (weakref.ref(weight), (lambda: None) if bias is None else weakref.ref(bias), key, packed)
            entries[kind] = cached
        return cached[3]


__all__ = [
    "kernels", "attention", "attention_available", "attention_supported", "ATTENTION_HEAD_DIMS", "draw_seed", "linear", "PoyoLinear", "onednn_linear_enabled", "use_onednn", "pack_weight",
    "packed_linear", "ONEDNN_MIN_MACS", "use_small_linear", "pack_small", "small_linear", "SMALL_LINEAR_MAX_ROWS", "rotary_phases",
]
