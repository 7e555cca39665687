"""`poyo-hf adapt`: vocabulary growth, freezing guarantees after a Trainer run, the stitched R^2 of
compute_metrics, adaptation improving R^2 on a held-out session, session deltas and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from poyo_hf import PoyoForDecoding, PoyoProcessor
from poyo_hf.data.converters import from_arrays
from poyo_hf.data.io import write_dataset
from poyo_hf.data.synthetic import SimulatorConfig, simulate_session
from poyo_hf.training.adapt import (
    EMBEDDING_PARAMS,
    AdaptArguments,
    adapt,
    add_new_session,
    limit_train_segments,
    prepare,
)
from poyo_hf.training.session_delta import load_session_checkpoint, save_session_delta

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-poyo"
# Two sessions of one synthetic animal: session 0 pretrains the small base, session 1 is new.
SIM = SimulatorConfig.small(seed=21, n_animals=1, sessions_per_animal=2, units_range=(40, 50))


def _args(base, data, out, **kw) -> AdaptArguments:
    defaults = dict(batch_size=8, progress=False, plots=False, logging_steps=1, seed=0)
    defaults.update(kw)
    return AdaptArguments(base=str(base), data=str(data), output_dir=str(out), **defaults)


@pytest.fixture(scope="module")
def new_session(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapt") / "new_session"
    write_dataset([simulate_session(SIM, 0, 1)], out, max_segment_s=20.0)
    return out


def _window_batch(processor, session_id: str, units: list[str], seed: int = 0):
    rng = np.random.default_rng(seed)
    n = 60
    return processor(
        {
            "session_id": session_id,
            "spike_times": np.sort(rng.uniform(0, 1, n)),
            "spike_unit_ids": rng.choice(units, n),
            "output_timestamps": np.linspace(0, 1, 11),
        }
    )


def test_growing_the_vocabulary_keeps_old_rows_and_old_outputs():
    model = PoyoForDecoding.from_pretrained(FIXTURE).eval()
    proc = PoyoProcessor.from_pretrained(FIXTURE)
    old_units, old_sessions = model.poyo.unit_emb.weight.clone(), model.poyo.session_emb.weight.clone()
    batch = _window_batch(proc, "sess_a", proc.session_units["sess_a"])
    with torch.no_grad():
        before = model(**batch).predictions
    units, old = add_new_session(model, proc, "new", ["n0", "n1", "n2"])
    assert units == ["n0", "n1", "n2"] and old == {"units": 9, "sessions": 3}
    proc.check_config(model.config)
    assert model.poyo.unit_emb.weight.shape[0] == 12 and model.poyo.session_emb.weight.shape[0] == 4
    assert torch.equal(model.poyo.unit_emb.weight[:9], old_units)
    assert torch.equal(model.poyo.session_emb.weight[:3], old_sessions)
    with torch.no_grad():
        assert torch.equal(model(**batch).predictions, before)  # old sessions decode exactly as before
        new_out = model(**_window_batch(proc, "new", units)).predictions
    assert torch.isfinite(new_out).all()


def test_limit_train_segments_keeps_the_first_trials(new_session):
    from poyo_hf.training.corpus import Corpus

    segs = Corpus.from_sources([str(new_session)]).segments("train")
    ends = np.sort(np.concatenate([s.trial_end for s in segs]))
    starts = np.sort(np.concatenate([s.trial_start for s in segs]))
    kept = limit_train_segments(segs, num_trials=3)
    assert sum(s.trial_start.size for s in kept) == 3
    assert max(s.end for s in kept) == pytest.approx(ends[2])
    assert all(s.spike_times.size == 0 or s.spike_times.max() < ends[2] for s in kept)
    assert min(s.start for s in kept) <= starts[0]
    secs = limit_train_segments(segs, num_seconds=7.5)
    assert sum(s.duration for s in secs) == pytest.approx(7.5)
    full = limit_train_segments(segs)
    assert sum(s.duration for s in full) == pytest.approx(sum(s.duration for s in segs))


def test_unit_identification_trains_only_the_new_rows(new_session, tmp_path):
    base = PoyoForDecoding.from_pretrained(FIXTURE)
    # A large weight decay and learning rate: if decay reached the base's rows or a frozen
    # tensor, they would move visibly.
    res = adapt(
        _args(
            FIXTURE,
            new_session,
            tmp_path / "ui",
            mode="unit-identification",
            num_train_trials=4,
            max_steps=6,
            learning_rate=5e-2,
            weight_decay=0.5,
            unit_dropout=False,
        )
    )
    assert res["steps"] == 6 and res["n_train_trials"] == 4
    adapted = load_file(str(tmp_path / "ui" / "model" / "model.safetensors"))
    before = base.state_dict()
    for name, tensor in before.items():
        if name in EMBEDDING_PARAMS:
            n_old = tensor.shape[0]
            assert torch.equal(adapted[name][:n_old], tensor), name  # the base's rows: bit-identical
            assert adapted[name].shape[0] > n_old
        else:
            assert torch.equal(adapted[name], tensor), name  # frozen: bit-identical
    info = json.loads((tmp_path / "ui" / "model" / "training_info.json").read_text())
    assert info["kind"] == "unit-identification" and info["base_model"] == str(FIXTURE)
    assert info["base_revision"] is None and info["datasets"][0]["synthetic"] is True
    assert info["compute"]["steps"] == 6 and info["compute"]["train_windows_seen"] > 0
    # Trainer's compute_metrics stitches exactly like evaluate_decoder.
    assert res["trainer_eval_r2"] == pytest.approx(res["r2"], abs=1e-9)
    saved = json.loads((tmp_path / "ui" / "model" / "eval_results.json").read_text())
    assert saved["r2"] == pytest.approx(res["r2"]) and "wiener_r2" in saved
    new_units = 1 + (adapted["poyo.unit_emb.weight"].shape[0] - before["poyo.unit_emb.weight"].shape[0])
    assert res["trainable_parameters"] == new_units * base.config.hidden_size


def test_new_rows_change_and_delta_round_trip_is_exact(new_session, tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "ui"
    res = adapt(
        _args(
            FIXTURE,
            new_session,
            out,
            mode="unit-identification",
            num_train_trials=3,
            max_steps=4,
            learning_rate=1e-2,
            unit_dropout=False,
        )
    )
    # The new rows moved away from their initial draw: compare with the same growth, untrained.
    torch.manual_seed(0)
    prep = prepare(_args(FIXTURE, new_session, tmp_path / "again", num_train_trials=3))
    init = prep["model"].poyo.unit_emb.weight.detach()
    trained = load_file(str(out / "model" / "model.safetensors"))["poyo.unit_emb.weight"]
    n_old = 9
    assert torch.equal(trained[:n_old], init[:n_old])
    changed = (trained[n_old:] != init[n_old:]).any(dim=1)
    assert changed.all(), f"{int((~changed).sum())} new rows never trained"

    # The delta: only the new rows + vocabulary, loaded on top of its base in one call.
    full = PoyoForDecoding.from_pretrained(out / "model").eval()
    full_proc = PoyoProcessor.from_pretrained(out / "model")
    model, proc = load_session_checkpoint(out / "session_delta")
    assert proc.unit_vocab == full_proc.unit_vocab and proc.session_vocab == full_proc.session_vocab
    sid = res["session_id"]
    batch = _window_batch(proc, sid, proc.session_units[sid], seed=3)
    with torch.no_grad():
        assert torch.equal(model(**batch).predictions, full(**batch).predictions)
    for k, v in full.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert 0 < res["delta_size_ratio"] < 1
    delta_bytes = sum(
        (out / "session_delta" / f).stat().st_size for f in ("session_delta.safetensors", "session_delta.json")
    )
    assert res["delta_bytes"] == delta_bytes

    # A base that changed since is refused, not silently used.
    moved = tmp_path / "moved_base"
    shutil.copytree(FIXTURE, moved)
    tampered = PoyoForDecoding.from_pretrained(moved)
    with torch.no_grad():
        tampered.readouts["hand_vel"].bias.add_(1.0)
    tampered.save_pretrained(moved)
    with pytest.raises(ValueError, match="not the one this delta was made on"):
        load_session_checkpoint(out / "session_delta", base=moved)
    # A model whose trunk changed is not a session delta.
    with torch.no_grad():
        full.readouts["hand_vel"].bias.add_(1.0)
    with pytest.raises(ValueError, match="beyond new embedding rows"):
        save_session_delta(full, full_proc, str(FIXTURE), None, tmp_path / "bad_delta")


def test_full_finetune_unfreezes_after_the_unit_identification_phase(new_session, tmp_path):
    base = PoyoForDecoding.from_pretrained(FIXTURE).state_dict()
    trunk = [k for k in base if k not in EMBEDDING_PARAMS]
    # 4 trials -> a handful of windows, batch 8 -> 1 step per epoch: UI for 2 epochs = 2 steps.
    res = adapt(
        _args(
            FIXTURE,
            new_session,
            tmp_path / "ft",
            mode="full-finetune",
            num_train_trials=4,
            max_steps=5,
            ui_epochs=2,
            learning_rate=1e-2,
            unit_dropout=False,
        )
    )
    steps_per_epoch = -(-res["n_train_windows_per_epoch"] // 8)
    assert res["unfrozen_at_step"] == 2 * steps_per_epoch
    tuned = load_file(str(tmp_path / "ft" / "model" / "model.safetensors"))
    assert any(not torch.equal(tuned[k], base[k]) for k in trunk)
    for name in EMBEDDING_PARAMS:  # the base's own rows never train (other sessions' units)
        assert torch.equal(tuned[name][: base[name].shape[0]], base[name])
    assert not (tmp_path / "ft" / "session_delta").exists()
    # UI phase covering the whole run: the trunk stays bit-identical.
    adapt(
        _args(
            FIXTURE,
            new_session,
            tmp_path / "ft2",
            mode="full-finetune",
            num_train_trials=4,
            max_steps=3,
            ui_epochs=100,
            learning_rate=1e-2,
            unit_dropout=False,
        )
    )
    tuned2 = load_file(str(tmp_path / "ft2" / "model" / "model.safetensors"))
    assert all(torch.equal(tuned2[k], base[k]) for k in trunk)


def test_a_short_trainer_run_improves_r2_on_the_held_out_session(new_session, tmp_path):
    # The committed tiny base is untrained, so the route that can learn in a few CPU steps is full
    # fine-tuning; held-out R^2 is measured before and after on the same stitched test windows.
    # (`poyo-hf bench fewshot` measures unit identification from a pretrained base.)
    res = adapt(
        _args(
            FIXTURE,
            new_session,
            tmp_path / "ft",
            mode="full-finetune",
            max_steps=40,
            batch_size=8,
            learning_rate=1e-2,
            ui_epochs=0,
            unit_dropout=False,
            save_delta=False,
        )
    )
    assert res["unfrozen_at_step"] == 0
    assert res["r2"] > res["r2_before_adaptation"] + 0.1, (res["r2_before_adaptation"], res["r2"])


# ------------------------------------------------------------------------------ bad input


def _one_session(
    tmp_path: Path,
    name: str,
    *,
    session_id: str = "newsess",
    dim: int = 2,
    units=None,
    nan_train: bool = False,
    prefix: bool = True,
) -> Path:
    rng = np.random.default_rng(0)
    units = units or [f"u{i}" for i in range(5)]
    spikes = np.sort(rng.uniform(0, 20, 400))
    t = np.arange(0, 20, 0.01)
    beh = rng.normal(size=(t.size, dim))
    if nan_train:
        beh[t < 14] = np.nan
    rec = from_arrays(
        spikes,
        rng.choice(units, spikes.size),
        beh,
        t,
        session_id=session_id,
        units=units,
        splits={"train": [(0, 14)], "test": [(14, 20)]},
        trials=(np.array([0.0, 7.0]), np.array([6.0, 13.0])),
        prefix_unit_ids=prefix,
    )
    out = tmp_path / name
    write_dataset([rec], out)
    return out


def test_bad_input_is_refused_before_training(new_session, tmp_path):
    # Unit ids that collide with the base's (sess_a/u0 ...): refused, or namespaced on request.
    clash = _one_session(tmp_path, "clash", units=["sess_a/u0", "sess_a/u1", "x"], prefix=False)
    with pytest.raises(ValueError, match="--namespace_units"):
        prepare(_args(FIXTURE, clash, tmp_path / "o"))
    prep = prepare(_args(FIXTURE, clash, tmp_path / "o", namespace_units=True))
    assert prep["units"] == ["newsess/sess_a/u0", "newsess/sess_a/u1", "newsess/x"]
    # A session the base already knows.
    known = _one_session(tmp_path, "known", session_id="sess_a")
    with pytest.raises(ValueError, match="already in the base's vocabulary"):
        prepare(_args(FIXTURE, known, tmp_path / "o"))
    # Zero labelled windows.
    with pytest.raises(ValueError, match="no labelled windows"):
        prepare(_args(FIXTURE, new_session, tmp_path / "o", num_train_trials=0))
    with pytest.raises(ValueError, match="no labelled behaviour"):
        prepare(_args(FIXTURE, _one_session(tmp_path, "nan", nan_train=True), tmp_path / "o"))
    with pytest.raises(ValueError, match="only 2 trials"):
        prepare(_args(FIXTURE, _one_session(tmp_path, "few"), tmp_path / "o", num_train_trials=3))
    # A readout whose dimension differs from the new behaviour.
    with pytest.raises(ValueError, match="has 2 output dims but the new session's behaviour"):
        prepare(_args(FIXTURE, _one_session(tmp_path, "3d", dim=3), tmp_path / "o"))
    # Freezing everything.
    with pytest.raises(ValueError, match="nothing would be trained"):
        prepare(_args(FIXTURE, new_session, tmp_path / "o", freeze=["_emb"]))
    with pytest.raises(ValueError, match="freezes every parameter"):
        prepare(_args(FIXTURE, new_session, tmp_path / "o", mode="full-finetune", freeze=["."]))
    with pytest.raises(ValueError, match="matches no parameter"):
        prepare(_args(FIXTURE, new_session, tmp_path / "o", freeze=["no_such_layer"]))
    with pytest.raises(ValueError, match="--mode"):
        prepare(_args(FIXTURE, new_session, tmp_path / "o", mode="lora"))
    assert not (tmp_path / "o").exists()  # nothing was written by a refused run


def test_cli_reports_bad_input_as_an_error(new_session, tmp_path, capsys):
    from poyo_hf.cli import main

    rc = main(["adapt", str(FIXTURE), str(new_session), "--output_dir", str(tmp_path / "o"), "--num-train-trials", "0"])
    assert rc == 2
    assert "no labelled windows" in capsys.readouterr().err


# ------------------------------------------------------------------------------ loopback Hub

HUB_CLIENT = """
import json, sys, traceback
import numpy as np, torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download
out = {}
try:
    api = HfApi()
    api.create_repo("tester/tiny-base")
    base_sha = api.upload_folder(repo_id="tester/tiny-base", folder_path=sys.argv[1]).oid
    from poyo_hf.training.adapt import main
    rc = main(["tester/tiny-base", sys.argv[2], "--output_dir", sys.argv[3], "--max_steps", "2", "--batch_size", "8",
               "--num_train_trials", "3", "--plots", "false", "--progress", "false",
               "--push_to_hub", "tester/adapted", "--push_delta_to_hub", "tester/adapted-delta"])
    out["rc"] = rc
    out["base_sha"] = base_sha
    out["card_base_model"] = ModelCard.load("tester/adapted").data.base_model
    out["delta_card_base_model"] = ModelCard.load("tester/adapted-delta").data.base_model
    info = json.loads(open(hf_hub_download("tester/adapted", "training_info.json")).read())
    out["info"] = {k: info[k] for k in ("kind", "base_model", "base_revision")}
    from transformers import AutoModel, AutoProcessor
    from poyo_hf.training.session_delta import load_session_checkpoint
    full = AutoModel.from_pretrained("tester/adapted").eval()
    proc = AutoProcessor.from_pretrained("tester/adapted")
    model, dproc = load_session_checkpoint("tester/adapted-delta")
    sid = dproc.session_vocab[-1]
    rng = np.random.default_rng(0)
    units = dproc.session_units[sid]
    window = {"session_id": sid, "spike_times": np.sort(rng.uniform(0, 1, 50)),
              "spike_unit_ids": rng.choice(units, 50), "output_timestamps": np.linspace(0, 1, 9)}
    with torch.no_grad():
        out["equal"] = bool(torch.equal(full(**proc(window)).predictions, model(**dproc(window)).predictions))
    out["same_vocab"] = proc.unit_vocab == dproc.unit_vocab
except Exception:
    out["error"] = traceback.format_exc()
print("RESULT=" + json.dumps(out))
"""


def test_adapted_checkpoint_and_delta_round_trip_through_the_loopback_hub(new_session, tmp_path):
    import subprocess
    import sys

    from poyo_hf.testing.hub_env import hub_environment
    from poyo_hf.testing.hub_server import serve_hub

    (tmp_path / "home").mkdir()
    (tmp_path / "cwd").mkdir()  # empty cwd: the bare repo ids must not match local folders
    with serve_hub() as server:
        env = hub_environment(server.url, tmp_path / "home")
        env["OMP_NUM_THREADS"] = "1"
        proc = subprocess.run(
            [sys.executable, "-c", HUB_CLIENT, str(FIXTURE), str(new_session), str(tmp_path / "run")],
            env=env,
            cwd=tmp_path / "cwd",
            capture_output=True,
            text=True,
            timeout=300,
        )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT=")]
    assert lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT=") :])
    assert "error" not in out, out["error"]
    assert out["rc"] == 0
    assert out["card_base_model"] == "tester/tiny-base" == out["delta_card_base_model"]
    assert out["info"] == {
        "kind": "unit-identification",
        "base_model": "tester/tiny-base",
        "base_revision": out["base_sha"],
    }
    assert out["equal"] and out["same_vocab"]
