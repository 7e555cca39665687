"""`poyo-hf pretrain --model ndt` / `poyo-hf evaluate` on an NDT checkpoint, the NDT trial stream,
and NDT under the stock `transformers.Trainer`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from poyo_hf.training.corpus import Corpus
from poyo_hf.training.evaluate import EvaluateArguments, evaluate
from poyo_hf.training.ndt_task import NdtTrialStream, bin_trials, split_units, tiled_trials, trial_length
from poyo_hf.training.pretrain import PretrainArguments, train

# 20 ms bins, 20 observed + 5 forward bins (0.5 s trials), one layer: milliseconds per step.
NDT_TINY = json.dumps(
    {
        "bin_size": 0.02,
        "num_bins": 20,
        "num_forward_bins": 5,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "intermediate_size": 32,
        "embedding_dropout": 0.0,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "readout_dropout": 0.0,
    }
)


def ndt_args(corpus, out, **kw) -> PretrainArguments:
    base = dict(
        datasets=[str(corpus)],
        output_dir=str(out),
        model="ndt",
        config_overrides=NDT_TINY,
        max_steps=120,
        batch_size=8,
        learning_rate=3e-3,
        logging_steps=1,
        progress=False,
        plots=False,
        seed=0,
    )
    base.update(kw)
    return PretrainArguments(**base)


@pytest.fixture(scope="module")
def ndt_run(toy_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ndt") / "run"
    return out, train(ndt_args(toy_corpus, out))


def test_ndt_pretraining_lowers_the_loss_and_exports(ndt_run, toy_corpus):
    from transformers import AutoModel, AutoProcessor

    from poyo_hf.models.ndt import NdtForMaskedModeling

    out, results = ndt_run
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [r["loss"] for r in rows if "loss" in r]
    assert len(curve) == 120
    assert np.mean(curve[-20:]) < 0.7 * np.mean(curve[:10])
    assert {"windows_per_s", "spikes_per_s", "data_wait_fraction"} <= set(rows[0])
    model = AutoModel.from_pretrained(out / "model")
    proc = AutoProcessor.from_pretrained(out / "model")
    assert isinstance(model, NdtForMaskedModeling)
    proc.check_config(model.config)
    # The held-in / held-out split covers the session's units exactly and is saved with the processor.
    units = Corpus.from_sources([str(toy_corpus)]).sessions[0]["unit_ids"]
    assert sorted(proc.heldin_unit_ids + proc.heldout_unit_ids) == sorted(units)
    assert len(proc.heldout_unit_ids) == round(0.25 * len(units))
    for key in ("co_bps", "fp_bps", "vel_r2", "wiener_r2"):
        assert np.isfinite(results[key]), key
    assert results["model"] == "ndt" and results["r2"] == results["vel_r2"]
    saved = json.loads((out / "eval" / "results.json").read_text())
    assert saved["co_bps"] == pytest.approx(results["co_bps"])


def test_evaluate_command_scores_an_ndt_checkpoint_like_training_did(ndt_run, toy_corpus, tmp_path):
    out, results = ndt_run
    res = evaluate(
        EvaluateArguments(
            checkpoint=str(out / "model"),
            datasets=[str(toy_corpus)],
            output_dir=str(tmp_path / "ev"),
            split="valid",
            plots=False,
        )
    )
    for key in ("co_bps", "fp_bps", "vel_r2", "wiener_r2"):
        assert res[key] == pytest.approx(results[key], abs=1e-9), key
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["model"] == "ndt"


def test_ndt_needs_one_session(tiny_corpus, tmp_path):
    with pytest.raises(ValueError, match="--session"):
        train(ndt_args(tiny_corpus, tmp_path / "a", max_steps=2))
    sid = Corpus.from_sources([str(tiny_corpus)]).sessions[1]["session_id"]
    res = train(ndt_args(tiny_corpus, tmp_path / "b", max_steps=2, session=sid))
    assert res["session_id"] == sid
    with pytest.raises(ValueError, match="is not in the datasets"):
        train(ndt_args(tiny_corpus, tmp_path / "c", max_steps=2, session="nope"))


def test_ndt_batch_larger_than_an_epoch_is_refused_before_training(toy_corpus, tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(ndt_args(toy_corpus, tmp_path / "run", batch_size=100000))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_split_units_is_seeded_and_disjoint():
    units = [f"u{i}" for i in range(40)]
    a_in, a_out = split_units(units, 0.25, seed=3)
    b_in, b_out = split_units(units, 0.25, seed=3)
    assert (a_in, a_out) == (b_in, b_out) and len(a_out) == 10 and not set(a_in) & set(a_out)
    assert split_units(units, 0.25, seed=4)[1] != a_out
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_units(units, 1.0, seed=0)


def _stream(toy_corpus, processor):
    return NdtTrialStream(Corpus.from_sources([str(toy_corpus)]).segments("train"), processor, batch_size=4, seed=5)


def test_trial_stream_resumes_exactly(ndt_run, toy_corpus):
    from poyo_hf.models.ndt import NdtProcessor

    proc = NdtProcessor.from_pretrained(ndt_run[0] / "model")
    full = _stream(toy_corpus, proc)
    it = full.epochs()
    first = [next(it) for _ in range(3)]
    state = full.state_dict()
    rest = [next(it) for _ in range(30)]  # crosses into the next epoch
    resumed = _stream(toy_corpus, proc)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    it2 = resumed.epochs()
    for want in rest:
        got = next(it2)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(first[0]["spikes"], rest[0]["spikes"])
    # Trials are whole: observed + forward bins inside the segment, all of the session's units.
    assert first[0]["spikes"].shape == (4, 25, proc.num_neurons)
    assert first[0]["forward_spikes"].shape == (4, 5, proc.num_total_neurons)


def test_tiled_trials_bin_like_the_processor(ndt_run, toy_corpus):
    """The evaluation trials equal processor.bin_segment on the same windows (spike counts conserved)."""
    from poyo_hf.models.ndt import NdtProcessor

    proc = NdtProcessor.from_pretrained(ndt_run[0] / "model")
    seg = Corpus.from_sources([str(toy_corpus)]).segments("valid")[0]
    trials = tiled_trials([seg], trial_length(proc))
    assert trials and all(t0 + trial_length(proc) <= seg.end + 1e-9 for _, t0 in trials)
    batch = bin_trials(proc, trials)
    t0 = trials[0][1]
    inside = (seg.spike_times >= t0) & (seg.spike_times < t0 + trial_length(proc))
    total = batch["spikes"][0].sum() + batch["heldout_spikes"][0].sum() + batch["forward_spikes"][0].sum()
    assert int(total) == int(inside.sum())


def test_stock_trainer_trains_ndt(ndt_run, toy_corpus, tmp_path):
    """NDT computes its own loss, so the stock Trainer needs nothing but a collator."""
    from transformers import Trainer, TrainingArguments

    from poyo_hf.models.ndt import NdtForMaskedModeling, NdtProcessor

    proc = NdtProcessor.from_pretrained(ndt_run[0] / "model")
    model = NdtForMaskedModeling.from_pretrained(ndt_run[0] / "model")
    segs = Corpus.from_sources([str(toy_corpus)]).segments("train")
    trials = tiled_trials(segs, trial_length(proc))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(
        output_dir=str(tmp_path / "tr"),
        per_device_train_batch_size=8,
        max_steps=5,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        remove_unused_columns=False,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=trials, data_collator=lambda items: dict(bin_trials(proc, items))
    )
    out = trainer.train()
    assert np.isfinite(out.training_loss)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "readout.weight" in changed
