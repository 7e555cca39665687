"""POYO model: rotary convention, invariances, reference paths, gradients, save/load."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from make_fixtures import golden_windows, tiny_config
from transformers import AutoConfig, AutoModel, AutoModelForTimeSeriesPrediction, AutoProcessor

from poyo_hf import PoyoConfig, PoyoForDecoding, PoyoModel, PoyoProcessor
from poyo_hf.models.poyo.modeling_poyo import (
    PoyoRotaryAttention,
    PoyoRotaryTimeEmbedding,
    apply_rotary,
    pad_phase,
    rotary_frequencies,
)

SESSIONS = {sid: [f"{sid}/u{i}" for i in range(6)] for sid in ["s0", "s1"]}


def make_model(seed: int = 0, **overrides) -> tuple[PoyoForDecoding, PoyoProcessor]:
    torch.manual_seed(seed)
    config = tiny_config(unit_vocab_size=13, session_vocab_size=3, **overrides)
    model = PoyoForDecoding(config).eval()
    return model, PoyoProcessor.from_config(config, SESSIONS)


def random_windows(rng: np.random.Generator, n: int = 3) -> list[dict]:
    out = []
    for b in range(n):
        sid = f"s{b % 2}"
        k = int(rng.integers(3, 40))
        out.append(
            {
                "session_id": sid,
                "spike_times": np.sort(rng.uniform(0, 1, k)),
                "spike_unit_index": rng.integers(0, 6, k),
                "unit_ids": SESSIONS[sid],
                "output_timestamps": np.sort(rng.uniform(0, 1, int(rng.integers(2, 12)))),
            }
        )
    return out


# --------------------------------------------------------------------------- rotary primitives


def test_rotary_matches_hand_written_2x2_rotation():
    head_dim, t = 8, 0.37
    emb = PoyoRotaryTimeEmbedding(head_dim, t_min=0.01, t_max=1.0)
    x = torch.randn(1, 1, 1, head_dim)  # (B, N, H, Dh)
    y = apply_rotary(x, emb(torch.tensor([[t]])))
    omega = 2 * math.pi / np.exp(np.linspace(np.log(0.01), np.log(1.0), head_dim // 4))
    expected = x.clone()
    for k, w in enumerate(omega):  # pairs (0,1), (2,3): rotate by w * t
        R = torch.tensor([[math.cos(w * t), -math.sin(w * t)], [math.sin(w * t), math.cos(w * t)]])
        expected[..., 2 * k : 2 * k + 2] = (R @ x[0, 0, 0, 2 * k : 2 * k + 2]).view(1, 1, 1, 2)
    torch.testing.assert_close(y, expected, atol=2e-5, rtol=1e-5)  # float32 angles
    # The second half of each head is not rotated.
    assert torch.equal(y[..., head_dim // 2 :], x[..., head_dim // 2 :])


def test_rotary_periods_are_log_spaced_with_both_ends_included():
    omega = rotary_frequencies(64, 1e-4, 2.0627)
    periods = 2 * math.pi / omega.double()
    assert omega.shape == (16,)
    assert periods[0].item() == pytest.approx(1e-4, rel=1e-5)
    assert periods[-1].item() == pytest.approx(2.0627, rel=1e-5)
    ratios = periods[1:] / periods[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, ratios[0].item()), rtol=1e-4, atol=0)


def test_rotary_embedding_stays_float32_under_autocast():
    emb = PoyoRotaryTimeEmbedding(8, 1e-4, 2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        phase = emb(torch.tensor([[0.123456]]))
    assert phase.dtype == torch.complex64


def test_value_rotation_makes_attention_relative_in_time():
    """A rotate_value attention layer depends only on t_k - t_q: shifting both is a no-op."""
    torch.manual_seed(0)
    attn = PoyoRotaryAttention(dim=16, heads=2, head_dim=8, rotate_value=True).eval()
    emb = PoyoRotaryTimeEmbedding(8, 0.05, 2.0)  # slow periods: float32 angles stay exact enough
    q, c = torch.randn(1, 5, 16), torch.randn(1, 7, 16)
    tq, tc = torch.rand(1, 5), torch.rand(1, 7)
    a = attn(q, emb(tq), c, emb(tc), attn_implementation="eager")
    b = attn(q, emb(tq + 0.01), c, emb(tc + 0.01), attn_implementation="eager")
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_padded_phase_gives_the_same_rotation_and_an_exact_pass_through():
    emb = PoyoRotaryTimeEmbedding(8, 0.01, 1.0)
    x = torch.randn(2, 5, 3, 8)  # (B, N, H, Dh)
    phase = emb(torch.rand(2, 5))  # (B, N, Dh/4)
    full = pad_phase(phase, 8)
    assert full.shape == (2, 5, 4)
    assert torch.equal(full[..., :2], phase) and torch.equal(full[..., 2:], torch.ones(2, 5, 2, dtype=full.dtype))
    assert pad_phase(full, 8) is full
    y = apply_rotary(x, full)
    assert torch.equal(y, apply_rotary(x, phase))
    assert torch.equal(y[..., 4:], x[..., 4:])  # times 1 + 0i: bit for bit
    with pytest.raises(ValueError, match="5 pairs but a head of 8 dims has only 4"):
        pad_phase(torch.ones(2, 5, 5, dtype=torch.complex64), 8)


def test_rotary_gradient_is_the_inverse_rotation():
    """A rotation is orthogonal: d<g, R x>/dx = R^T g = (rotation by -angle) g."""
    emb = PoyoRotaryTimeEmbedding(8, 0.01, 1.0)
    phase = emb(torch.rand(2, 5))
    x = torch.randn(2, 5, 3, 8, requires_grad=True)
    g = torch.randn(2, 5, 3, 8)
    (apply_rotary(x, phase) * g).sum().backward()
    torch.testing.assert_close(x.grad, apply_rotary(g, phase.conj()), atol=1e-6, rtol=1e-6)


def test_context_table_with_index_equals_the_gathered_per_token_context():
    """The encoder projects each distinct (unit, type) row once and gathers K/V per token: the
    output and every gradient equal those of the per-token context."""
    torch.manual_seed(0)
    emb = PoyoRotaryTimeEmbedding(8, 0.05, 2.0)
    q, tq, tc = torch.randn(3, 4, 16), torch.rand(3, 4), torch.rand(3, 9)
    table = torch.randn(6, 16, requires_grad=True)
    index = torch.randint(0, 6, (3, 9))
    mask = torch.rand(3, 9) > 0.2
    outs, grads = [], []
    for use_index in (True, False):
        torch.manual_seed(1)
        attn = PoyoRotaryAttention(dim=16, heads=2, head_dim=8, rotate_value=True).eval()
        table.grad = None
        context = table if use_index else table[index]
        out = attn(q, emb(tq), context, emb(tc), mask, "eager", index if use_index else None)
        out.square().sum().backward()
        outs.append(out)
        grads.append([table.grad] + [p.grad for p in attn.parameters()])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_out_of_range_token_type_is_refused_with_the_valid_types():
    model, proc = make_model()
    batch = dict(proc(random_windows(np.random.default_rng(0), 1)))
    batch["input_token_type"] = batch["input_token_type"].clone()
    batch["input_token_type"][0, 0] = model.config.num_token_types
    with pytest.raises(ValueError, match="input_token_type holds values in .* 0 spike, 1 unit start, 2 unit end"):
        model(**batch)


# --------------------------------------------------------------------------- whole-model invariants


def test_time_shift_invariance_of_the_whole_model(rng):
    model, proc = make_model()
    batch = proc(random_windows(rng))
    _, latent_t = model.poyo.latent_grid()
    shift = 0.003  # small: the fastest rotary frequency is ~6e4 rad/s
    with torch.no_grad():
        a = model(**batch).predictions
        shifted = dict(batch)
        shifted["input_timestamps"] = batch["input_timestamps"] + shift
        shifted["output_timestamps"] = batch["output_timestamps"] + shift
        b = model(**shifted, latent_timestamps=latent_t + shift).predictions
    m = batch["output_mask"]
    torch.testing.assert_close(a[m], b[m], atol=2e-4, rtol=1e-3)


def test_invariance_to_input_token_order(rng):
    model, proc = make_model()
    batch = proc(random_windows(rng, 1))
    n = int(batch["input_mask"].sum())
    perm = torch.randperm(n)
    permuted = dict(batch)
    for key in ("input_unit_index", "input_timestamps", "input_token_type"):
        permuted[key] = batch[key].clone()
        permuted[key][0, :n] = batch[key][0, :n][perm]
    with torch.no_grad():
        a, b = model(**batch).predictions, model(**permuted).predictions
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_padded_batch_row_equals_window_alone_and_masked_tokens_change_nothing(rng):
    model, proc = make_model()
    windows = random_windows(rng, 4)
    batch = proc(windows)
    with torch.no_grad():
        together = model(**batch).predictions
        for i, w in enumerate(windows):
            alone = model(**proc([w])).predictions
            q = len(w["output_timestamps"])
            torch.testing.assert_close(together[i, :q], alone[0, :q], atol=1e-5, rtol=1e-5)
        # Garbage under a false mask must not change anything.
        noisy = {k: v.clone() for k, v in batch.items()}
        pad = ~batch["input_mask"]
        noisy["input_unit_index"][pad] = 5
        noisy["input_timestamps"][pad] = 0.77
        noisy["input_token_type"][pad] = 1
        torch.testing.assert_close(model(**noisy).predictions, together, atol=1e-6, rtol=1e-6)


def test_sdpa_equals_eager_reference(rng):
    model, proc = make_model()
    batch = proc(random_windows(rng, 4))
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        fast = model(**batch).predictions
        model.set_attn_implementation("eager")
        ref = model(**batch).predictions
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_every_parameter_gets_a_gradient_and_no_nan(rng):
    model, proc = make_model()
    model.train()
    windows = random_windows(rng, 4)
    # Both sessions and every unit appear, so every embedding table gets a gradient.
    for w in windows:
        w["targets"] = rng.normal(size=(len(w["output_timestamps"]), 2))
    out = model(**proc(windows))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    touched = [n for n, p in model.named_parameters() if p.grad.abs().sum() > 0]
    assert len(touched) == len(list(model.parameters()))


def test_empty_window_gives_start_end_tokens_and_finite_output():
    model, proc = make_model()
    batch = proc({"session_id": "s0", "spike_times": [], "spike_unit_ids": [], "output_timestamps": [0.5]})
    assert int(batch["input_mask"].sum()) == 2 * len(SESSIONS["s0"])
    with torch.no_grad():
        pred = model(**batch).predictions
    assert torch.isfinite(pred).all()


# --------------------------------------------------------------------------- loss and units


def test_weighted_mse_loss_matches_hand_computation():
    model, proc = make_model()
    c = model.config
    w = {
        "session_id": "s0",
        "spike_times": [0.1, 0.2],
        "spike_unit_ids": ["s0/u0", "s0/u1"],
        "output_timestamps": [0.1, 0.5, 0.9],
        "targets": [[1.0, 2.0], [np.nan, 0.0], [3.0, -1.0]],
        "output_weights": [5.0, 1.0, 0.1],
    }
    with torch.no_grad():
        out = model(**proc([w]))
    mean = np.array(c.target_mean["hand_vel"])
    std = np.array(c.target_std["hand_vel"])
    z = out.normalized_predictions[0, :3].double().numpy()
    y = (np.array(w["targets"]) - mean) / std
    # Row 1 has a NaN label in dim 0: the per-timestep MSE averages over the finite dims only.
    per = np.nanmean((z - y) ** 2, axis=1)
    weights = np.array(w["output_weights"])
    expected = (weights * per).sum() / weights.sum()
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    # Predictions are in physical units: normalized * std + mean.
    np.testing.assert_allclose(out.predictions[0, :3].numpy(), z * std + mean, rtol=1e-5, atol=1e-5)


def test_predictions_follow_target_statistics_changed_after_a_forward():
    """The (mean, std) tables are kept between calls: a config change must still reach the predictions."""
    model, proc = make_model()
    c = model.config
    batch = proc([{"session_id": "s0", "spike_times": [0.1], "spike_unit_ids": ["s0/u0"], "output_timestamps": [0.5]}])
    with torch.no_grad():
        first = model(**batch)
        c.target_mean = {**c.target_mean, "hand_vel": [m + 10.0 for m in c.target_mean["hand_vel"]]}
        c.target_std = {**c.target_std, "hand_vel": [2 * s for s in c.target_std["hand_vel"]]}
        second = model(**batch)
    assert torch.equal(first.normalized_predictions, second.normalized_predictions)
    std = torch.tensor(c.target_std["hand_vel"])
    expected = first.normalized_predictions[0, 0, :2] * std + torch.tensor(c.target_mean["hand_vel"])
    torch.testing.assert_close(second.predictions[0, 0, :2], expected)


def test_masked_and_missing_labels_never_reach_the_loss():
    model, proc = make_model()
    base = {
        "session_id": "s1",
        "spike_times": [0.3],
        "spike_unit_ids": ["s1/u2"],
        "output_timestamps": [0.2, 0.4],
        "targets": [[1.0, 1.0], [np.nan, np.nan]],
    }
    with torch.no_grad():
        a = model(**proc([base])).loss
        changed = dict(base, targets=[[1.0, 1.0], [np.nan, np.nan]], output_weights=[1.0, 100.0])
        b = model(**proc([changed])).loss
    assert torch.isfinite(a) and a.item() == pytest.approx(b.item(), rel=1e-6)


# --------------------------------------------------------------------------- config


def test_presets_load_by_name_with_the_spec_sizes():
    mp = PoyoConfig.from_preset("poyo-mp")
    one = PoyoConfig.from_preset("poyo-1")
    single = PoyoConfig.from_preset("poyo-single")
    assert (mp.hidden_size, mp.num_hidden_layers, mp.num_latents_per_step) == (64, 6, 16)
    assert (mp.num_cross_attention_heads, mp.num_self_attention_heads) == (2, 8)
    assert (one.hidden_size, one.num_hidden_layers, one.num_latents_per_step) == (128, 24, 32)
    assert (one.num_cross_attention_heads, one.num_self_attention_heads) == (4, 8)
    assert single.unit_dropout_max == 1000 and mp.num_latents == 128 and one.num_latents == 256
    assert PoyoConfig.from_pretrained("poyo-1").to_dict() == one.to_dict()

    def trunk_params(cfg):
        m = PoyoForDecoding(cfg)
        return sum(p.numel() for n, p in m.named_parameters() if "unit_emb" not in n and "session_emb" not in n)

    assert trunk_params(mp) == pytest.approx(1.25e6, rel=0.02)  # "POYO 1.3M"
    assert trunk_params(one) == pytest.approx(11.7e6, rel=0.02)  # "POYO 11.8M"


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(latent_step=0.3), "whole multiple of latent_step"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(head_dim=6), "head_dim"),
        (dict(rotary_t_min=3.0), "rotary_t_min"),
        (dict(ffn_dropout=1.5), "ffn_dropout"),
        (dict(readout_dims={"v": 2}, target_std={"v": [1.0, 0.0]}), "target_std"),
        (dict(readout_dims={"v": 2}, target_mean={"v": [1.0]}), "target_mean"),
        (dict(sequence_length=float("nan")), "sequence_length"),
    ],
)
def test_config_validation_names_the_bad_value(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        PoyoConfig(**kwargs)


def test_config_strict_types():
    with pytest.raises((TypeError, ValueError)):
        PoyoConfig(hidden_size="64")
    with pytest.raises(ValueError, match="Unknown POYO preset"):
        PoyoConfig.from_preset("poyo-2")


# --------------------------------------------------------------------------- save / load


def test_committed_fixture_reproduces_its_golden_predictions(tiny_checkpoint):
    golden = json.loads((tiny_checkpoint.parent / "tiny_poyo_golden.json").read_text())
    model = AutoModel.from_pretrained(tiny_checkpoint)
    proc = AutoProcessor.from_pretrained(tiny_checkpoint)
    assert isinstance(model, PoyoForDecoding) and isinstance(proc, PoyoProcessor)
    windows = golden_windows()
    with torch.no_grad():
        pred = model(**proc(windows)).predictions
    for i, expected in enumerate(golden["predictions"]):
        np.testing.assert_allclose(pred[i, : len(expected)].numpy(), np.array(expected), rtol=1e-5, atol=1e-6)


def test_save_pretrained_round_trip_is_exact_with_no_missing_keys(tmp_path, rng):
    model, proc = make_model(seed=3)
    batch = proc(random_windows(rng))
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PoyoConfig)
    assert isinstance(AutoModelForTimeSeriesPrediction.from_pretrained(tmp_path), PoyoForDecoding)
    proc2 = AutoProcessor.from_pretrained(tmp_path)
    assert proc2.unit_vocab == proc.unit_vocab and proc2.session_units == proc.session_units
    with torch.no_grad():
        a = model(**batch).predictions
        b = loaded(**proc2(random_windows(np.random.default_rng(0)))).predictions
        c = loaded(**batch).predictions
    assert torch.equal(a, c)
    assert b.shape[0] == 3


def test_trust_remote_code_loads_in_a_process_without_poyo_hf(tmp_path, rng):
    model, proc = make_model(seed=5)
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "modeling_poyo.py").is_file()
    assert (tmp_path / "ckpt" / "cpu_kernels.py").is_file()  # modeling_poyo's sibling import
    batch = proc(random_windows(rng))
    torch.save({k: v for k, v in batch.items()}, tmp_path / "batch.pt")
    with torch.no_grad():
        expected = model(**batch).predictions
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["poyo_hf"] = None  # make `import poyo_hf` fail: remote code must stand alone
        import torch
        from transformers import AutoModel, AutoProcessor
        m = AutoModel.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True)
        p = AutoProcessor.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True)
        assert "poyo_hf" not in type(m).__module__, type(m).__module__
        batch = torch.load({str(tmp_path / "batch.pt")!r})
        w = dict(session_id="s0", spike_times=[0.1], spike_unit_ids=["s0/u1"], output_timestamps=[0.5])
        assert p(w)["input_unit_index"].shape[1] == 16
        with torch.no_grad():
            torch.save(m(**batch).predictions, {str(tmp_path / "out.pt")!r})
        print(type(m).__name__, type(p).__name__)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "PoyoForDecoding PoyoProcessor" in res.stdout
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


# --------------------------------------------------------------------------- vocabulary growth


def test_vocabulary_extension_keeps_old_rows_bit_identical(rng):
    model, proc = make_model()
    old_units = model.poyo.unit_emb.weight.detach().clone()
    old_sessions = model.poyo.session_emb.weight.detach().clone()
    batch = proc(random_windows(rng))
    with torch.no_grad():
        before = model(**batch).predictions
    rows = proc.add_session("s_new", [f"s_new/u{i}" for i in range(5)])
    model.grow_vocabularies(proc)
    assert rows == {"session_index": 3, "unit_index": [13, 14, 15, 16, 17]}
    assert model.poyo.unit_emb.weight.shape == (18, 16) and model.config.unit_vocab_size == 18
    assert torch.equal(model.poyo.unit_emb.weight[:13], old_units)
    assert torch.equal(model.poyo.session_emb.weight[:3], old_sessions)
    new_rows = model.poyo.unit_emb.weight[13:]
    assert 0.005 < new_rows.std().item() < 0.05  # N(0, 0.02)
    proc.check_config(model.config)
    with torch.no_grad():
        after = model(**batch).predictions
        new = model(**proc({"session_id": "s_new", "spike_times": [0.2], "spike_unit_ids": ["s_new/u3"],
                            "output_timestamps": [0.5]})).predictions
    assert torch.equal(before, after) and torch.isfinite(new).all()


def test_vocabulary_size_mismatch_is_refused(tiny_checkpoint):
    model = AutoModel.from_pretrained(tiny_checkpoint)
    proc = AutoProcessor.from_pretrained(tiny_checkpoint)
    proc.add_session("extra", ["extra/u0"])
    with pytest.raises(ValueError, match="unit_vocab_size"):
        proc.check_config(model.config)
    with pytest.raises(ValueError, match="grow_vocabularies"):
        model(**proc({"session_id": "extra", "spike_times": [0.1], "spike_unit_ids": ["extra/u0"],
                      "output_timestamps": [0.5]}))


def test_base_model_returns_hidden_states(rng):
    torch.manual_seed(0)
    cfg = tiny_config(unit_vocab_size=13, session_vocab_size=3)
    base = PoyoModel(cfg).eval()
    proc = PoyoProcessor.from_config(cfg, SESSIONS)
    batch = proc(random_windows(rng))
    with torch.no_grad():
        out = base(**batch)
    assert out.last_hidden_state.shape == (3, batch["output_timestamps"].shape[1], 16)
    assert out.latent_hidden_state.shape == (3, cfg.num_latents, 16)


@pytest.mark.parametrize("n_codes", [7, 300, 100_000])  # the presence table, and torch.unique beyond its range
def test_distinct_rows_equal_torch_unique(n_codes):
    from poyo_hf.models.poyo.modeling_poyo import distinct_rows

    g = torch.Generator().manual_seed(n_codes)
    codes = torch.randint(0, n_codes, (3, 500), generator=g)
    values, inverse = distinct_rows(codes, n_codes)
    ref_values, ref_inverse = torch.unique(codes, return_inverse=True)
    assert torch.equal(values, ref_values) and torch.equal(inverse, ref_inverse)
    assert inverse.dtype == torch.long and inverse.shape == codes.shape


def test_training_after_an_inference_mode_forward():
    """What the model keeps between calls (rotary frequencies, the latent grid's phases, target
    statistics) is made outside inference mode, so a training step after an inference-mode
    forward can save it for backward; and the other way round."""
    model, proc = make_model()
    batch = proc(
        [{"session_id": "s0", "spike_times": [0.1, 0.4], "spike_unit_ids": ["s0/u0", "s0/u1"],
          "output_timestamps": [0.2, 0.6], "targets": [[1.0, 0.0], [0.5, 2.0]]}]
    )
    for _ in range(2):
        with torch.inference_mode():
            model(**batch)
        model.train()
        model(**batch).loss.backward()
        model.eval()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("poyo.latent_emb"))
