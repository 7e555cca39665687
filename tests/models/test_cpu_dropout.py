"""CPU training dropout (modeling_poyo's seeded dropout and dropout attention, cpu_kernels.py).

Every check runs on both mask sources: the compiled kernel and the plain-torch fallback
(``POYO_HF_CPU_KERNELS=0``). The compiled one must build wherever a C++ compiler is present.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from make_fixtures import ragged_batch, tiny_config

from poyo_hf import PoyoForDecoding
from poyo_hf.models.poyo import cpu_kernels
from poyo_hf.models.poyo import modeling_poyo as mp


@pytest.fixture(params=["kernel", "torch"])
def mask_source(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv("POYO_HF_CPU_KERNELS", "0")
        assert cpu_kernels.kernels() is None
    else:
        monkeypatch.delenv("POYO_HF_CPU_KERNELS", raising=False)
        if shutil.which("c++") is None and shutil.which("g++") is None:
            pytest.skip("no C++ compiler on this machine: only the torch fallback can run")
        assert cpu_kernels.kernels() is not None, "the CPU dropout kernels failed to build"
    return request.param


def _keep(shape, p, seed):
    """The 0/1 mask seeded_dropout applies for ``seed`` (as floats)."""
    return (mp.seeded_dropout(torch.ones(shape), p, seed) != 0).float()


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_keep_rate_and_unbiased_scale(mask_source, p):
    n = 400_000
    out = mp.seeded_dropout(torch.ones(n), p, seed=1234)
    keep = (out != 0).float()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
    kept_values = out[out != 0]
    drop = round(p * 65536)
    assert torch.allclose(kept_values, torch.full_like(kept_values, 65536 / (65536 - drop)))
    # E[dropout(x)] = x: mean of x * keep * scale over many elements
    assert abs(out.mean().item() - 1.0) < 5 * sigma / (1 - p)


def test_neighbouring_elements_are_independent(mask_source):
    """Elements share 64-bit hash words four at a time: lanes and word boundaries must not correlate."""
    p, n = 0.2, 400_000
    keep = _keep((n,), p, seed=99)
    for lag in (1, 2, 3, 4, 5):
        both = (keep[:-lag] * keep[lag:]).mean().item()
        sigma = math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / n)
        assert abs(both - (1 - p) ** 2) < 6 * sigma, lag


def test_masks_follow_the_seed_and_torch_manual_seed(mask_source):
    a = _keep((1000,), 0.3, 7)
    assert torch.equal(a, _keep((1000,), 0.3, 7))
    assert not torch.equal(a, _keep((1000,), 0.3, 8))
    torch.manual_seed(3)
    s1 = cpu_kernels.draw_seed()
    torch.manual_seed(3)
    assert cpu_kernels.draw_seed() == s1


def test_masks_do_not_depend_on_the_thread_count(mask_source):
    x = torch.randn(300_001)  # not a multiple of the 4 elements per hash word
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mp.seeded_dropout(x, 0.2, 11)
        torch.set_num_threads(2)
        two = mp.seeded_dropout(x, 0.2, 11)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_dropout_probability_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\).*1.0"):
        mp.seeded_dropout(torch.ones(3), 1.0, 0)


def test_poyo_dropout_backward_applies_the_forward_mask(mask_source):
    d = mp.PoyoDropout(0.4).train()
    x = torch.ones(50_000, requires_grad=True)
    y = d(x)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, y)  # d(x * keep * s)/dx = keep * s = y at x = 1
    assert 0.38 < (y == 0).float().mean().item() < 0.42
    d.eval()
    assert d(x) is x


def test_poyo_dropout_is_nn_dropout_off_the_cpu_float32_path():
    d = mp.PoyoDropout(0.5).train()
    x = torch.ones(1000, dtype=torch.float64)
    torch.manual_seed(0)
    y = d(x)
    torch.manual_seed(0)
    assert torch.equal(y, torch.nn.functional.dropout(x, 0.5, True))


@pytest.mark.parametrize("with_mask", [True, False])
def test_dropout_attention_equals_explicit_softmax_times_mask(mask_source, with_mask):
    torch.manual_seed(0)
    B, H, Nq, Nk, Dh, p, scale = 2, 3, 5, 11, 8, 0.25, 0.3
    q, k, v = (torch.randn(B, H, n, Dh, requires_grad=True) for n in (Nq, Nk, Nk))
    mask = None
    if with_mask:
        mask = torch.rand(B, 1, 1, Nk) > 0.4
        mask[..., 0] = True
    g = torch.randn(B, Nq, H, Dh)

    torch.manual_seed(5)
    out = mp.cpu_dropout_attention(q, k, v, mask, scale, p)
    out.backward(g)
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None

    torch.manual_seed(5)
    seed = cpu_kernels.draw_seed()  # the draw the attention made
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    drop = round(p * 65536)
    weights = torch.softmax(scores, -1) * _keep(scores.shape, p, seed) * (65536 / (65536 - drop))
    ref = (weights @ v).transpose(1, 2)  # (B, Nq, H, Dh)
    ref.backward(g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-6)
    if mask is not None:  # keys under a false mask get no gradient
        assert torch.all(grads[1].transpose(1, 2)[~mask[:, 0, 0]] == 0)


def test_model_training_path_equals_eager_when_masks_keep_everything(mask_source, monkeypatch):
    """The whole model's CPU training path (layouts, key mask, value rotation) against the eager
    reference: with every mask kept and scale 1, both compute the same function and gradients."""
    config = tiny_config(
        unit_vocab_size=13, session_vocab_size=3, attention_dropout=0.1, ffn_dropout=0.0, lin_dropout=0.0
    )
    torch.manual_seed(0)
    model = PoyoForDecoding(config).train()
    batch = ragged_batch(config)  # different lengths: padded keys under the mask
    used = []

    def keep_all(x, p, seed):
        used.append(x.shape)
        return x.clone()

    monkeypatch.setattr(mp, "seeded_dropout", keep_all)
    model.config._attn_implementation = "sdpa"
    loss = model(**batch).loss
    loss.backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(used) == 2 + config.num_hidden_layers  # encoder, processor layers, decoder
    model.zero_grad(set_to_none=True)
    for m in model.modules():
        if isinstance(m, mp.PoyoRotaryAttention):
            m.dropout = 0.0
    model.config._attn_implementation = "eager"
    ref = model(**batch).loss
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(fast[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_windows_without_any_key_fall_back_to_sdpa():
    attn = mp.PoyoRotaryAttention(16, 2, 8, dropout=0.2).train()
    q = torch.zeros(2, 2, 3, 8)
    assert attn._cpu_dropout_path(q, torch.ones(2, 1, 1, 4, dtype=torch.bool), "sdpa")
    no_keys = torch.ones(2, 1, 1, 4, dtype=torch.bool)
    no_keys[1] = False
    assert not attn._cpu_dropout_path(q, no_keys, "sdpa")
    assert not attn._cpu_dropout_path(q, None, "eager")
    assert not attn.eval()._cpu_dropout_path(q, None, "sdpa")


def test_build_failure_warns_and_falls_back(monkeypatch, request):
    import torch.utils.cpp_extension as ext

    def broken(*args, **kwargs):
        raise OSError("no compiler here")

    monkeypatch.delenv("POYO_HF_CPU_KERNELS", raising=False)
    cpu_kernels._build.cache_clear()
    request.addfinalizer(cpu_kernels._build.cache_clear)  # later tests build (load) it again
    monkeypatch.setattr(ext, "load_inline", broken)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert cpu_kernels.kernels() is None
    out = mp.seeded_dropout(torch.ones(1000), 0.5, 3)  # still works, through torch
    assert 0.3 < (out == 0).float().mean().item() < 0.7


def test_ndt_training_path_equals_eager_when_masks_keep_everything(mask_source, monkeypatch):
    """NDT trains through the same CPU kernels (PoyoDropout, cpu_dropout_attention with NDT's
    (B, 1, T, T) band-and-padding mask): with every mask kept, its training loss and gradients equal
    the eager reference's with dropout off."""
    from make_ndt_fixture import tiny_ndt_config

    from poyo_hf.models.ndt import NdtForMaskedModeling, NdtProcessor
    from poyo_hf.models.ndt.modeling_ndt import NdtAttention

    config = tiny_ndt_config(attention_dropout=0.3, hidden_dropout=0.2, embedding_dropout=0.1, readout_dropout=0.1)
    torch.manual_seed(0)
    model = NdtForMaskedModeling(config).train()
    proc = NdtProcessor.from_config(config, [f"u{i}" for i in range(5)], [f"h{i}" for i in range(3)])
    rng = np.random.default_rng(0)
    trials = [
        {"spikes": rng.poisson(1.0, (t, 5)), "heldout_spikes": rng.poisson(1.0, (t, 3)),
         "forward_spikes": rng.poisson(1.0, (4, 8))}
        for t in (12, 7, 10)  # different lengths: padding bins under the mask, besides the band
    ]
    batch = dict(proc(trials))
    bins = torch.zeros(batch["attention_mask"].shape, dtype=torch.bool)
    bins[:, [1, 4, 6]] = True
    used = []

    def keep_all(x, p, seed):
        used.append(p)
        return x.clone()

    def loss_and_grads(impl):
        model.zero_grad(set_to_none=True)
        model.config._attn_implementation = impl
        loss = model(**batch, mask=bins, generator=torch.Generator().manual_seed(1)).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    monkeypatch.setattr(mp, "seeded_dropout", keep_all)
    loss, grads = loss_and_grads("sdpa")
    L = config.num_hidden_layers
    # Forward: embedding, per layer the attention weights + the FFN's inner and the layer's two residual
    # dropouts, readout. Backward regenerates each PoyoDropout mask once more (attention keeps A).
    forward = [0.1] + [0.3, 0.2, 0.2, 0.2] * L + [0.1]
    assert sorted(used) == sorted(forward + [0.1] + [0.2, 0.2, 0.2] * L + [0.1])
    model.eval()  # nn.Dropout off; eager attention with dropout 0
    assert not any(isinstance(m, NdtAttention) and m.training for m in model.modules())
    loss_ref, grads_ref = loss_and_grads("eager")
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-4, atol=1e-6, msg=n)
