"""The small-product linear kernel for inference (cpu_kernels.small_linear, PoyoLinear on few rows):
equal to a float64 product, taken only where it applies, the same for any thread count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from poyo_hf.models.poyo import cpu_kernels
from poyo_hf.models.poyo.cpu_kernels import (
    SMALL_LINEAR_MAX_ROWS,
    PoyoLinear,
    pack_small,
    small_linear,
    use_small_linear,
)

pytestmark = pytest.mark.usefixtures("cpu_kernels_built")


@pytest.mark.parametrize(
    "rows, in_features, out_features, bias",
    [
        (128, 64, 1536, False),  # POYO's latent QKV projection
        (128, 512, 64, True),  # out-projection
        (37, 33, 70, True),  # rows, inputs and outputs off every tile size
        (1, 64, 2, True),  # a one-row readout
        (SMALL_LINEAR_MAX_ROWS, 5, 31, False),
    ],
)
def test_equals_float64_product(rows, in_features, out_features, bias):
    g = torch.Generator().manual_seed(rows)
    layer = PoyoLinear(in_features, out_features, bias=bias)
    x = torch.randn(rows, in_features, generator=g)
    with torch.no_grad():
        assert use_small_linear(x, layer.weight, layer.bias)
        out = layer(x)
        ref = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    assert out.shape == (rows, out_features) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6 * in_features**0.5)


def test_leading_dims_and_strided_input():
    layer = PoyoLinear(64, 96)
    x = torch.randn(2, 64, 50).transpose(1, 2)  # (2, 50, 64), rows not contiguous
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (2, 50, 96)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_same_result_for_any_thread_count():
    layer = PoyoLinear(256, 64)
    x = torch.randn(300, 256)
    packed = pack_small(layer.weight, layer.bias)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = small_linear(x, packed)
        torch.set_num_threads(2)
        two = small_linear(x, packed)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("case", ["gradient", "too many rows", "float64", "bfloat16 autocast", "kernels off"])
def test_other_cases_do_not_take_it(case, monkeypatch):
    rows = SMALL_LINEAR_MAX_ROWS + 1 if case == "too many rows" else 16
    dtype = torch.float64 if case == "float64" else torch.float32
    layer = PoyoLinear(64, 64).to(dtype)
    x = torch.randn(rows, 64, dtype=dtype)
    if case == "kernels off":
        monkeypatch.setenv("POYO_HF_CPU_KERNELS", "0")
    calls = []
    monkeypatch.setattr(cpu_kernels, "small_linear", lambda *a: calls.append(1))
    with torch.set_grad_enabled(case == "gradient"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bfloat16 autocast"):
        assert not use_small_linear(x, layer.weight, layer.bias)
        out = layer(x)
    assert out is not None and not calls
