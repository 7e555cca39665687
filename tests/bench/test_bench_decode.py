"""`poyo-hf bench decode` on a tiny corpus: the table, the JSON line and the nesting of the runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_bench_decode_smoke(tmp_path):
    out = tmp_path / "bench"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "poyo_hf.cli",
            "bench",
            "decode",
            "--sessions",
            "1,2",
            "--animals",
            "2",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--units",
            "20",
            "30",
            "--trials",
            "10",
            "--threads",
            "1",
            "--output-dir",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "N sessions" in res.stdout and "Wiener R2" in res.stdout
    result = json.loads(res.stdout.strip().splitlines()[-1])
    rows = {r["n_sessions"]: r for r in result["rows"]}
    assert set(rows) == {1, 2}
    # Every larger run contains the smaller one's sessions; the Wiener filter is fit per session on
    # the same data, so session 0's baseline is the same number in both runs.
    assert set(rows[1]["poyo_r2_per_session"]) < set(rows[2]["poyo_r2_per_session"])
    assert rows[1]["wiener_r2_session0"] == pytest.approx(rows[2]["wiener_r2_session0"], abs=1e-12)
    assert rows[2]["poyo_r2_mean"] == pytest.approx(sum(rows[2]["poyo_r2_per_session"].values()) / 2)
    # Two sessions from two different animals (round-robin order).
    subjects = {
        json.loads((out / "data" / f"session_{i:02d}" / "poyo_dataset.json").read_text())["sessions"][0]["subject_id"]
        for i in range(2)
    }
    assert len(subjects) == 2
    assert Path(result["plot"]).stat().st_size > 1000


def test_bench_decode_rejects_bad_counts():
    res = subprocess.run(
        [sys.executable, "-m", "poyo_hf.cli", "bench", "decode", "--sessions", "0,4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "session counts must be >= 1" in res.stderr
