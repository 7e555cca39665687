"""Publishing to and loading from the Hub (loopback server): cards from measurements, both loading
routes, pinned revisions, session checkpoints, dataset cards, and every refusal.

The checkpoint is real: a few steps of ``poyo-hf pretrain`` (``train``) with the ``poyo-1`` preset
shrunk by config overrides, so ``eval_results.json`` and ``training_info.json`` come from an
actual evaluation and the pretrain writer is exercised too. Hub clients read ``HF_ENDPOINT`` at
import, so every Hub call runs in a subprocess (one per loading route) that reports JSON and
saves tensors; the assertions run here against the local model and the server's own state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from poyo_hf.testing.client import check_result, run_checks
from poyo_hf.testing.hub_env import hub_environment
from poyo_hf.testing.hub_server import HubServer, LoopbackHub, serve_hub
from poyo_hf.testing.shapes import TINY_POYO_OVERRIDES

REPO_ROOT = Path(__file__).resolve().parents[2]
# A POYO small enough that a training step takes milliseconds (the preset's shape is overridden;
# the config keeps preset="poyo-1" and the card says which overrides were applied).
REPO = "tester/poyo-1"
SESSION_REPO = "tester/poyo-1-session"
DATASET_REPO = "tester/tiny-synthetic"


# --------------------------------------------------------------------------- fixtures
def folder_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Corpus, a pretrained checkpoint, a second one with other weights, a session checkpoint
    (fine-tune of the first on a new session) and one raw window with its expected outputs."""
    from poyo_hf.data.io import write_dataset
    from poyo_hf.data.synthetic import SimulatorConfig, simulate_corpus
    from poyo_hf.hub import load_checkpoint
    from poyo_hf.training.corpus import Corpus
    from poyo_hf.training.evaluation import evaluate_decoder, public_results, write_results
    from poyo_hf.training.pretrain import PretrainArguments, train

    root = tmp_path_factory.mktemp("publish")
    corpus = root / "corpus"
    recs = simulate_corpus(SimulatorConfig.small(seed=5, n_animals=1, sessions_per_animal=2, trials_range=(12, 12)))
    write_dataset(recs, corpus, max_segment_s=20.0, card_info={"pretty_name": "tiny synthetic corpus"})
    train(
        PretrainArguments(
            datasets=[str(corpus)],
            output_dir=str(root / "run"),
            preset="poyo-1",
            config_overrides=json.dumps(TINY_POYO_OVERRIDES),
            max_steps=3,
            batch_size=4,
            learning_rate=3e-3,
            logging_steps=1,
            progress=False,
            plots=True,
            eval_split="test",
            eval_batch_size=16,
        )
    )
    first = root / "run" / "model"

    # Second checkpoint: other weights (readout bias moved), evaluated for real.
    model, processor = load_checkpoint(first)
    with torch.no_grad():
        model.readouts["hand_vel"].bias.add_(0.5)
    second = root / "second" / "model"
    model.save_pretrained(second)
    processor.save_pretrained(second)
    shutil.copy2(first / "training_info.json", second / "training_info.json")
    c = Corpus.from_sources([str(corpus)])
    res = evaluate_decoder(model, processor, c.segments("test"), c.segments("train"), batch_size=16)
    write_results(second / "eval_results.json", {**public_results(res), "split": "test"})

    # Session checkpoint: the first model grown to a new session (a stand-in for `poyo-hf adapt`).
    model1, proc1 = load_checkpoint(first)
    proc1.add_session("new_session", [f"new_session/u{i}" for i in range(6)])
    model1.grow_vocabularies(proc1)
    session = root / "session" / "model"
    model1.save_pretrained(session)
    proc1.save_pretrained(session)
    info = json.loads((first / "training_info.json").read_text())
    info.update(kind="unit-identification", base_model=REPO, base_revision=None)
    (session / "training_info.json").write_text(json.dumps(info))

    # One raw window (first second of a test segment) and what each model predicts on it.
    seg = c.segments("test")[0]
    keep = seg.spike_times < seg.start + 1.0
    window = {
        "session_id": seg.session_id,
        "spike_times": (seg.spike_times[keep] - seg.start).tolist(),
        "spike_unit_ids": [seg.unit_ids[i] for i in seg.spike_unit_index[keep]],
        "output_timestamps": [0.1, 0.35, 0.6, 0.85],
    }
    (root / "window.json").write_text(json.dumps(window))
    batch = processor(window)
    torch.save(dict(batch), root / "batch.pt")
    expected = {}
    for name, folder in (("first", first), ("second", second)):
        m, _ = load_checkpoint(folder)
        with torch.no_grad():
            expected[name] = m(**batch).predictions
    return {
        "root": root,
        "corpus": corpus,
        "first": first,
        "second": second,
        "session": session,
        "batch": batch,
        "expected": expected,
        "hashes": {name: folder_hashes(p) for name, p in (("first", first), ("second", second))},
    }


@pytest.fixture(scope="module")
def hubs() -> Iterator[dict[str, HubServer]]:
    """The Hub, a Hub that refuses writes, and a Hub that must never be called."""
    with serve_hub() as hub, serve_hub(hub=LoopbackHub(refuse_writes=True)) as locked, serve_hub() as quiet:
        yield {"hub": hub, "locked": locked, "quiet": quiet}


ok = check_result


def client_env(url: str, home: Path, *, with_poyo_hf: bool, offline: bool = False) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    env = hub_environment(url, home, base={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    env["OMP_NUM_THREADS"] = "1"
    if with_poyo_hf:
        env["PYTHONPATH"] = str(REPO_ROOT)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Route 1: poyo_hf imported (Auto registration). Publishes everything, then reads it back.
WITH_POYO_HF = """
import contextlib, io, torch
import poyo_hf
from poyo_hf.cli import main as cli_main
from poyo_hf.data.io import push_dataset_to_hub
from poyo_hf.hub import PublishError, publish
from huggingface_hub import DatasetCard, ModelCard
from transformers import AutoModel, AutoProcessor
W = json.loads(os.environ["WORK"])
batch = torch.load(W["root"] + "/batch.pt")

def predict(model):
    with torch.no_grad():
        return model(**batch).predictions

@check("push_twice")
def _():
    first = publish(W["first"], "tester/poyo-1")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the second push goes through the CLI
        rc = cli_main(["publish", W["second"], "tester/poyo-1", "--commit-message", "second weights"])
    second = json.loads(out.getvalue().strip().splitlines()[-1])["commit"]
    return {"first": first, "second": second, "rc": rc}

@check("load_with_poyo_hf")
def _():
    shas = RESULTS["push_twice"]
    for name, repo, rev in (("bare", "poyo-1", None), ("namespaced", "tester/poyo-1", None),
                            ("pinned", "tester/poyo-1", shas["first"])):
        model = AutoModel.from_pretrained(repo, revision=rev, cache_dir=W["root"] + "/cache-" + name)
        torch.save(predict(model), W["root"] + f"/out-route1-{name}.pt")
    model, processor = poyo_hf.load_checkpoint("tester/poyo-1", revision=shas["first"])
    auto_proc = AutoProcessor.from_pretrained("tester/poyo-1", revision=shas["first"])
    window = json.load(open(W["root"] + "/window.json"))
    same_batch = all(torch.equal(auto_proc(window)[k], batch[k]) for k in batch)
    torch.save(predict(model), W["root"] + "/out-route1-load_checkpoint.pt")
    return {"model_class": type(model).__module__ + "." + type(model).__name__, "same_batch": same_batch}

@check("cards")
def _():
    card = ModelCard.load("tester/poyo-1")
    return {"content": card.content}

@check("session_checkpoint")
def _():
    info_path = W["session"] + "/training_info.json"
    info = json.load(open(info_path))
    info["base_revision"] = RESULTS["push_twice"]["first"]
    json.dump(info, open(info_path, "w"))
    sha = publish(W["session"], "tester/poyo-1-session")
    card = ModelCard.load("tester/poyo-1-session")
    return {"sha": sha, "base_model": card.data.base_model, "content": card.content}

@check("dataset_card")
def _():
    push_dataset_to_hub(W["corpus"], "tester/tiny-synthetic")
    card = DatasetCard.load("tester/tiny-synthetic", repo_type="dataset")
    return {"content": card.content, "pretty_name": card.data.pretty_name}

@check("faults")
def _():
    out = {}
    for name, endpoint in (("refusing", os.environ["LOCKED_URL"]), ("unreachable", os.environ["CLOSED_URL"])):
        try:
            publish(W["first"], "tester/poyo-elsewhere", endpoint=endpoint)
            out[name] = None
        except PublishError as err:
            out[name] = {"type": type(err).__name__, "runtime": isinstance(err, RuntimeError), "message": str(err)}
    return out
"""

# Route 2: a process where `import poyo_hf` fails; the Hub's remote code must stand alone.
WITHOUT_POYO_HF = """
import importlib, torch
sys.modules["poyo_hf"] = None  # even where poyo_hf is installed, this process must not use it
try:
    importlib.import_module("poyo_hf")
    poyo_hf_importable = True
except ImportError:
    poyo_hf_importable = False
from huggingface_hub import snapshot_download
from transformers import AutoFeatureExtractor, AutoModel, AutoProcessor
W = json.loads(os.environ["WORK"])
batch = torch.load(W["root"] + "/batch.pt")
window = json.load(open(W["root"] + "/window.json"))
SHAS = json.loads(os.environ["SHAS"])

@check("remote_code")
def _():
    classes, same_batch = {}, {}
    for name, repo, rev in (("bare", "poyo-1", None), ("namespaced", "tester/poyo-1", None),
                            ("pinned", "tester/poyo-1", SHAS["first"])):
        model = AutoModel.from_pretrained(repo, revision=rev, trust_remote_code=True)
        with torch.no_grad():
            torch.save(model(**batch).predictions, W["root"] + f"/out-route2-{name}.pt")
        classes[name] = type(model).__module__
    for name, auto in (("processor", AutoProcessor), ("feature_extractor", AutoFeatureExtractor)):
        proc = auto.from_pretrained("tester/poyo-1", revision=SHAS["first"], trust_remote_code=True)
        same_batch[name] = all(torch.equal(proc(window)[k], batch[k]) for k in batch)
        classes[name] = type(proc).__module__
    # A local folder named poyo-1 (the pinned snapshot) for the offline process.
    snapshot_download("tester/poyo-1", revision=SHAS["first"], local_dir="poyo-1")
    return {"poyo_hf_importable": poyo_hf_importable, "classes": classes, "same_batch": same_batch}
"""

# Route 3: offline, no poyo_hf, a local folder named like the bare repo id.
OFFLINE_LOCAL = """
import importlib, torch
sys.modules["poyo_hf"] = None
from transformers import AutoModel, AutoProcessor
W = json.loads(os.environ["WORK"])
batch = torch.load(W["root"] + "/batch.pt")
window = json.load(open(W["root"] + "/window.json"))

@check("local_folder")
def _():
    model = AutoModel.from_pretrained("poyo-1", trust_remote_code=True)
    proc = AutoProcessor.from_pretrained("poyo-1", trust_remote_code=True)
    with torch.no_grad():
        torch.save(model(**proc(window)).predictions, W["root"] + "/out-route3-local.pt")
    return {"module": type(model).__module__}
"""


@pytest.fixture(scope="module")
def reports(work: dict[str, Any], hubs: dict[str, HubServer]) -> dict[str, dict[str, Any]]:
    root: Path = work["root"]
    payload = json.dumps({k: str(work[k]) for k in ("root", "corpus", "first", "second", "session")})
    cwd = root / "cwd"  # empty: a bare id must not match a local folder here
    cwd.mkdir()
    env = client_env(hubs["hub"].url, root / "home1", with_poyo_hf=True)
    env.update(WORK=payload, LOCKED_URL=hubs["locked"].url, CLOSED_URL=f"http://127.0.0.1:{closed_port()}")
    route1 = run_checks(WITH_POYO_HF, env, cwd)
    shas = ok(route1, "push_twice")
    env = client_env(hubs["hub"].url, root / "home2", with_poyo_hf=False)
    env.update(WORK=payload, SHAS=json.dumps(shas))
    route2 = run_checks(WITHOUT_POYO_HF, env, cwd)
    env = client_env("http://127.0.0.1:9", root / "home3", with_poyo_hf=False, offline=True)  # no Hub at all
    env.update(WORK=payload)
    route3 = run_checks(OFFLINE_LOCAL, env, cwd)
    return {"route1": route1, "route2": route2, "route3": route3}


# --------------------------------------------------------------------------- card contents
NUMBER = re.compile(r"(?<![\w.^/-])-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?(?!\w)")


def numbers_in(text: str) -> list[str]:
    return [m.group(0).rstrip(",") for m in NUMBER.finditer(text)]


def leaves(obj: Any) -> Iterator[Any]:
    if isinstance(obj, dict):
        for v in obj.values():
            yield from leaves(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from leaves(v)
    else:
        yield obj


def allowed_values(folder: Path) -> list[float]:
    """Every number the checkpoint's files hold (numeric leaves and numbers written inside
    strings, e.g. a simulator seed in a provenance line), the parameter count counted here from
    the safetensors file, and the data totals/hours the card is allowed to derive."""
    from safetensors import safe_open

    values: list[float] = []
    docs = [json.loads((folder / n).read_text()) for n in ("config.json", "eval_results.json", "training_info.json")]
    for doc in docs:
        for leaf in leaves(doc):
            if isinstance(leaf, bool) or leaf is None:
                continue
            if isinstance(leaf, (int, float)):
                values.append(float(leaf))
            elif isinstance(leaf, str):
                values += [float(x.replace(",", "")) for x in numbers_in(leaf)]
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        values.append(float(sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())))
    datasets = docs[2]["datasets"]
    values += [d["duration_s"] / 3600 for d in datasets]
    values += [sum(d[k] for d in datasets) for k in ("n_sessions", "n_spikes", "duration_s")]
    values.append(sum(d["duration_s"] for d in datasets) / 3600)
    return values


def matches(token: str, values: list[float]) -> bool:
    x = float(token.replace(",", ""))
    decimals = len(token.split(".")[1]) if "." in token and "e" not in token.lower() else None
    if decimals is None:
        return any(v == x for v in values)
    return any(abs(round(v, decimals) - x) < 10 ** -(decimals + 3) for v in values)


def card_body(content: str) -> str:
    """The card text before the citation (which quotes the paper's year and arXiv number)."""
    return content.split("## Citation")[0]


def check_card_against_files(content: str, folder: Path) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard(content)  # YAML parses (raises otherwise)
    res = json.loads((folder / "eval_results.json").read_text())
    info = json.loads((folder / "training_info.json").read_text())
    # model-index: every value is exactly the results file's, and every session is there.
    seen = {}
    for r in card.data.eval_results:
        key = (r.dataset_config, r.metric_type)
        if r.dataset_config is None:
            expected = res["r2"] if r.metric_type == "r2" else res["wiener_r2"]
        else:
            table = res["r2_per_session"] if r.metric_type == "r2" else res["wiener_r2_per_session"]
            expected = table[r.dataset_config]
        assert r.metric_value == expected, (key, r.metric_value, expected)
        assert r.dataset_split == res["split"]
        seen[key] = r.metric_value
    sessions = set(res["r2_per_session"])
    assert {k for k in seen if k[0] is not None} == {(s, m) for s in sessions for m in ("r2", "wiener_filter_r2")}
    assert (None, "r2") in seen and (None, "wiener_filter_r2") in seen
    # The evaluation table: one row per session, R² to 4 decimals, from the file.
    body = card_body(card.text)
    for sid in sessions:
        row = next(line for line in body.splitlines() if line.startswith(f"| {sid} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{res['r2_per_session'][sid]:.4f}"
        assert cells[2] == f"{res['wiener_r2_per_session'][sid]:.4f}"
        assert int(cells[3].replace(",", "")) == res["n_eval_samples"][sid]
    # Every number anywhere in the text is one of the files' numbers.
    values = allowed_values(folder)
    tokens = numbers_in(body)
    assert len(tokens) > 30, tokens  # the sweep is not vacuous
    stray = [t for t in tokens if not matches(t, values)]
    assert not stray, f"numbers in the card that are in none of the checkpoint's files: {stray}"
    # Synthetic data is called synthetic, with how much.
    assert "**Synthetic data only.**" in body
    hours = sum(d["duration_s"] for d in info["datasets"]) / 3600
    assert f"{sum(d['n_spikes'] for d in info['datasets']):,} spikes, {hours:.2f} hours" in body
    assert "synthetic-data" in card.data.tags
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "time-series-forecasting"


def test_rendered_card_numbers_equal_the_results_files(work: dict[str, Any]) -> None:
    from poyo_hf.hub import render_model_card

    card = render_model_card(work["first"], repo_id=REPO)
    check_card_against_files(card.content, work["first"])
    info = json.loads((work["first"] / "training_info.json").read_text())
    assert info["kind"] == "pretrain" and info["datasets"][0]["synthetic"] is True
    assert info["datasets"][0]["provenance"] == "poyo_hf synthetic simulator v1, seed 5"
    assert info["compute"]["train_windows_seen"] == 3 * 4 and info["compute"]["steps"] == 3
    assert "poyo-1" in card.data.tags and card.data.base_model is None


def test_card_round_trips_through_the_hub(work: dict[str, Any], reports: dict[str, dict[str, Any]]) -> None:
    from poyo_hf.hub import render_model_card

    loaded = ok(reports["route1"], "cards")["content"]
    assert loaded == render_model_card(work["second"], repo_id=REPO).content  # the latest push
    check_card_against_files(loaded, work["second"])


# --------------------------------------------------------------------------- publish and load
def test_both_routes_load_identical_models_and_processors(
    work: dict[str, Any], reports: dict[str, dict[str, Any]], hubs: dict[str, HubServer]
) -> None:
    root, expected = work["root"], work["expected"]
    pushed = ok(reports["route1"], "push_twice")
    assert pushed["rc"] == 0 and pushed["first"] != pushed["second"]
    assert hubs["hub"].hub.list_commits(REPO)[0] == pushed["second"]
    files = set(hubs["hub"].hub.list_files(REPO))
    assert {
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "eval_results.json",
        "training_info.json",
        "modeling_poyo.py",
        "configuration_poyo.py",
        "processing_poyo.py",
        "cpu_kernels.py",
    } <= files
    # The first push carried the run's plots; the second folder has none, and its push removed
    # them (no stale files from an older push survive on main).
    first_files = hubs["hub"].hub.list_files(REPO, revision=pushed["first"])
    assert any(f.startswith("eval/") and f.endswith(".png") for f in first_files)
    assert not any(f.endswith(".png") for f in files)

    route1 = ok(reports["route1"], "load_with_poyo_hf")
    assert route1["model_class"] == "poyo_hf.models.poyo.modeling_poyo.PoyoForDecoding"
    assert route1["same_batch"]
    route2 = ok(reports["route2"], "remote_code")
    assert route2["poyo_hf_importable"] is False
    assert all(m.startswith("transformers_modules") for m in route2["classes"].values()), route2["classes"]
    assert route2["same_batch"] == {"processor": True, "feature_extractor": True}

    def out(name: str) -> torch.Tensor:
        return torch.load(root / f"out-{name}.pt")

    assert not torch.equal(expected["first"], expected["second"])
    for route in ("route1", "route2"):
        # Latest (bare id resolves on this Hub, and namespace/name) == the second push ...
        assert torch.equal(out(f"{route}-bare"), expected["second"]), route
        assert torch.equal(out(f"{route}-namespaced"), expected["second"]), route
        # ... and the first commit's sha pins the first weights exactly.
        assert torch.equal(out(f"{route}-pinned"), expected["first"]), route
    assert torch.equal(out("route1-load_checkpoint"), expected["first"])
    # Offline, without poyo_hf: a local folder named poyo-1 (the pinned snapshot).
    assert ok(reports["route3"], "local_folder")["module"].startswith("transformers_modules")
    assert torch.equal(out("route3-local"), expected["first"])


def test_local_folder_loads_with_poyo_hf_imported(work: dict[str, Any], reports: dict[str, dict[str, Any]]) -> None:
    from transformers import AutoModel

    ok(reports["route2"], "remote_code")
    folder = work["root"] / "cwd" / "poyo-1"  # the pinned snapshot route 2 downloaded
    with torch.no_grad():
        assert torch.equal(AutoModel.from_pretrained(folder)(**work["batch"]).predictions, work["expected"]["first"])


def test_session_checkpoint_card_names_its_base_model(reports: dict[str, dict[str, Any]]) -> None:
    from huggingface_hub import ModelCard

    result = ok(reports["route1"], "session_checkpoint")
    pushed = ok(reports["route1"], "push_twice")
    assert result["base_model"] == REPO
    card = ModelCard(result["content"])
    assert card.data.to_dict()["base_model_relation"] == "finetune"
    assert "adapted by unit identification" in card.text and pushed["first"] in card.text
    assert not card.data.eval_results  # no eval_results.json in that folder: no model-index, said so
    assert "published without evaluation" in card.text


def test_dataset_card_loads_back(work: dict[str, Any], reports: dict[str, dict[str, Any]]) -> None:
    result = ok(reports["route1"], "dataset_card")
    assert result["content"] == (work["corpus"] / "README.md").read_text()
    assert result["pretty_name"] == "tiny synthetic corpus"


# --------------------------------------------------------------------------- faults
def test_refusing_or_unreachable_hub_is_a_clear_error_and_leaves_the_checkpoint(
    work: dict[str, Any], reports: dict[str, dict[str, Any]], hubs: dict[str, HubServer]
) -> None:
    faults = ok(reports["route1"], "faults")
    for name, url in (("refusing", hubs["locked"].url), ("unreachable", None)):
        err = faults[name]
        assert err is not None and err["runtime"], (name, err)
        assert "tester/poyo-elsewhere" in err["message"] and "not changed" in err["message"]
        assert (url or "http://127.0.0.1:") in err["message"]
    assert "403" in faults["refusing"]["message"]
    assert not hubs["locked"].hub.repo_exists("tester/poyo-elsewhere")
    for name in ("first", "second"):  # every byte of the local checkpoints as before
        assert folder_hashes(work[name]) == work["hashes"][name]


@pytest.mark.parametrize("bad", ["bad id!!", "a/b/c", "no-namespace", "", "x" * 200 + "/y"])
def test_invalid_repo_id_is_refused_before_any_request(
    bad: str, work: dict[str, Any], hubs: dict[str, HubServer], capsys: pytest.CaptureFixture[str]
) -> None:
    from poyo_hf.cli import main as cli_main
    from poyo_hf.hub import publish

    before = len(hubs["quiet"].hub.requests)
    with pytest.raises(ValueError, match="invalid Hub repo id") as info:
        publish(work["first"], bad, endpoint=hubs["quiet"].url, token="dummy")
    assert repr(bad) in str(info.value)
    assert cli_main(["publish", str(work["first"]), bad]) == 2
    assert "invalid Hub repo id" in capsys.readouterr().err
    assert len(hubs["quiet"].hub.requests) == before == 0


def test_truncated_or_corrupted_safetensors_is_named(work: dict[str, Any], tmp_path: Path) -> None:
    from transformers import AutoModel

    from poyo_hf.hub import load_checkpoint, publish

    for kind in ("truncated", "corrupted"):
        folder = tmp_path / kind
        shutil.copytree(work["first"], folder)
        data = (folder / "model.safetensors").read_bytes()
        weights = data[: len(data) // 2] if kind == "truncated" else b"\xff" * 8 + data[8:]
        (folder / "model.safetensors").write_bytes(weights)
        path = str(folder / "model.safetensors")
        for load in (lambda f: load_checkpoint(f), lambda f: AutoModel.from_pretrained(f)):
            with pytest.raises(ValueError, match="truncated or corrupted") as info:
                load(folder)
            assert path in str(info.value)
        with pytest.raises(ValueError, match="truncated or corrupted") as info:
            publish(folder, "tester/never", endpoint="http://127.0.0.1:9", token="dummy")
        assert path in str(info.value)


def test_vocabulary_and_embedding_mismatches_are_refused(work: dict[str, Any], tmp_path: Path) -> None:
    from transformers import AutoModel

    from poyo_hf import PoyoProcessor
    from poyo_hf.hub import load_checkpoint

    # The processor knows a session the weights have no row for.
    grown = tmp_path / "grown-processor"
    shutil.copytree(work["first"], grown)
    proc = PoyoProcessor.from_pretrained(grown)
    proc.add_session("extra", ["extra/u0", "extra/u1"])
    proc.save_pretrained(grown)
    with pytest.raises(ValueError, match="is inconsistent.*unit_vocab_size"):
        load_checkpoint(grown)

    # config.json disagrees with the embedding table in the weights: refused even when the
    # caller asks transformers to re-initialise mismatched weights.
    edited = tmp_path / "edited-config"
    shutil.copytree(work["first"], edited)
    config = json.loads((edited / "config.json").read_text())
    config["unit_vocab_size"] -= 3
    (edited / "config.json").write_text(json.dumps(config))
    for kwargs in ({}, {"ignore_mismatched_sizes": True}):
        with pytest.raises(ValueError, match=r"embedding tables disagree.*unit_emb\.weight: (\d+) rows"):
            AutoModel.from_pretrained(edited, **kwargs)
    with pytest.raises(ValueError, match="embedding tables disagree"):
        load_checkpoint(edited)


def test_incomplete_checkpoint_is_refused(work: dict[str, Any], tmp_path: Path) -> None:
    from poyo_hf.hub import publish, render_model_card

    folder = tmp_path / "incomplete"
    shutil.copytree(work["first"], folder)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json is missing"):
        render_model_card(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        publish(tmp_path / "nowhere", "tester/never", endpoint="http://127.0.0.1:9", token="dummy")


def test_checkpoint_without_records_renders_an_honest_card(tmp_path: Path) -> None:
    """A converted checkpoint (no eval_results.json / training_info.json) says so and invents nothing."""
    from poyo_hf.hub import render_model_card

    fixture = REPO_ROOT / "tests" / "fixtures" / "tiny-poyo"
    card = render_model_card(fixture, repo_id="tester/converted")
    assert "Not recorded" in card.text and "published without evaluation" in card.text
    assert not card.data.eval_results and card.data.license == "other"
    config = json.loads((fixture / "config.json").read_text())
    values = [float(v) for v in leaves(config) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    from safetensors import safe_open

    with safe_open(str(fixture / "model.safetensors"), framework="pt") as fh:
        values.append(float(sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())))
    stray = [t for t in numbers_in(card_body(card.text)) if not matches(t, values)]
    assert not stray, stray
