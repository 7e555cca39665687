"""The fused CPU attention kernel for inference (cpu_kernels.attention) and where it is used.

References: the softmax attention computed in float64 by plain torch ops, and SDPA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from make_fixtures import ragged_batch, tiny_config

from poyo_hf import PoyoForDecoding
from poyo_hf.models.poyo import cpu_kernels
from poyo_hf.models.poyo import modeling_poyo as mp

pytestmark = pytest.mark.usefixtures("cpu_kernels_built")


def _operands(B, H, Nq, Nk, Dh, seed=0, scale=1.0):
    """q (B, H, Nq, Dh), k, v (B, H, Nk, Dh) as transposed views of (B, N, H, Dh), as the model makes them."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (scale * torch.randn(B, n, H, Dh, generator=g) for n in (Nq, Nk, Nk))
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _reference(q, k, v, mask, scale):
    """(out (B, Nq, H, Dh), lse (B, H, Nq)) in float64; a row without keys: zeros, lse -inf."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ v.double()).transpose(1, 2), lse


@pytest.mark.parametrize(
    "B,H,Nq,Nk,Dh",
    [
        (1, 8, 128, 128, 64),  # POYO latent self-attention
        (1, 2, 128, 2300, 64),  # POYO encoder, one window
        (3, 2, 37, 101, 64),  # rows and keys off every tile size
        (2, 4, 5, 1, 32),  # a single key
        (2, 2, 19, 45, 8),  # the test configs' head dim
        (1, 3, 9, 40, 16),
        (2, 3, 70, 333, 128),
        (1, 1, 1, 7, 64),  # one query (a streaming decoder output)
    ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_equals_float64_softmax_attention(B, H, Nq, Nk, Dh, masked):
    q, k, v = _operands(B, H, Nq, Nk, Dh)
    mask = None
    if masked:
        mask = torch.rand(B, Nk, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[:, 0] = True
    scale = Dh**-0.5
    out, lse = cpu_kernels.attention(q, k, v, mask, return_lse=True)
    ref, ref_lse = _reference(q, k, v, mask, scale)
    assert out.shape == (B, Nq, H, Dh) and lse.shape == (B, H, Nq)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=5e-6)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=5e-6)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
    torch.testing.assert_close(out, sdpa.transpose(1, 2), rtol=0, atol=5e-6)


def test_peaked_softmax_and_a_window_without_keys():
    """Large scores (exp arguments down to the underflow range) stay exact; a window whose keys are
    all masked gives zeros and lse -inf, as SDPA gives zeros."""
    q, k, v = _operands(2, 2, 40, 90, 64, scale=4.0)  # scores of size ~16 * 8 after scaling
    mask = torch.ones(2, 90, dtype=torch.bool)
    mask[1] = False
    out, lse = cpu_kernels.attention(q, k, v, mask, scale=1.0, return_lse=True)
    ref, ref_lse = _reference(q, k, v, mask, 1.0)
    assert float((q[0] @ k[0].transpose(-1, -2)).abs().max()) > 100  # exp arguments below -87 occur
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=1.0).transpose(1, 2)
    # Scores of a few hundred carry float32 rounding of ~1e-5 (SDPA's too): against float64 the
    # kernel may err as much as SDPA does; against SDPA it agrees far closer.
    sdpa_err = float((sdpa[0].double() - ref[0]).abs().max())
    assert float((out[0].double() - ref[0]).abs().max()) <= 1.5 * sdpa_err + 1e-6
    torch.testing.assert_close(out[0], sdpa[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(lse[0].double(), ref_lse[0], rtol=1e-6, atol=1e-5)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.all(torch.isneginf(lse[1]))
    assert torch.equal(sdpa[1], torch.zeros_like(sdpa[1]))


def test_lse_merges_attentions_over_disjoint_keys():
    """Two halves of the keys, merged through their lse as flash attention does, equal the whole."""
    q, k, v = _operands(1, 2, 128, 500, 64)
    a, la = cpu_kernels.attention(q, k[:, :, :180], v[:, :, :180], return_lse=True)
    b, lb = cpu_kernels.attention(q, k[:, :, 180:], v[:, :, 180:], return_lse=True)
    la, lb = la.transpose(1, 2)[..., None], lb.transpose(1, 2)[..., None]  # (B, Nq, H, 1)
    m = torch.maximum(la, lb)
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    merged = (a * wa + b * wb) / (wa + wb)
    torch.testing.assert_close(merged, cpu_kernels.attention(q, k, v), rtol=0, atol=1e-6)


@pytest.mark.parametrize("B,H", [(2, 3), (1, 2)])
def test_same_result_for_any_thread_count(B, H):
    """Also across the kernel's two schedules: one task per (window, head) where there are at least
    two per thread, keys first and then query blocks otherwise ((1, 2): the first on 1 thread, the
    second on 2)."""
    q, k, v = _operands(B, H, 70, 333, 64)
    emb = mp.PoyoRotaryTimeEmbedding(64, 1e-4, 2.0)
    q_phase, k_phase = emb(torch.rand(B, 70)), emb(torch.rand(B, 333))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.attention(q, k, v, query_phase=q_phase, key_phase=k_phase, rotate_value=True)
        torch.set_num_threads(2)
        two = cpu_kernels.attention(q, k, v, query_phase=q_phase, key_phase=k_phase, rotate_value=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_unsupported_operands_are_refused_with_the_fix():
    q, k, v = _operands(1, 2, 4, 6, 64)
    assert cpu_kernels.attention_supported(q, k, v)
    q48, k48, v48 = _operands(1, 2, 4, 6, 48)
    cases = {
        "head dim 48": (q48, k48, v48, None),
        "float64": (q.double(), k.double(), v.double(), None),
        "gradient": (q.clone().requires_grad_(), k, v, None),
        "float mask": (q, k, v, torch.ones(1, 6)),
        "mask of another length": (q, k, v, torch.ones(1, 5, dtype=torch.bool)),
        "3-d operands": (q[0], k[0], v[0], None),
        "strided last dim": (torch.randn(1, 2, 64, 4).transpose(2, 3), k, v, None),
    }
    for name, (a, b, c, m) in cases.items():
        assert not cpu_kernels.attention_supported(a, b, c, m), name
        with pytest.raises(ValueError, match="attention_supported"):
            cpu_kernels.attention(a, b, c, m)
    with torch.no_grad():  # no gradient taken: supported again
        assert cpu_kernels.attention_supported(q.clone().requires_grad_(), k, v)


def test_disabled_kernels_are_not_supported(monkeypatch):
    q, k, v = _operands(1, 2, 4, 6, 64)
    monkeypatch.setenv("POYO_HF_CPU_KERNELS", "0")
    assert not cpu_kernels.attention_supported(q, k, v)


def test_model_inference_uses_the_kernel_and_equals_eager(monkeypatch):
    config = tiny_config(unit_vocab_size=13, session_vocab_size=3)
    torch.manual_seed(0)
    model = PoyoForDecoding(config).eval()
    batch = ragged_batch(config)
    calls = []
    real = mp.cpu_attention

    def counted(q, k, v, key_mask=None, *args):
        calls.append((tuple(q.shape), tuple(k.shape), key_mask is not None))
        return real(q, k, v, key_mask, *args)

    monkeypatch.setattr(mp, "cpu_attention", counted)
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        fast = model(**batch).predictions
    # encoder (with the padding mask), every latent layer, decoder
    assert len(calls) == 2 + config.num_hidden_layers
    assert calls[0][2] and not any(c[2] for c in calls[1:])
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        ref = model(**batch).predictions
    assert len(calls) == 2 + config.num_hidden_layers  # eager stays the explicit reference
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_model_forward_with_gradients_does_not_use_the_kernel(monkeypatch):
    config = tiny_config(unit_vocab_size=13, session_vocab_size=3)
    model = PoyoForDecoding(config).eval()
    calls = []
    monkeypatch.setattr(mp, "cpu_attention", lambda *a, **k: calls.append(1))
    model.config._attn_implementation = "sdpa"
    out = model(**ragged_batch(config)).predictions  # grad enabled, parameters require grad: SDPA
    assert out.requires_grad and not calls


@pytest.mark.parametrize("B,H,Nq,M,Nk,Dh", [(2, 2, 37, 11, 90, 64), (1, 8, 128, 128, 128, 64), (3, 2, 5, 4, 33, 8)])
@pytest.mark.parametrize("rotate_value", [False, True])
@pytest.mark.parametrize("gathered", [False, True])
def test_rotations_and_gather_equal_apply_rotary_then_sdpa(B, H, Nq, M, Nk, Dh, rotate_value, gathered):
    """POYO's rotary attention in one call: queries and keys rotated by their phases (values too,
    and the output back, with rotate_value), keys and values gathered from a per-row table."""
    emb = mp.PoyoRotaryTimeEmbedding(Dh, 1e-4, 2.0)
    g = torch.Generator().manual_seed(3)
    q_phase, k_phase = emb(torch.rand(B, Nq, generator=g)), emb(torch.rand(B, Nk, generator=g))  # (B, N, Dh/4)
    q = torch.randn(B, Nq, H, Dh, generator=g)
    table = torch.randn(M, 2 * H, Dh, generator=g)
    index = torch.randint(0, M, (B, Nk), generator=g)
    kv = table[index]  # (B, Nk, 2H, Dh)
    mask = torch.rand(B, Nk, generator=g) > 0.2
    mask[:, 0] = True

    k_rot, v_rot = mp.apply_rotary(kv, k_phase).split(H, dim=2)
    v = v_rot if rotate_value else kv.split(H, dim=2)[1]
    q_rot = mp.apply_rotary(q, q_phase)
    ref = F.scaled_dot_product_attention(
        *(t.transpose(1, 2).double() for t in (q_rot, k_rot, v)), attn_mask=mask[:, None, None, :]
    ).transpose(1, 2)  # (B, Nq, H, Dh)
    if rotate_value:
        ref = mp.apply_rotary(ref.float(), q_phase.conj()).double()
    if gathered:
        k, v = table[None].transpose(1, 2).split(H, dim=1)  # (1, H, M, Dh) tables
        out = cpu_kernels.attention(
            q.transpose(1, 2), k, v, mask, query_phase=q_phase, key_phase=k_phase, rotate_value=rotate_value, kv_index=index
        )
    else:
        k, v = kv.transpose(1, 2).split(H, dim=1)
        out = cpu_kernels.attention(
            q.transpose(1, 2), k, v, mask, query_phase=q_phase, key_phase=k_phase, rotate_value=rotate_value
        )
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=5e-6)


def test_bad_phases_and_index_are_refused():
    q, k, v = _operands(2, 2, 4, 6, 16)
    emb = mp.PoyoRotaryTimeEmbedding(16, 1e-4, 2.0)
    good_q, good_k = emb(torch.rand(2, 4)), emb(torch.rand(2, 6))
    with pytest.raises(ValueError, match="query_phase must be complex64"):
        cpu_kernels.attention(q, k, v, query_phase=torch.view_as_real(good_q))
    with pytest.raises(ValueError, match=r"key_phase must be complex64 .*\(2, 6, P\)"):
        cpu_kernels.attention(q, k, v, key_phase=good_q)
    with pytest.raises(ValueError, match="rotate_value=True needs both"):
        cpu_kernels.attention(q, k, v, query_phase=good_q, rotate_value=True)
    table = k[:1]
    assert not cpu_kernels.attention_supported(q, table, table, kv_index=torch.zeros(2, 6, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"kv_index holds rows in \[6, 6\] but the key/value tables have 6 rows"):
        cpu_kernels.attention(q, table, table, kv_index=torch.full((2, 6), 6, dtype=torch.long))
    out = cpu_kernels.attention(q, table, table, query_phase=good_q, key_phase=good_k, kv_index=torch.zeros(2, 6, dtype=torch.long))
    assert out.shape == (2, 4, 2, 16)
