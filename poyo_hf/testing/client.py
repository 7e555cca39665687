"""Run Hub-client code in a fresh interpreter and collect a JSON report of named checks.

Hub clients read ``HF_ENDPOINT`` when first imported (see :mod:`poyo_hf.testing.hub_env`), so the
tests run them in a subprocess. The code there defines checks with the ``@check("name")``
decorator from :data:`CHECK_PRELUDE`; each records its returned observations, or its
traceback, so one failing check does not hide the others. Like the rest of this package, this
module imports no client library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from typing import Any

__all__ = ["CHECK_PRELUDE", "check_result", "run_checks"]

CHECK_PRELUDE = textwrap.dedent(
    """
    import json, os, sys, traceback
    RESULTS = {}

    def check(name):
        def run(fn):
            try:
                RESULTS[name] = {"ok": True, **(fn() or {})}
            except Exception:
                RESULTS[name] = {"ok": False, "error": traceback.format_exc()}
        return run
    """
)
_EPILOGUE = '\nprint("RESULTS=" + json.dumps(RESULTS))\n'


def run_checks(
    body: str,
    env: Mapping[str, str],
    cwd: str | os.PathLike[str],
    *,
    prelude: str = "",
    timeout: float = 300,
) -> dict[str, Any]:
    """Run :data:`CHECK_PRELUDE` + ``prelude`` + ``body`` with ``sys.executable`` in ``cwd``
    under ``env``, and return ``{check name: {"ok": bool, ...observations or "error"}}``.

    Raises AssertionError (a test failure) with the client's stderr if the process crashed or
    printed no report."""
    code = CHECK_PRELUDE + textwrap.dedent(prelude) + textwrap.dedent(body) + _EPILOGUE
    proc = subprocess.run(
        [sys.executable, "-c", code], env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS=")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"client crashed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    report: dict[str, Any] = json.loads(lines[-1][len("RESULTS=") :])
    return report


def check_result(report: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The observations of check ``name``; AssertionError with the client traceback if it raised."""
    result: dict[str, Any] = report[name]
    if not result["ok"]:
        raise AssertionError(f"client check {name!r} raised:\n{result['error']}")
    return result
