"""`poyo-hf bench fewshot` smoke run: a 3-step cached base, one label count, the table and JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_bench_fewshot_smoke(tmp_path):
    out = tmp_path / "fs"
    cmd = [
        sys.executable,
        "-m",
        "poyo_hf.cli",
        "bench",
        "fewshot",
        "--output-dir",
        str(out),
        "--base-steps",
        "3",
        "--trials",
        "1",
        "--methods",
        "unit-id,scratch,wiener",
        "--seeds",
        "1",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--threads",
        "1",
        "--json",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "unit-id" in res.stdout and "wiener" in res.stdout
    result = json.loads(res.stdout.strip().splitlines()[-1])
    rows = result["rows"]
    # One row per (held-out kind, K, method): a new session of a seen animal and a new animal.
    assert {(r["kind"], r["k"], r["method"]) for r in rows} == {
        (kind, 1, m) for kind in ("new_session", "new_animal") for m in ("unit-id", "scratch", "wiener")
    }
    for r in rows:
        assert r["min"] <= r["mean"] <= r["max"]
    assert Path(result["plot"]).stat().st_size > 1000
    # The base is cached: a second run reuses it instead of pretraining again.
    assert (out / "base" / "model" / "model.safetensors").is_file()
