"""`poyo-hf pretrain` / `evaluate` end to end on a tiny corpus: learning, exact resume after
SIGKILL, two processes, evaluation outputs and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from poyo_hf.testing.shapes import TINY_POYO_OVERRIDES
from poyo_hf.training.evaluate import EvaluateArguments, evaluate
from poyo_hf.training.pretrain import PretrainArguments, train

TINY_OVERRIDES = json.dumps(TINY_POYO_OVERRIDES)  # the tiny model shape, as the --config_overrides string


def base_args(corpus: Path, out: Path, **kw) -> list[str]:
    args = {
        "datasets": str(corpus),
        "output_dir": str(out),
        "config_overrides": TINY_OVERRIDES,
        "batch_size": "8",
        "learning_rate": "3e-3",
        "logging_steps": "1",
        "progress": "false",
        "plots": "false",
        "seed": "3",
    }
    args.update({k: str(v) for k, v in kw.items()})
    out_list = []
    for k, v in args.items():
        out_list += [f"--{k}", v]
    return out_list


def run_cli(argv: list[str], env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "poyo_hf.training.pretrain", *argv], capture_output=True,
                          text=True, env=env, timeout=timeout)


def losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_training_lowers_the_loss_and_exports_a_checkpoint(toy_corpus, tmp_path):
    from transformers import AutoModel, AutoProcessor

    out = tmp_path / "run"
    args = PretrainArguments(
        datasets=[str(toy_corpus)], output_dir=str(out), config_overrides=TINY_OVERRIDES, max_steps=300,
        batch_size=8, learning_rate=3e-3, logging_steps=1, progress=False, plots=True, seed=0, unit_dropout=False,
    )
    results = train(args)
    curve = losses(out)
    assert len(curve) == 300
    first, last = sum(curve[:20]) / 20, sum(curve[-20:]) / 20
    assert last < 0.75 * first, (first, last)
    # Every metric is logged, including how long the loop waited for data.
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("loss", "lr", "grad_norm", "windows_per_s", "spikes_per_s", "data_wait_fraction", "epoch"):
        assert key in row
    # The export reloads through the Auto classes; predictions come back in physical units.
    model = AutoModel.from_pretrained(out / "model")
    proc = AutoProcessor.from_pretrained(out / "model")
    proc.check_config(model.config)
    summary = json.loads((toy_corpus / "poyo_dataset.json").read_text())
    assert model.config.target_std["hand_vel"] == pytest.approx(summary["behavior"]["stats"]["std"], rel=1e-6)
    saved = json.loads((out / "eval" / "results.json").read_text())
    assert saved["r2"] == pytest.approx(results["r2"])
    assert set(saved["r2_per_session"]) == {s["session_id"] for s in summary["sessions"]}
    assert "wiener_r2" in saved and len(results["plots"]) == 1
    assert all(Path(p).stat().st_size > 1000 for p in results["plots"])


def test_evaluate_command_scores_a_checkpoint(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    train(PretrainArguments(datasets=[str(tiny_corpus)], output_dir=str(out), config_overrides=TINY_OVERRIDES,
                            max_steps=5, batch_size=8, progress=False, plots=False))
    res = evaluate(EvaluateArguments(checkpoint=str(out / "model"), datasets=[str(tiny_corpus)],
                                     output_dir=str(tmp_path / "eval"), split="valid", plots=True))
    assert -10 < res["r2"] < 1 and "wiener_r2" in res
    assert (tmp_path / "eval" / "results.json").is_file()
    assert len(list((tmp_path / "eval").glob("decoded_*.png"))) == 4
    # The same checkpoint evaluated on its training run's valid split gives the same number.
    again = json.loads((out / "eval" / "results.json").read_text())
    assert res["r2_per_session"] == pytest.approx(again["r2_per_session"])


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_corpus, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    common = dict(max_steps=24, save_steps=8, eval_split="valid")
    res = run_cli(base_args(tiny_corpus, full, prefetch_batches=0, **common))  # batches made in the loop
    assert res.returncode == 0, res.stderr[-3000:]
    # The interrupted run makes its batches in a worker process that runs ahead of training: its
    # checkpoints must still record the batches consumed, and the result equal the in-loop run's.
    proc = subprocess.Popen([sys.executable, "-m", "poyo_hf.training.pretrain",
                             *base_args(tiny_corpus, killed, prefetch_batches=2, **common)],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / "step_16" / "stream_state.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run never wrote its step-16 checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists()  # killed before the end
    res = run_cli(base_args(tiny_corpus, killed, resume="true", prefetch_batches=2, **common))
    assert res.returncode == 0, res.stderr[-3000:]
    a = load_file(full / "model" / "model.safetensors")
    b = load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6, msg=k)
    # The logged loss of the last steps is the same too.
    assert losses(killed)[-4:] == pytest.approx(losses(full)[-4:], rel=1e-5)


def test_two_processes_match_one_process_with_twice_the_batch(tiny_corpus, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    steps = 40
    res1 = run_cli(base_args(tiny_corpus, one, max_steps=steps, batch_size=16, learning_rate=2e-3))
    assert res1.returncode == 0, res1.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "poyo_hf.training.pretrain", *base_args(tiny_corpus, two, max_steps=steps, batch_size=8, learning_rate=2e-3)]
    res2 = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1"))
    assert res2.returncode == 0, res2.stderr[-3000:]
    run_config = json.loads((two / "run_config.json").read_text())
    assert run_config["world_size"] == 2
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == steps
    # Same global batch and LR: the curves agree within the noise of different window draws.
    mean_a, mean_b = sum(a[-10:]) / 10, sum(b[-10:]) / 10
    assert abs(mean_a - mean_b) / mean_a < 0.25, (mean_a, mean_b)
    assert abs(a[0] - b[0]) / a[0] < 0.25


def test_bad_input_fails_before_training(tiny_corpus, tmp_path):
    def args(**kw):
        base = dict(datasets=[str(tiny_corpus)], output_dir=str(tmp_path / "bad"), config_overrides=TINY_OVERRIDES,
                    max_steps=2, batch_size=4, progress=False, plots=False)
        base.update(kw)
        return PretrainArguments(**base)

    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        train(args(learning_rate=0.0))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        train(args(batch_size=0))
    with pytest.raises(ValueError, match="no dataset given"):
        train(args(datasets=[]))
    with pytest.raises(ValueError, match="eval_split"):
        train(args(eval_split="nope"))
    with pytest.raises(ValueError, match="prefetch_batches must be >= 0, got -1"):
        train(args(prefetch_batches=-1))
    assert not (tmp_path / "bad" / "checkpoints").exists()
    # A resume directory from a different configuration is refused before any training.
    train(args(max_steps=2, save_steps=1, output_dir=str(tmp_path / "r")))
    with pytest.raises(ValueError, match="different configuration"):
        train(args(max_steps=3, save_steps=1, output_dir=str(tmp_path / "r"), resume=True, learning_rate=1e-2))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(args(max_steps=3, output_dir=str(tmp_path / "r")))


def test_readout_dimension_mismatch_is_refused(tiny_corpus, tmp_path):
    from poyo_hf import PoyoConfig, PoyoForDecoding, PoyoProcessor

    cfg = PoyoConfig(**json.loads(TINY_OVERRIDES), readout_dims={"hand_vel": 3})
    PoyoForDecoding(cfg).save_pretrained(tmp_path / "base")
    PoyoProcessor.from_config(cfg).save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="has 2 dims but the checkpoint's readouts"):
        train(PretrainArguments(datasets=[str(tiny_corpus)], output_dir=str(tmp_path / "o"), init_from=str(tmp_path / "base"),
                                max_steps=2, progress=False))


def test_empty_split_is_refused(tmp_path):
    import numpy as np

    from poyo_hf.data.io import write_dataset
    from poyo_hf.data.synthetic import SimulatorConfig, simulate_corpus

    rec = simulate_corpus(SimulatorConfig.small(seed=2, n_animals=1, sessions_per_animal=1))[0]
    train_only = dict(rec.__dict__)
    starts = np.concatenate([np.asarray(s) for s, _ in rec.splits.values()])
    ends = np.concatenate([np.asarray(e) for _, e in rec.splits.values()])
    order = np.argsort(starts)
    train_only["splits"] = {"train": (starts[order], ends[order])}
    from poyo_hf.data.schema import SessionRecording

    write_dataset([SessionRecording(**train_only)], tmp_path / "ds")
    with pytest.raises(ValueError, match="'valid' split is empty"):
        train(PretrainArguments(datasets=[str(tmp_path / "ds")], output_dir=str(tmp_path / "o"),
                                config_overrides=TINY_OVERRIDES, max_steps=2, batch_size=4, progress=False))
