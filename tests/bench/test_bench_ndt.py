"""`poyo-hf bench ndt`'s training rows: the same NDT on poyo_hf's CPU kernels and on plain torch layers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from poyo_hf.bench.ndt import mc_maze_model, plain_torch_layers
from poyo_hf.models.ndt import modeling_ndt as mn
from poyo_hf.models.poyo.cpu_kernels import PoyoLinear
from poyo_hf.models.poyo.modeling_poyo import PoyoDropout


def test_plain_torch_layers_builds_the_same_weights_on_torch_layers_and_restores():
    ours, _ = mc_maze_model(None, seed=1)
    saved = mn._Linear, mn._Dropout, mn._cpu_dropout_attention
    with plain_torch_layers():
        plain, _ = mc_maze_model(None, seed=1)
        assert mn._cpu_dropout_attention is None
    assert (mn._Linear, mn._Dropout, mn._cpu_dropout_attention) == saved
    kinds = {type(m) for m in plain.modules()}
    assert torch.nn.Linear in kinds and torch.nn.Dropout in kinds and not {PoyoLinear, PoyoDropout} & kinds
    assert {PoyoLinear, PoyoDropout} <= {type(m) for m in ours.modules()}
    theirs = plain.state_dict()
    assert ours.state_dict().keys() == theirs.keys()
    for name, p in ours.state_dict().items():
        assert torch.equal(p, theirs[name]), name


def test_bench_ndt_training_rows_and_json():
    res = subprocess.run(
        [sys.executable, "-m", "poyo_hf.cli", "bench", "ndt", "--skip-quality", "--runs", "3", "--repeats", "1",
         "--band", "0", "--train-steps", "2", "--train-batch", "2", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["train_batch"] == 2 and r["train_steps"] == 2
    assert r["ndt_train_step_ms"] > 0 and r["plain_train_step_ms"] > 0
    assert r["train_speedup_vs_plain"] == pytest.approx(r["plain_train_step_ms"] / r["ndt_train_step_ms"])
    assert "same model on plain torch layers" in res.stdout and r["ndt_p50_ms"] > 0
