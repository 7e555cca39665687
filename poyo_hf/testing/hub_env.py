"""Environment for a Hub client process that must talk to the loopback Hub.

Why a helper: huggingface_hub, transformers and datasets read ``HF_ENDPOINT`` (and the cache and
offline settings) once, when they are first imported. A test that starts a loopback Hub therefore
cannot point an already-imported client at it; it has to either

* run the client code in a subprocess with ``env=hub_environment(url, tmp_path)`` (recommended:
  pytest itself may already have imported those libraries through another test), or
* set these variables in ``os.environ`` before the first import of any of them, which
  :func:`hub_clients_imported` lets a caller check.

Like ``hub_server``, this module imports none of the client libraries.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["HUB_CLIENT_MODULES", "hub_clients_imported", "hub_environment"]

HUB_CLIENT_MODULES: tuple[str, ...] = ("huggingface_hub", "transformers", "datasets")
"""Libraries that read the Hub endpoint at import time."""


def hub_environment(
    url: str,
    tmp_home: str | os.PathLike[str],
    *,
    base: Mapping[str, str] | None = None,
    etag_timeout_s: int = 5,
) -> dict[str, str]:
    """Environment variables for a Hub client process that uses the loopback Hub at ``url``.

    Args:
        url: the server URL, e.g. ``"http://127.0.0.1:54321"`` (from ``start_hub``).
        tmp_home: a fresh directory for ``HF_HOME``; it holds the hub, datasets and xet caches,
            so tests neither read nor pollute the user's cache.
        base: environment to start from; ``os.environ`` by default (so ``PATH``/``PYTHONPATH``
            survive). Pass ``{}`` for only the Hub variables.
        etag_timeout_s: ``HF_HUB_ETAG_TIMEOUT`` in whole seconds (huggingface_hub parses it with
            ``int()``, so ``"5.0"`` would crash its import); the loopback server answers in
            milliseconds, so a small value only bounds how long a broken test waits.

    Returns:
        A new dict: ``base`` plus the Hub variables. Notable choices:

        * ``HF_TOKEN=dummy``: write calls need a token; the loopback Hub accepts any.
        * ``HF_HUB_DISABLE_XET=1``: hf_xet would upload/download through a Xet CAS service the
          loopback Hub does not provide; disabling it selects the plain LFS protocol.
        * ``HF_HUB_OFFLINE=0`` (and the datasets/transformers equivalents): offline mode,
          which unit tests often set globally, would stop the clients before any request.
        * ``NO_PROXY`` gains ``127.0.0.1,localhost`` so a proxy in the environment is bypassed.
    """
    env = dict(os.environ if base is None else base)
    home = Path(tmp_home)
    no_proxy = ",".join(filter(None, [env.get("NO_PROXY") or env.get("no_proxy"), "127.0.0.1", "localhost"]))
    env.update(
        {
            "HF_ENDPOINT": url.rstrip("/"),
            "HF_TOKEN": "dummy",
            "HF_HOME": str(home),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_ETAG_TIMEOUT": str(int(etag_timeout_s)),
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_DATASETS_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }
    )
    # Variables that would send the clients elsewhere than HF_HOME or the loopback Hub.
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE", "HF_TOKEN_PATH", "HF_XET_CACHE"):
        env.pop(name, None)
    return env


def hub_clients_imported() -> list[str]:
    """Client libraries already imported in this process (too late to change their endpoint)."""
    return [name for name in HUB_CLIENT_MODULES if name in sys.modules]
