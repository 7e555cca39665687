"""The `poyo-hf` command: help everywhere, the demo, and a benchmark smoke run."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from poyo_hf.cli import COMMANDS, main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "poyo_hf.cli", *args], capture_output=True, text=True, timeout=600)


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command):
    res = run_cli(command, "--help")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage" in res.stdout.lower()


def test_unknown_command_is_an_error(capsys):
    assert main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def test_demo_runs_and_round_trips():
    res = run_cli("demo", "--units", "20")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "round trip identical: True" in res.stdout


def test_bench_model_prints_a_table_and_json():
    res = run_cli("bench", "model", "--steps", "1", "--latency-runs", "2", "--windows", "4", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["ours_train_steps_per_s"] > 0 and result["ours_latency_p50_ms"] > 0
    # The floor runs a subset of the forward's work (its matrix products alone).
    assert 0 < result["matmul_floor_p50_ms"] < result["ours_latency_p50_ms"]
    assert "matrix products only (floor)" in res.stdout
    assert result["cpu_dropout_kernels"] is (shutil.which("c++") is not None or shutil.which("g++") is not None)
    assert result["onednn_linear"] is (
        torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")
    )
    assert "train steps/s" in res.stdout and "samples/s" in res.stdout
    assert result["device"] == "cpu" and result["autocast"] == "none"
    assert result["ours_train_samples_per_s"] == pytest.approx(4 * result["ours_train_steps_per_s"])
    try:
        import torch_brain  # noqa: F401
    except ImportError:
        return
    assert result["ref_train_steps_per_s"] > 0 and "torch_brain" in res.stdout
    assert result["ref_train_samples_per_s"] == pytest.approx(4 * result["ref_train_steps_per_s"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_model_refuses_cuda_without_cuda(capsys):
    from poyo_hf.bench import model as bench_model

    with pytest.raises(SystemExit):
        bench_model.main(["--device", "cuda", "--steps", "1"])
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    with pytest.raises(ValueError, match="CUDA is not available"):
        bench_model.run(steps=1, latency_runs=1, n_windows=1, device="cuda")
