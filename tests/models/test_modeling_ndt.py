"""NDT model: banded attention, reference paths, padding, masking statistics, the Poisson loss,
gradients, save/load, remote code, the committed fixture and a Trainer smoke run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from make_ndt_fixture import HELDIN, HELDOUT, golden_trials, tiny_ndt_config
from transformers import AutoConfig, AutoModel, AutoProcessor

from poyo_hf.models.ndt import NdtConfig, NdtForMaskedModeling, NdtModel, NdtProcessor
from poyo_hf.models.ndt.modeling_ndt import (
    banded_attention_mask,
    expand_spans,
    replace_masked_entries,
    sample_bin_mask,
    span_expand_probability,
)
from poyo_hf.models.ndt_registration import register_ndt_auto_classes

register_ndt_auto_classes()


def make_model(seed: int = 0, **overrides) -> tuple[NdtForMaskedModeling, NdtProcessor]:
    torch.manual_seed(seed)
    config = tiny_ndt_config(**overrides)
    return NdtForMaskedModeling(config).eval(), NdtProcessor.from_config(config, HELDIN, HELDOUT)


def count_trials(rng: np.random.Generator, lengths=(12, 7, 10), n_in=5, n_out=3, F_=4) -> list[dict]:
    return [
        {
            "spikes": rng.poisson(1.0, (t, n_in)),
            "heldout_spikes": rng.poisson(1.0, (t, n_out)),
            "forward_spikes": rng.poisson(1.0, (F_, n_in + n_out)),
        }
        for t in lengths
    ]


def naive_band(T: int, back: int | None, fwd: int | None) -> torch.Tensor:
    out = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        lo = 0 if back is None else max(0, t - back)
        hi = T - 1 if fwd is None else min(T - 1, t + fwd)
        for s in range(lo, hi + 1):
            out[t, s] = True
    return out


# --------------------------------------------------------------------------- banded attention


@pytest.mark.parametrize("back, fwd", [(3, 2), (0, 0), (5, None), (None, 1), (20, 20)])
def test_banded_mask_equals_naive_reference(back, fwd):
    for T in (1, 7, 16):
        assert torch.equal(banded_attention_mask(T, back, fwd), naive_band(T, back, fwd))
    assert banded_attention_mask(5, None, None) is None


def test_model_mask_combines_band_and_padding_like_a_naive_loop():
    model, _ = make_model()
    T = 9
    attention_mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    got = model.ndt.attention_bias(attention_mask, T, torch.device("cpu"))  # (B, 1, T, T)
    band = naive_band(T, 3, 2)
    for b in range(2):
        for t in range(T):
            for s in range(T):
                expected = bool(band[t, s]) and (bool(attention_mask[b, s]) or s == t)
                assert bool(got[b, 0, t, s]) == expected
    # Full context and no padding: no mask at all (SDPA runs unmasked).
    full, _ = make_model(context_backward=None, context_forward=None)
    assert full.ndt.attention_bias(torch.ones(2, T), T, torch.device("cpu")) is None
    # The band is built once per (T, device) and cached.
    assert model.ndt.band_mask(T, torch.device("cpu")) is model.ndt.band_mask(T, torch.device("cpu"))


def test_one_layer_receptive_field_is_exactly_the_band():
    """With one layer, perturbing bin s changes output bin t iff t - back <= s <= t + fwd."""
    model, _ = make_model(num_hidden_layers=1)
    x = torch.poisson(torch.ones(1, 16, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(x).log_rates
        for s in (0, 5, 15):
            y = x.clone()
            y[0, s] += 3.0
            changed = (model(y).log_rates - base).abs().amax(-1)[0] > 1e-6  # (T,)
            expected = torch.tensor([t - 3 <= s <= t + 2 for t in range(16)])
            assert torch.equal(changed, expected), (s, changed.nonzero().flatten().tolist())


# --------------------------------------------------------------------------- reference paths


@pytest.mark.parametrize("context", [(3, 2), (None, None)])
def test_sdpa_fast_path_and_eager_reference_agree(rng, context):
    model, proc = make_model(context_backward=context[0], context_forward=context[1])
    batch = proc(count_trials(rng))
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(**batch).log_rates  # module path, explicit softmax
        model.set_attn_implementation("sdpa")
        fast = model(**batch).log_rates  # fused inference path
        assert model.ndt._use_fast_path()
    modules = model(**batch).log_rates.detach()  # gradients on: module path through SDPA
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(fast[real], eager[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(modules[real], eager[real], atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(model(**batch).log_rates, fast)


@pytest.mark.parametrize("embedding", ["count", "linear"])
def test_other_embeddings_agree_across_paths(rng, embedding):
    model, proc = make_model(embedding=embedding, max_count=4, count_embedding_dim=2,
                             **({"num_attention_heads": 4} if embedding == "count" else {}))
    batch = proc(count_trials(rng))
    with torch.no_grad():
        fast = model(**batch).log_rates
        model.set_attn_implementation("eager")
        eager = model(**batch).log_rates
    torch.testing.assert_close(fast, eager, atol=1e-5, rtol=1e-5)


def test_padded_batch_row_equals_trial_alone_and_padding_changes_nothing(rng):
    model, proc = make_model()
    trials = count_trials(rng)
    batch = proc(trials)
    with torch.no_grad():
        together = model(**batch)
        for i, trial in enumerate(trials):
            alone = model(**proc([trial]))
            n = int(batch["attention_mask"][i].sum())
            torch.testing.assert_close(together.log_rates[i, :n], alone.log_rates[0, :n], atol=1e-5, rtol=1e-5)
        noisy = {k: v.clone() for k, v in batch.items()}
        pad = batch["attention_mask"] == 0
        noisy["spikes"][pad] = 9.0
        again = model(**noisy)
    real = ~pad
    torch.testing.assert_close(again.log_rates[real], together.log_rates[real], atol=1e-6, rtol=1e-6)
    # The held-out / forward loss never looks at padding either.
    assert again.loss.item() == pytest.approx(together.loss.item(), rel=1e-6)


@pytest.mark.parametrize("embedding", ["identity", "count", "linear"])
def test_every_parameter_gets_a_gradient_and_no_nan(rng, embedding):
    extra = {"num_attention_heads": 4} if embedding == "count" else {}
    model, proc = make_model(embedding=embedding, max_count=3, **extra)
    model.train()
    out = model(**proc(count_trials(rng, lengths=(12, 12, 12, 12))))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


# --------------------------------------------------------------------------- masking


def test_bin_mask_ratio_and_only_maskable_bins():
    g = torch.Generator().manual_seed(0)
    maskable = torch.ones(400, 100, dtype=torch.bool)
    maskable[:, 80:] = False  # e.g. forward bins
    m = sample_bin_mask(maskable, 0.25, 1, g)
    assert not m[:, 80:].any()
    assert m[:, :80].float().mean().item() == pytest.approx(0.25, abs=0.01)
    # Spans keep the masked fraction near the ratio (seeds at ratio / width; overlaps lose a bit).
    m7 = sample_bin_mask(maskable, 0.25, 7, g)
    frac = m7[:, :80].float().mean().item()
    assert 0.19 < frac < 0.25
    assert not m7[:, 80:].any()


def test_spans_are_contiguous_centred_and_at_most_width_long():
    seeds = torch.zeros(1, 20, dtype=torch.bool)
    seeds[0, 10] = True
    for w in range(1, 8):
        span = expand_spans(seeds, w)[0].nonzero().flatten().tolist()
        start = 10 - (w - 1) // 2
        assert span == list(range(start, start + w))
    edge = torch.zeros(1, 5, dtype=torch.bool)
    edge[0, 0] = True
    assert expand_spans(edge, 5)[0].tolist() == [True, True, True, False, False]  # clipped at the start


def test_entry_replacement_fractions_and_untouched_bins():
    g = torch.Generator().manual_seed(1)
    spikes = torch.full((64, 50, 20), 3.0)
    spikes[0, 0, 0] = 6.0  # the batch max: random counts are drawn from [0, 6]
    bin_mask = torch.rand(64, 50, generator=g) < 0.3
    out, zeroed, randomised = replace_masked_entries(spikes, bin_mask, 0.8, 0.5, g)
    entry = bin_mask[..., None].expand_as(spikes)
    assert not (zeroed & ~entry).any() and not (randomised & ~entry).any() and not (zeroed & randomised).any()
    assert zeroed.sum().item() / entry.sum().item() == pytest.approx(0.8, abs=0.01)
    assert randomised.sum().item() / (entry & ~zeroed).sum().item() == pytest.approx(0.5, abs=0.02)
    assert torch.equal(out[~entry], spikes[~entry])  # unmasked bins untouched
    assert (out[zeroed] == 0).all()
    kept = entry & ~zeroed & ~randomised
    assert torch.equal(out[kept], spikes[kept])
    r = out[randomised]
    assert r.min() >= 0 and r.max() <= 6 and torch.equal(r, r.round())
    assert len(torch.unique(r)) == 7  # every count in [0, 6] drawn


def test_span_ramp_phases_spans_in():
    assert span_expand_probability(0, 10, 20) == 0.0
    assert span_expand_probability(15, 10, 20) == 0.5
    assert span_expand_probability(99, 10, 20) == 1.0
    assert span_expand_probability(5, 5, 5) == 1.0 and span_expand_probability(4, 5, 5) == 0.0
    model, _ = make_model(mask_max_span=7, mask_span_ramp_start=100, mask_span_ramp_end=200)
    g = torch.Generator().manual_seed(2)
    maskable = torch.ones(4, 30, dtype=torch.bool)

    def widths(step, n=700):
        return [model.sample_mask(maskable, step=step, generator=g)[1] for _ in range(n)]

    before, middle, after = widths(50), widths(150), widths(250)
    assert set(before) == {1}
    assert set(after) == set(range(1, 8))  # U{1..7} once fully ramped
    assert np.mean([w > 1 for w in after]) == pytest.approx(6 / 7, abs=0.05)
    assert np.mean([w > 1 for w in middle]) == pytest.approx(0.5 * 6 / 7, abs=0.06)


def test_training_forward_masks_observed_bins_only_and_counts_steps(rng):
    model, proc = make_model(mask_ratio=0.5)
    model.train()
    batch = proc(count_trials(rng, lengths=(12, 6)))
    torch.manual_seed(0)
    seen = torch.zeros(2, 16, dtype=torch.bool)
    for _ in range(20):
        out = model(**batch)
        seen |= out.mask
    assert model.mask_step == 20
    observed = torch.zeros(2, 16, dtype=torch.bool)
    observed[0, :12] = True
    observed[1, :6] = True
    assert torch.equal(seen, observed)  # every observed bin, and nothing else, gets masked
    model.eval()
    out = model(**batch)
    assert out.mask is None and model.mask_step == 20
    assert model(**batch, mask=True).mask is not None and model.mask_step == 20
    model.train()
    assert model(**batch, mask=False).mask is None


# --------------------------------------------------------------------------- loss


def test_loss_is_the_poisson_nll_on_masked_heldout_and_forward_entries(rng):
    """Eval mode, an explicit bin mask, mask_token_ratio=1 (masked held-in entries are zeroed).
    Scored entries: held-in at masked bins, held-out at every observed bin, every forward entry;
    loss = mean over them of poisson_nll_loss(log_input=True, full=False) = exp(x) - y * x."""
    model, proc = make_model(mask_token_ratio=1.0)
    trials = count_trials(rng, lengths=(12, 8))
    batch = proc(trials)
    B, T = batch["attention_mask"].shape
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, [1, 2, 7]] = True
    mask[1, [0, 5, 9, 14]] = True  # bins 9 and 14 of trial 1 are forward / padding: never masked
    with torch.no_grad():
        out = model(**batch, mask=mask)
        zeroed = dict(batch)
        zeroed["spikes"] = batch["spikes"].clone()
        zeroed["spikes"][mask] = 0.0
        plain = model(zeroed["spikes"], attention_mask=batch["attention_mask"], mask=False).log_rates
    assert out.mask.nonzero().tolist() == [[0, 1], [0, 2], [0, 7], [1, 0], [1, 5]]
    torch.testing.assert_close(out.log_rates, plain)  # the masked bins really were zeroed

    xs, ys = [], []
    for b, trial in enumerate(trials):
        t_obs = trial["spikes"].shape[0]
        for t in range(t_obs):
            if out.mask[b, t]:
                for n in range(5):
                    xs.append(out.log_rates[b, t, n]), ys.append(float(trial["spikes"][t, n]))
            for n in range(3):
                xs.append(out.log_rates[b, t, 5 + n]), ys.append(float(trial["heldout_spikes"][t, n]))
        for f in range(4):
            for n in range(8):
                xs.append(out.log_rates[b, t_obs + f, n]), ys.append(float(trial["forward_spikes"][f, n]))
    x, y = torch.stack(xs).double(), torch.tensor(ys, dtype=torch.float64)
    expected = F.poisson_nll_loss(x, y, log_input=True, full=False)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() == pytest.approx((x.exp() - y * x).mean().item(), rel=1e-12)
    assert len(xs) == 5 * 3 + 5 * 2 + (12 + 8) * 3 + 2 * 4 * 8


def test_loss_ignores_unscored_entries_even_when_they_overflow():
    """Unscored log-rates never reach the loss or its gradient, even ones whose exp overflows
    (a masked sum must not turn 0 * inf into NaN); no scored entry gives 0 with a graph."""
    model, _ = make_model()
    T, N = 16, 8
    log_rates = torch.randn(1, T, N, dtype=torch.float64)
    log_rates[0, 3, 0] = 200.0  # bin 3 is not masked: unscored, exp(200) overflows float32 / is huge
    log_rates = log_rates.float().requires_grad_()
    spikes = torch.poisson(torch.full((1, T, 5), 1.0))
    bins = torch.zeros(1, T, dtype=torch.bool)
    bins[0, [1, 6]] = True
    observed = torch.arange(T)[None] < 12
    loss = model.loss_function(log_rates, spikes, bins, observed, None, None, torch.tensor([12]))
    loss.backward()
    x, y = log_rates.detach()[0, [1, 6], :5].double(), spikes[0, [1, 6]].double()
    assert loss.item() == pytest.approx((x.exp() - y * x).mean().item(), rel=1e-6)
    grad = log_rates.grad[0]
    assert torch.isfinite(grad).all()
    scored = torch.zeros(T, N, dtype=torch.bool)
    scored[[1, 6], :5] = True
    assert torch.all(grad[~scored] == 0) and torch.all(grad[scored] != 0)

    empty = torch.zeros(1, T, dtype=torch.bool)
    none = model.loss_function(log_rates, spikes, empty, observed, None, None, torch.tensor([12]))
    assert none.item() == 0.0 and none.requires_grad


def test_loss_without_masking_scores_heldout_and_forward_only(rng):
    model, proc = make_model()
    batch = proc(count_trials(rng, lengths=(12,)))
    with torch.no_grad():
        out = model(**batch)
        no_targets = model(batch["spikes"])
        only_heldout = model(batch["spikes"], heldout_spikes=batch["heldout_spikes"])
    assert no_targets.loss is None
    lr = out.log_rates[0]
    h = batch["heldout_spikes"][0, :12]
    f = batch["forward_spikes"][0]
    x = torch.cat([lr[:12, 5:].flatten(), lr[12:, :].flatten()])
    y = torch.cat([h.flatten(), f.flatten()])
    assert out.loss.item() == pytest.approx(F.poisson_nll_loss(x, y, log_input=True, full=False).item(), rel=1e-5)
    x_h = lr[:12, 5:].flatten()
    assert only_heldout.loss.item() == pytest.approx(
        F.poisson_nll_loss(x_h, h.flatten(), log_input=True, full=False).item(), rel=1e-5
    )
    torch.testing.assert_close(out.rates, out.log_rates.exp())


def test_bad_model_inputs_are_refused():
    model, _ = make_model()
    with pytest.raises(ValueError, match="num_neurons"):
        model(torch.zeros(1, 12, 7))
    with pytest.raises(ValueError, match="position table"):
        model(torch.zeros(1, 17, 5))
    with pytest.raises(ValueError, match="forward_spikes must be"):
        model(torch.zeros(1, 16, 5), forward_spikes=torch.zeros(1, 4, 5))
    with pytest.raises(ValueError, match="heldout_spikes must be"):
        model(torch.zeros(1, 16, 5), heldout_spikes=torch.zeros(1, 5, 3))
    with pytest.raises(ValueError, match="at least one observed bin"):
        model(torch.zeros(1, 4, 5), mask=True)


# --------------------------------------------------------------------------- config and init


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(hidden_size=100), "hidden_size"),
        (dict(num_attention_heads=3), "divisible by num_attention_heads"),
        (dict(embedding="onehot"), "embedding"),
        (dict(context_backward=-2), "context_backward"),
        (dict(mask_ratio=1.5), "mask_ratio"),
        (dict(hidden_dropout=1.0), "hidden_dropout"),
        (dict(mask_max_span=0), "mask_max_span"),
        (dict(mask_span_ramp_start=10, mask_span_ramp_end=5), "mask_span_ramp_end"),
        (dict(bin_size=float("nan")), "bin_size"),
        (dict(num_neurons=0), "num_neurons"),
    ],
)
def test_config_validation_names_the_bad_value(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        NdtConfig(**kwargs)


def test_config_defaults_are_the_released_mc_maze_model_and_types_are_strict():
    c = NdtConfig()
    assert (c.num_neurons, c.num_heldout_neurons, c.num_bins, c.num_forward_bins) == (137, 45, 140, 40)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (182, 4, 2, 128)
    assert c.num_positions == 180 and c.bin_size == 0.005 and c.mask_ratio == 0.25 and c.mask_max_span == 7
    assert NdtConfig(embedding="count", count_embedding_dim=3).hidden_size == 182 * 3
    assert NdtConfig(embedding="linear", hidden_size=64).hidden_size == 64
    with pytest.raises((TypeError, ValueError)):
        NdtConfig(num_neurons="137")


def test_tfixup_and_readout_init_ranges():
    model, _ = make_model(seed=1)
    scale = 0.67 * 2**-0.25  # two layers
    layer = model.ndt.layers[0]
    assert layer.self_attn.o_proj.weight.abs().max() <= scale / math.sqrt(8) + 1e-7
    assert layer.ffn.fc2.weight.abs().max() <= scale / math.sqrt(16) + 1e-7
    assert layer.self_attn.o_proj.bias.abs().max() == 0 and layer.self_attn.qkv_proj.bias.abs().max() == 0
    assert model.readout.weight.abs().max() <= 0.1 and model.readout.bias.abs().max() == 0
    plain = NdtForMaskedModeling(tiny_ndt_config(fixup_init=False))
    assert plain.ndt.layers[0].ffn.fc2.weight.abs().max() > scale / math.sqrt(16)


# --------------------------------------------------------------------------- save / load


def test_committed_fixture_reproduces_its_golden_log_rates(tmp_path):
    FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

    golden = json.loads((FIXTURES / "tiny_ndt_golden.json").read_text())
    model = AutoModel.from_pretrained(FIXTURES / "tiny-ndt")
    proc = AutoProcessor.from_pretrained(FIXTURES / "tiny-ndt")
    assert isinstance(model, NdtForMaskedModeling) and isinstance(proc, NdtProcessor)
    assert golden["trials"][0]["spike_times"] == golden_trials()[0]["spike_times"].tolist()
    batch = proc(golden["trials"])
    with torch.no_grad():
        out = model(**batch)
    for i, expected in enumerate(golden["log_rates"]):
        np.testing.assert_allclose(out.log_rates[i, : len(expected)].numpy(), np.array(expected), rtol=1e-5, atol=1e-6)
    assert out.loss.item() == pytest.approx(golden["loss"], rel=1e-5)


def test_save_pretrained_round_trip_is_exact_with_no_missing_keys(tmp_path, rng):
    model, proc = make_model(seed=3)
    batch = proc(count_trials(rng))
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert isinstance(loaded, NdtForMaskedModeling) and not loaded.training
    assert isinstance(AutoConfig.from_pretrained(tmp_path), NdtConfig)
    proc2 = AutoProcessor.from_pretrained(tmp_path)
    assert proc2.to_dict() == proc.to_dict()
    for name, p in model.state_dict().items():
        assert torch.equal(p, loaded.state_dict()[name]), name
    with torch.no_grad():
        assert torch.equal(model(**batch).log_rates, loaded(**proc2(count_trials(np.random.default_rng(0)))).log_rates)
    # The encoder alone loads from the same folder (base_model_prefix "ndt").
    base, info = NdtModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    with torch.no_grad():
        hidden = base(batch["spikes"], attention_mask=batch["attention_mask"]).last_hidden_state
        assert torch.equal(hidden, model(**batch).last_hidden_state)
    assert hidden.shape == (3, 16, 8)


def test_trust_remote_code_loads_in_a_process_without_poyo_hf(tmp_path, rng):
    model, proc = make_model(seed=5)
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    for name in ("modeling_ndt.py", "configuration_ndt.py", "processing_ndt.py"):
        assert (tmp_path / "ckpt" / name).is_file(), name
    trial = {"spike_times": [0.001, 0.05, 0.13], "spike_unit_ids": ["u1", "h2", "u0"], "duration": 0.1}
    batch = proc([trial, *count_trials(rng, lengths=(12,))])
    torch.save(dict(batch), tmp_path / "batch.pt")
    with torch.no_grad():
        expected = model(**batch).log_rates
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
        again = p([{trial!r}])
        assert torch.equal(again["spikes"][0], batch["spikes"][0, :14]), again["spikes"]
        with torch.no_grad():
            torch.save(m(**batch).log_rates, {str(tmp_path / "out.pt")!r})
        # Without poyo_hf the CPU training kernels fall back to plain torch layers, and it trains.
        kinds = {{type(x).__name__ for x in m.modules()}}
        assert "Linear" in kinds and "Dropout" in kinds and not {{"PoyoLinear", "PoyoDropout"}} & kinds, kinds
        m.train()
        loss = m(**batch).loss
        loss.backward()
        assert torch.isfinite(loss) and m.readout.weight.grad is not None
        print(type(m).__name__, type(p).__name__)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    res = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "NdtForMaskedModeling NdtProcessor" in res.stdout
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


# --------------------------------------------------------------------------- Trainer


def test_trainer_runs_three_steps_on_the_fixture(tmp_path, rng):
    FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
    from transformers import Trainer, TrainingArguments

    model = AutoModel.from_pretrained(FIXTURES / "tiny-ndt")
    proc = AutoProcessor.from_pretrained(FIXTURES / "tiny-ndt")
    data = count_trials(rng, lengths=(12, 9, 12, 10, 12, 11, 8, 12))
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        use_cpu=True,
        remove_unused_columns=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=lambda trials: dict(proc(trials)))
    result = trainer.train()
    assert result.global_step == 3 and math.isfinite(result.training_loss)
    assert model.mask_step == 3  # masking ran on every training step
    metrics = trainer.evaluate(eval_dataset=data)
    assert math.isfinite(metrics["eval_loss"])


@pytest.mark.parametrize(
    "context, embedding", [((None, None), "identity"), ((3, 2), "identity"), ((0, None), "linear")]
)
def test_single_trial_cpu_path_equals_eager_including_padding(context, embedding):
    """Batch 1 on the CPU takes the oneDNN single-trial path (key bias dropped, value bias folded)."""
    model, _ = make_model(context_backward=context[0], context_forward=context[1], embedding=embedding)
    with torch.no_grad():  # biases are zero at init: make them matter
        for layer in model.ndt.layers:
            layer.self_attn.qkv_proj.bias.normal_()
    x = torch.poisson(torch.full((1, 16, 5), 1.5), generator=torch.Generator().manual_seed(0))
    padded = torch.tensor([[1] * 11 + [0] * 5])
    for attention_mask in (None, padded):
        with torch.no_grad():
            fast = model(x, attention_mask=attention_mask).log_rates
            model.set_attn_implementation("eager")
            eager = model(x, attention_mask=attention_mask).log_rates
            model.set_attn_implementation("sdpa")
        n = 16 if attention_mask is None else 11
        torch.testing.assert_close(fast[:, :n], eager[:, :n], atol=1e-5, rtol=1e-5)
    # The prepared inference weights follow in-place weight changes (optimiser steps, loads).
    with torch.no_grad():
        before = model(x).log_rates
        model.ndt.layers[0].self_attn.qkv_proj.weight.mul_(1.5)
        model.ndt.layers[1].self_attn.o_proj.bias.add_(0.3)
        after = model(x).log_rates
        model.set_attn_implementation("eager")
        eager = model(x).log_rates
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, eager, atol=1e-5, rtol=1e-5)


def test_deepcopy_and_pickle_after_fast_inference():
    """The inference caches (oneDNN-packed weights) are dropped on copy / pickle and rebuilt."""
    import copy
    import io

    model, _ = make_model()
    x = torch.poisson(torch.ones(1, 16, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(x).log_rates
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    with torch.inference_mode():
        assert torch.equal(clone(x).log_rates, expected)
        assert torch.equal(restored(x).log_rates, expected)
