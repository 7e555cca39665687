"""`poyo-hf bench model`'s floor row: the matrix products it times are exactly the forward's."""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from poyo_hf.bench.model import _ours, benchmark_batch, matmul_floor
from poyo_hf.models.poyo.cpu_kernels import onednn_linear_enabled


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode counts the CUDA SDPA kernels but not the CPU one; the same formula.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _onednn_linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    # The projections that go through oneDNN (cpu_kernels.use_onednn): x (M, K) @ w (N, K)^T.
    return 2 * math.prod(x_shape) * w_shape[0]


def _flops(fn) -> dict[str, int]:
    mapping = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
        torch.ops.mkldnn._linear_pointwise: _onednn_linear_flops,
    }
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def test_floor_runs_the_same_matrix_products_and_attention_as_a_batch1_forward():
    # 96 outputs and a window whose tokens fill the padding exactly: no padded work in the forward.
    windows = benchmark_batch(n_windows=1, n_outputs=96)
    model, proc = _ours("poyo-mp", windows)
    model.eval()
    one = {k: v for k, v in proc(windows).items() if k not in ("labels", "output_weights")}
    assert bool(one["input_mask"].all()) and bool(one["output_mask"].all())
    n_tokens = one["input_mask"].shape[1]
    forward = _flops(lambda: model(**one))
    floor = _flops(matmul_floor(model.config, one))
    assert forward == floor
    products = {"aten.mm", "aten.addmm", "aten._scaled_dot_product_flash_attention_for_cpu"}
    if onednn_linear_enabled():  # the larger projections (QKV, FFN, ...) go through oneDNN instead
        products |= {"mkldnn._linear_pointwise"}
    assert set(floor) == products
    # The SDPA count: encoder (latents x tokens), layers (latents x latents), decoder (outputs x latents).
    c = model.config
    expected_sdpa = 4 * c.head_dim * (
        c.num_cross_attention_heads * c.num_latents * n_tokens
        + c.num_hidden_layers * c.num_self_attention_heads * c.num_latents**2
        + c.num_cross_attention_heads * 96 * c.num_latents
    )
    assert floor["aten._scaled_dot_product_flash_attention_for_cpu"] == expected_sdpa
