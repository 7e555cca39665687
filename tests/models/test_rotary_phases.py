"""cpu_kernels.rotary_phases: the rotary embedding's unit phases exp(i * float32(t * omega)),
through the compiled loop where it applies and torch.polar elsewhere."""

from __future__ import annotations

import pytest
import torch

from poyo_hf.models.poyo import cpu_kernels
from poyo_hf.models.poyo.modeling_poyo import PoyoRotaryTimeEmbedding, rotary_frequencies

pytestmark = pytest.mark.usefixtures("cpu_kernels_built")


@pytest.mark.parametrize(
    "times",
    [
        torch.rand(3, 700),  # a window's relative times
        torch.linspace(-30.0, 30.0, 5001),  # negative and long: angles up to ~2e6 rad
        torch.tensor([0.0, 1e-7, 1e4, -1e5]),  # past the reduction's exact range: libm
    ],
)
def test_within_one_ulp_of_float64_and_of_polar(times):
    omega = rotary_frequencies(64, 1e-4, 2.0)
    phase = cpu_kernels.rotary_phases(times, omega)
    assert phase.dtype == torch.complex64 and phase.shape == (*times.shape, 16)
    angles = times[..., None] * omega  # float32, as the model computes them
    ref = torch.polar(torch.ones_like(angles.double()), angles.double())
    err = (phase.to(torch.complex128) - ref).abs().max().item()
    assert err < 1.2e-7  # one float32 ulp below 1 is 6e-8, on each of cos and sin
    polar = torch.polar(torch.ones_like(angles), angles)
    assert (phase - polar).abs().max().item() < 1.2e-7


def test_embedding_uses_it_and_falls_back_to_polar(monkeypatch):
    emb = PoyoRotaryTimeEmbedding(16, 1e-3, 1.0)
    t = torch.rand(2, 9)
    fast = emb(t)
    angles = t[..., None] * rotary_frequencies(16, 1e-3, 1.0)
    polar = torch.polar(torch.ones_like(angles), angles)
    assert (fast - polar).abs().max().item() < 1.2e-7
    t_grad = t.clone().requires_grad_()  # a gradient through the times: torch.polar, exactly
    assert torch.equal(emb(t_grad), polar)
    monkeypatch.setenv("POYO_HF_CPU_KERNELS", "0")
    assert torch.equal(emb(t), polar)
