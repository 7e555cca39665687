"""The loopback Hub answers the real clients: huggingface_hub, datasets and transformers.

Why subprocesses: the client libraries read ``HF_ENDPOINT`` at import time, and this pytest
process may already have imported them, so every client call runs in a fresh interpreter with
``hub_environment(url, tmp_home)``. Interpreter start-up (torch + transformers take seconds) is
paid once per library group: one subprocess runs several checks and prints a JSON report, and
each test below asserts on its part of that report against the server's own state.

A few protocol details (Range, error headers, request parsing) are checked in-process with
urllib, which needs no client library at all.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from poyo_hf.testing.client import check_result, run_checks
from poyo_hf.testing.hub_env import hub_environment
from poyo_hf.testing.hub_server import HubServer, LoopbackHub, serve_hub

HUB_SERVER_FILE = Path(__file__).resolve().parents[1] / "poyo_hf" / "testing" / "hub_server.py"

# Helpers every client body here may use, after poyo_hf.testing.client's check prelude.
CLIENT_PRELUDE = textwrap.dedent(
    """
    import hashlib, pathlib, tempfile

    def big_payload():
        # 3 MiB of deterministic bytes: above the server's 1 MiB LFS threshold.
        return hashlib.sha256(b"poyo").digest() * (3 * 1024 * 1024 // 32)
    """
)


def big_payload() -> bytes:
    """Same bytes as the client prelude's ``big_payload``."""
    return hashlib.sha256(b"poyo").digest() * (3 * 1024 * 1024 // 32)


def run_client(body: str, server: HubServer, tmp: Path, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``body`` (after the prelude) in a fresh interpreter pointed at ``server``; return its report."""
    home = tmp / "hf_home"
    workdir = tmp / "cwd"  # empty cwd: a bare repo id must not match a local folder
    home.mkdir(parents=True)
    workdir.mkdir()
    env = hub_environment(server.url, home)
    env.update(extra_env or {})
    return run_checks(body, env, workdir, prelude=CLIENT_PRELUDE, timeout=240)


ok = check_result


@pytest.fixture(scope="module")
def hub_pair() -> Iterator[tuple[HubServer, HubServer]]:
    """A normal hub and a hub that refuses writes (with one seeded repo to try writing to)."""
    locked = LoopbackHub(refuse_writes=True)
    locked.create_repo("tester/locked")  # the Python API is the test's back door: not refused
    with serve_hub() as server, serve_hub(hub=locked) as locked_server:
        yield server, locked_server


# --------------------------------------------------------------------------------------------
# huggingface_hub: upload/download, exist_ok, error mapping, refusal, model cards
# --------------------------------------------------------------------------------------------

HF_HUB_CHECKS = """
from huggingface_hub import HfApi, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError,
)
api = HfApi()

@check("upload_download")
def _():
    url = api.create_repo("tester/m")
    folder = pathlib.Path(tempfile.mkdtemp())
    (folder / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (folder / "weights").mkdir()
    (folder / "weights" / "big.bin").write_bytes(big_payload())
    commit = api.upload_folder(repo_id="tester/m", folder_path=folder, commit_message="add weights")
    big = pathlib.Path(hf_hub_download("tester/m", "weights/big.bin")).read_bytes()
    cfg = pathlib.Path(hf_hub_download("tester/m", "config.json")).read_text()
    info = api.model_info("tester/m", files_metadata=True)
    return {
        "url_repo_id": url.repo_id,
        "commit_oid": commit.oid,
        "big_equal": big == big_payload(),
        "config": json.loads(cfg),
        "files": api.list_repo_files("tester/m"),
        "lfs_files": sorted(s.rfilename for s in info.siblings if s.lfs is not None),
        "sha": info.sha,
    }

@check("exist_ok")
def _():
    again = api.create_repo("tester/m", exist_ok=True)
    try:
        api.create_repo("tester/m")
        status = None
    except HfHubHTTPError as err:
        status = err.response.status_code
    return {"repo_id": again.repo_id, "status_without_exist_ok": status}

@check("errors")
def _():
    def error_of(fn):
        try:
            fn()
        except Exception as err:
            return {
                "type": type(err).__name__,
                "entry": isinstance(err, EntryNotFoundError),
                "repo": isinstance(err, RepositoryNotFoundError),
                "revision": isinstance(err, RevisionNotFoundError),
            }
        return None
    return {
        "missing_file": error_of(lambda: hf_hub_download("tester/m", "nope.json")),
        "missing_repo": error_of(lambda: hf_hub_download("tester/absent", "config.json")),
        "bad_revision": error_of(lambda: hf_hub_download("tester/m", "config.json", revision="nobranch")),
        "missing_repo_info": error_of(lambda: api.model_info("tester/absent")),
        "missing_folder": error_of(lambda: list(api.list_repo_tree("tester/m", path_in_repo="nofolder"))),
    }

@check("refuse")
def _():
    locked = HfApi(endpoint=os.environ["LOCKED_HUB_URL"])
    out = {}
    for name, call in {
        "upload": lambda: locked.upload_file(
            path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="tester/locked"
        ),
        "create": lambda: locked.create_repo("tester/new-one"),
    }.items():
        try:
            call()
            out[name] = None
        except HfHubHTTPError as err:
            out[name] = {"type": type(err).__name__, "status": err.response.status_code}
    return out

@check("model_card")
def _():
    api.create_repo("tester/carded")
    data = ModelCardData(
        library_name="poyo-hf", pipeline_tag="time-series-forecasting", tags=["neuroscience"], license="mit"
    )
    card = ModelCard(f"---\\n{data.to_yaml()}\\n---\\n\\n# Tiny decoder\\n\\nDecodes hand velocity.\\n")
    card.push_to_hub("tester/carded")
    loaded = ModelCard.load("tester/carded")
    return {
        "tags": loaded.data.tags,
        "pipeline_tag": loaded.data.pipeline_tag,
        "library_name": loaded.data.library_name,
        "text_equal": loaded.text == card.text,
    }
"""


@pytest.fixture(scope="module")
def hf_hub_report(hub_pair: tuple[HubServer, HubServer], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    server, locked = hub_pair
    return run_client(
        HF_HUB_CHECKS, server, tmp_path_factory.mktemp("hf_hub"), extra_env={"LOCKED_HUB_URL": locked.url}
    )


def test_upload_folder_then_download_round_trips_through_lfs(
    hf_hub_report: dict[str, Any], hub_pair: tuple[HubServer, HubServer]
) -> None:
    result = ok(hf_hub_report, "upload_download")
    hub = hub_pair[0].hub
    assert result["url_repo_id"] == "tester/m"
    assert result["big_equal"]
    assert result["config"] == {"hidden_size": 8}
    assert {"config.json", "weights/big.bin"} <= set(result["files"])
    assert result["lfs_files"] == ["weights/big.bin"]  # the 3 MiB file took the LFS route ...
    assert any(method == "PUT" and path.startswith("/_lfs/") for method, path, _ in hub.requests)
    assert hub.read_file("tester/m", "weights/big.bin") == big_payload()  # ... and arrived intact
    assert result["sha"] == result["commit_oid"] == hub.list_commits("tester/m")[0]
    assert not hub.server_errors


def test_create_repo_exist_ok(hf_hub_report: dict[str, Any]) -> None:
    result = ok(hf_hub_report, "exist_ok")
    assert result["repo_id"] == "tester/m"
    assert result["status_without_exist_ok"] == 409


def test_missing_file_repo_and_revision_map_to_client_exceptions(hf_hub_report: dict[str, Any]) -> None:
    result = ok(hf_hub_report, "errors")
    assert result["missing_file"]["entry"], result["missing_file"]
    assert result["missing_repo"]["repo"], result["missing_repo"]
    assert result["bad_revision"]["revision"], result["bad_revision"]
    assert result["missing_repo_info"]["repo"], result["missing_repo_info"]
    assert result["missing_folder"]["entry"], result["missing_folder"]


def test_refusing_hub_makes_uploads_raise_http_errors(
    hf_hub_report: dict[str, Any], hub_pair: tuple[HubServer, HubServer]
) -> None:
    result = ok(hf_hub_report, "refuse")
    assert result["upload"] == {"type": "HfHubHTTPError", "status": 403}
    assert result["create"] == {"type": "HfHubHTTPError", "status": 403}
    assert hub_pair[1].hub.list_files("tester/locked") == [".gitattributes"]
    assert not hub_pair[1].hub.repo_exists("tester/new-one")


def test_model_card_push_and_load(hf_hub_report: dict[str, Any]) -> None:
    result = ok(hf_hub_report, "model_card")
    assert result["tags"] == ["neuroscience"]
    assert result["pipeline_tag"] == "time-series-forecasting"
    assert result["library_name"] == "poyo-hf"
    assert result["text_equal"]


# --------------------------------------------------------------------------------------------
# datasets: push_to_hub, then load (streaming and not)
# --------------------------------------------------------------------------------------------

DATASET_ROWS = {
    "unit_index": [[0, 1, 2], [3], [1, 1]],
    "timestamps": [[0.0, 0.25, 0.5], [0.125], [0.75, 1.0]],
    "session": ["s1", "s1", "s2"],
}

DATASETS_CHECKS = f"""
import datasets
ROWS = {DATASET_ROWS!r}

@check("push_and_load")
def _():
    datasets.Dataset.from_dict(ROWS).push_to_hub("tester/ds")
    streamed = datasets.load_dataset("tester/ds", split="train", streaming=True)
    loaded = datasets.load_dataset("tester/ds", split="train")
    return {{"streamed": list(streamed), "loaded": loaded.to_dict(), "streaming_type": type(streamed).__name__}}
"""


def test_dataset_push_to_hub_then_load_streaming_and_not(hub_pair: tuple[HubServer, HubServer], tmp_path: Path) -> None:
    server = hub_pair[0]
    result = ok(run_client(DATASETS_CHECKS, server, tmp_path), "push_and_load")
    expected_rows = [dict(zip(DATASET_ROWS, values)) for values in zip(*DATASET_ROWS.values())]
    assert result["streaming_type"] == "IterableDataset"
    assert result["streamed"] == expected_rows
    assert result["loaded"] == DATASET_ROWS
    files = server.hub.list_files("tester/ds", repo_type="dataset")
    assert "README.md" in files and any(f.endswith(".parquet") for f in files)
    # Streaming read the parquet file through HTTP Range requests.
    assert any(status == 206 for method, path, status in server.hub.requests if path.endswith(".parquet"))
    assert not server.hub.server_errors


# --------------------------------------------------------------------------------------------
# transformers: push_to_hub / from_pretrained, pinned revisions, bare repo ids
# --------------------------------------------------------------------------------------------

TRANSFORMERS_CHECKS = """
import torch
from transformers import AutoModel, BertConfig, BertModel

CONFIG = BertConfig(
    vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=32, max_position_embeddings=16,
)

def tiny_bert(seed):
    torch.manual_seed(seed)
    return BertModel(CONFIG)

def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)

@check("round_trip_and_pinned_revision")
def _():
    first = tiny_bert(0)
    first_commit = first.push_to_hub("tester/bert")
    loaded_first = AutoModel.from_pretrained("tester/bert")
    second = tiny_bert(1)
    second.push_to_hub("tester/bert")
    latest = AutoModel.from_pretrained("tester/bert")
    # A fresh cache makes the server, not the local cache, serve the older commit.
    pinned = AutoModel.from_pretrained("tester/bert", revision=first_commit.oid, cache_dir=tempfile.mkdtemp())
    return {
        "first_round_trip": same_weights(first, loaded_first),
        "latest_is_second": same_weights(second, latest),
        "pinned_is_first": same_weights(first, pinned),
        "first_differs_from_second": not same_weights(first, second),
        "first_commit": first_commit.oid,
    }

@check("bare_repo_id")
def _():
    model = tiny_bert(2)
    commit = model.push_to_hub("tiny-bert")
    loaded = AutoModel.from_pretrained("tiny-bert")
    return {"same": same_weights(model, loaded), "commit_repo_id": commit.repo_url.repo_id}
"""


@pytest.fixture(scope="module")
def transformers_report(
    hub_pair: tuple[HubServer, HubServer], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    return run_client(TRANSFORMERS_CHECKS, hub_pair[0], tmp_path_factory.mktemp("transformers"))


def test_transformers_push_to_hub_from_pretrained_and_pinned_revision(
    transformers_report: dict[str, Any], hub_pair: tuple[HubServer, HubServer]
) -> None:
    result = ok(transformers_report, "round_trip_and_pinned_revision")
    assert result["first_round_trip"]
    assert result["first_differs_from_second"]
    assert result["latest_is_second"]
    assert result["pinned_is_first"]
    assert result["first_commit"] in hub_pair[0].hub.list_commits("tester/bert")
    assert not hub_pair[0].hub.server_errors


def test_bare_repo_id_round_trip(transformers_report: dict[str, Any], hub_pair: tuple[HubServer, HubServer]) -> None:
    result = ok(transformers_report, "bare_repo_id")
    assert result["same"]
    # As on the Hub, a bare name is created in the caller's namespace and served under both ids.
    assert result["commit_repo_id"] == "tester/tiny-bert"
    hub = hub_pair[0].hub
    assert hub.read_file("tiny-bert", "config.json") == hub.read_file("tester/tiny-bert", "config.json")


# --------------------------------------------------------------------------------------------
# Protocol details, in-process (no client library needed)
# --------------------------------------------------------------------------------------------


# Loopback traffic must not go through a proxy that the environment may configure.
NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, data: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one request; HTTP errors are answers too."""
    request = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with NO_PROXY_OPENER.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture()
def seeded() -> Iterator[HubServer]:
    hub = LoopbackHub()
    hub.create_repo("poyo-1")  # bare id: stored as tester/poyo-1
    hub.commit("poyo-1", {"config.json": b'{"a": 1}', "data/x.bin": bytes(range(100))})
    with serve_hub(hub=hub) as server:
        yield server


def test_resolve_serves_ranges_and_hub_headers(seeded: HubServer) -> None:
    url = f"{seeded.url}/poyo-1/resolve/main/data/x.bin"
    status, headers, body = http(url, headers={"Range": "bytes=10-19"})
    assert (status, body) == (206, bytes(range(10, 20)))
    assert headers["Content-Range"] == "bytes 10-19/100"
    assert headers["X-Repo-Commit"] == seeded.hub.list_commits("poyo-1")[0]
    assert headers["ETag"] == f'"{hashlib.sha256(bytes(range(100))).hexdigest()}"'  # binary => LFS => sha256
    assert http(url, headers={"Range": "bytes=-5"})[2] == bytes(range(95, 100))
    assert http(url, headers={"Range": "bytes=100-"})[0] == 416
    status, headers, body = http(url, method="HEAD")
    assert (status, headers["Content-Length"], body) == (200, "100", b"")


def test_error_codes_and_revision_forms(seeded: HubServer) -> None:
    base = seeded.url
    sha = seeded.hub.list_commits("poyo-1")[0]
    assert http(f"{base}/poyo-1/resolve/main/nope")[1]["X-Error-Code"] == "EntryNotFound"
    assert http(f"{base}/tester/absent/resolve/main/config.json")[1]["X-Error-Code"] == "RepoNotFound"
    assert http(f"{base}/poyo-1/resolve/nobranch/config.json")[1]["X-Error-Code"] == "RevisionNotFound"
    assert http(f"{base}/api/models/poyo-1/tree/main/nofolder")[1]["X-Error-Code"] == "EntryNotFound"
    for revision in (sha, sha[:7], "refs%2Fheads%2Fmain"):
        status, _, body = http(f"{base}/api/models/tester/poyo-1/revision/{revision}")
        assert status == 200 and json.loads(body)["sha"] == sha, revision
    status, _, body = http(
        f"{base}/api/repos/create", "POST", {"Content-Type": "application/json"}, b'{"name": "poyo-1"}'
    )
    assert status == 409 and json.loads(body)["url"] == f"{base}/tester/poyo-1"


def test_refuse_writes_and_fault_hook(seeded: HubServer) -> None:
    hub, base = seeded.hub, seeded.url
    create = (f"{base}/api/repos/create", "POST", {"Content-Type": "application/json"}, b'{"name": "other"}')
    hub.refuse_writes = True
    assert http(*create)[0] == 403
    assert http(f"{base}/poyo-1/resolve/main/config.json")[0] == 200  # reads still work
    hub.refuse_writes = False
    assert http(*create)[0] == 200
    hub.fault_hook = lambda method, path: 503 if path.endswith("config.json") else None
    assert http(f"{base}/poyo-1/resolve/main/config.json")[0] == 503


def test_server_module_imports_no_client_library_and_runs_as_a_script(tmp_path: Path) -> None:
    # Loaded from its file so the check covers this module, not whatever the package __init__ imports.
    probe = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("hub_server", {str(HUB_SERVER_FILE)!r})
        module = importlib.util.module_from_spec(spec)
        sys.modules["hub_server"] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
        print(sorted(m for m in ("huggingface_hub", "transformers", "datasets", "torch") if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"

    # The module also runs as a script (here from its file, to skip the package import).
    with subprocess.Popen(
        [sys.executable, str(HUB_SERVER_FILE), "--port", "0"], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    ) as proc:
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip()
            status, _, body = http(f"{url}/api/whoami-v2")
            assert status == 200 and json.loads(body)["name"] == "tester"
        finally:
            proc.terminate()
            proc.wait(timeout=10)
