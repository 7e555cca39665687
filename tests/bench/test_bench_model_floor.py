"""`poyo-hf bench model`'s floor row: the matrix products it times are exactly the forward's."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from poyo_hf.bench.model import _ours, benchmark_batch, matmul_floor
from poyo_hf.models.poyo import cpu_kernels
from poyo_hf.models.poyo import modeling_poyo as mp
from poyo_hf.models.poyo.cpu_kernels import kernels, onednn_linear_enabled


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode counts the CUDA SDPA kernels but not the CPU one; the same formula.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _onednn_linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    # The projections that go through oneDNN (cpu_kernels.use_onednn): x (M, K) @ w (N, K)^T.
    return 2 * math.prod(x_shape) * w_shape[0]


def _flops(fn, monkeypatch) -> dict[str, int]:
    """FLOPs per kernel of ``fn()``; the fused CPU attention and the small-product linear kernel
    (compiled extension calls, which FlopCounterMode cannot see) are counted where they are called."""
    mapping = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
        torch.ops.mkldnn._linear_pointwise: _onednn_linear_flops,
    }
    fused = []
    real = mp.cpu_attention

    def counted(q, k, v, *args, **kwargs):
        B, H, Nq, Dh = q.shape
        index = args[6] if len(args) > 6 else kwargs.get("kv_index")  # keys gathered from a table
        fused.append(4 * B * H * Nq * (k.shape[2] if index is None else index.shape[1]) * Dh)
        return real(q, k, v, *args, **kwargs)

    small = []
    real_small = cpu_kernels.small_linear

    def counted_small(x, packed):
        small.append(2 * x.numel() * packed[2])  # rows x K x N multiply-adds
        return real_small(x, packed)

    monkeypatch.setattr(mp, "cpu_attention", counted)
    monkeypatch.setattr(cpu_kernels, "small_linear", counted_small)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    flops = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    if fused:
        flops["cpu_attention"] = sum(fused)
    if small:
        flops["small_linear"] = sum(small)
    return flops


@pytest.mark.parametrize("attention", ["fused", "sdpa"])
def test_floor_runs_the_same_matrix_products_and_attention_as_a_batch1_forward(monkeypatch, attention):
    """On both attention kernels: the fused CPU one (where it is built) and SDPA (``POYO_HF_CPU_KERNELS=0``)."""
    if attention == "sdpa":
        monkeypatch.setenv("POYO_HF_CPU_KERNELS", "0")
    elif kernels() is None:
        pytest.skip("the CPU kernels cannot be built here (no C++ compiler): the forward uses SDPA")
    # 96 outputs and a window whose tokens fill the padding exactly: no padded work in the forward.
    windows = benchmark_batch(n_windows=1, n_outputs=96)
    model, proc = _ours("poyo-mp", windows)
    model.eval()
    one = {k: v for k, v in proc(windows).items() if k not in ("labels", "output_weights")}
    assert bool(one["input_mask"].all()) and bool(one["output_mask"].all())
    n_tokens = one["input_mask"].shape[1]
    forward = _flops(lambda: model(**one), monkeypatch)
    floor = _flops(matmul_floor(model.config, one), monkeypatch)
    assert forward == floor
    if attention == "fused":  # every projection through the small-product kernel (batch 1: <= 512 rows)
        attention_kernel = "cpu_attention"
        products = {"small_linear", attention_kernel}
    else:
        attention_kernel = "aten._scaled_dot_product_flash_attention_for_cpu"
        products = {"aten.mm", "aten.addmm", attention_kernel}
        if onednn_linear_enabled():  # the larger projections (QKV, FFN, ...) go through oneDNN instead
            products |= {"mkldnn._linear_pointwise"}
    assert set(floor) == products
    # The attention count: encoder (latents x tokens), layers (latents x latents), decoder (outputs x latents).
    c = model.config
    expected_attention = 4 * c.head_dim * (
        c.num_cross_attention_heads * c.num_latents * n_tokens
        + c.num_hidden_layers * c.num_self_attention_heads * c.num_latents**2
        + c.num_cross_attention_heads * 96 * c.num_latents
    )
    assert floor[attention_kernel] == expected_attention
