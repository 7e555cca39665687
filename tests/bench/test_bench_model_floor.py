"""`poyo-hf bench model`'s floor row: the matrix products it times are exactly the forward's."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from poyo_hf.bench.model import _ours, benchmark_batch, matmul_floor


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode counts the CUDA SDPA kernels but not the CPU one; the same formula.
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _flops(fn) -> dict[str, int]:
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
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
    assert set(floor) == {"aten.mm", "aten.addmm", "aten._scaled_dot_product_flash_attention_for_cpu"}
    # The SDPA count: encoder (latents x tokens), layers (latents x latents), decoder (outputs x latents).
    c = model.config
    expected_sdpa = 4 * c.head_dim * (
        c.num_cross_attention_heads * c.num_latents * n_tokens
        + c.num_hidden_layers * c.num_self_attention_heads * c.num_latents**2
        + c.num_cross_attention_heads * 96 * c.num_latents
    )
    assert floor["aten._scaled_dot_product_flash_attention_for_cpu"] == expected_sdpa
