"""Dataset folders: real MC_Maze data through NWB -> write_dataset -> load_dataset(streaming),
the dataset card and summary against the data, atomic writes, Hub push argument checks, CLI."""

from __future__ import annotations

import datetime
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from poyo_hf.data import io as dio
from poyo_hf.data.cli import main as data_main
from poyo_hf.data.converters import from_arrays, from_mc_maze_csv, from_nwb
from poyo_hf.data.io import (
    COLUMN_DOCS,
    load_recording_rows,
    load_recordings,
    push_dataset_to_hub,
    read_dataset_summary,
    write_dataset,
)
from poyo_hf.data.schema import SchemaError, SessionRecording, segment_features

MC_MAZE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mc_maze_2trials"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local paths only: never let a missing folder be retried as a Hub repo id."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _rec(session_id: str = "s", *, dim: int = 2, bad: bool = False, n: int = 40) -> SessionRecording:
    """A small recording: 3 units, spikes every 0.05 s, behaviour at 100 Hz over 4 s, splits
    train [0, 2), valid [2, 3), test [3, 4), one reach epoch crossing a segment border."""
    t = np.arange(n) * 0.1
    units = np.array(["a", "b", "c"])[np.arange(n) % 3]
    bt = np.arange(400) * 0.01
    beh = np.stack([np.sin(bt * (k + 1)) for k in range(dim)], axis=1)
    beh[5] = np.nan
    rec = from_arrays(
        t, units, beh, bt, session_id=session_id,
        splits={"train": ([0.0], [2.0]), "valid": ([2.0], [3.0]), "test": ([3.0], [4.0])},
        epochs={"reach": ([0.5], [1.5]), "hold": ([0.0], [0.5])},
        trials=([0.0, 2.0], [2.0, 4.0]),
        subject_id="m1", task="center_out_reaching", source=f"test recording {session_id}",
    )
    if bad:
        rec.spike_times = rec.spike_times[::-1].copy()  # unsorted: invalid
    return rec


def _stream_rows(folder: Path) -> dict[str, list[dict]]:
    import datasets

    ds = datasets.load_dataset(str(folder), streaming=True)
    return {split: list(ds[split]) for split in ds}


# --------------------------------------------------------------------------- real data


def _mc_maze_nwb(path: Path, rec: SessionRecording, vel: np.ndarray) -> Path:
    """Write the MC_Maze trials in the DANDI 000128 layout (units with spike_times + heldout,
    processing/behavior hand_vel, trials with split)."""
    from pynwb import NWBHDF5IO, NWBFile, TimeSeries
    from pynwb.file import Subject

    nwb = NWBFile(
        session_description="MC_Maze trials 748 and 1356",
        identifier="mc_maze_2trials",
        session_start_time=datetime.datetime(2009, 9, 18, tzinfo=datetime.UTC),
        lab="Shenoy", institution="Stanford University",
    )
    nwb.subject = Subject(subject_id="Jenkins", species="Macaca mulatta")
    nwb.add_unit_column("heldout", "NLB held-out unit")
    for u, name in enumerate(rec.unit_ids):
        nwb.add_unit(spike_times=rec.spike_times[rec.spike_unit_index == u], heldout=False,
                     id=int(name.split("/")[-1]))
    mod = nwb.create_processing_module("behavior", "hand kinematics")
    # float64 values as the CSV has them (the recording holds float32 copies)
    mod.add(TimeSeries(name="hand_vel", data=vel, unit="mm/s",
                       timestamps=rec.behavior_timestamps))
    nwb.add_trial_column("split", "NLB split")
    for (a, b), split in zip(zip(*rec.trials), ["train", "test"]):
        nwb.add_trial(start_time=a, stop_time=b, split=split)
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return path


def test_mc_maze_real_data_nwb_to_streaming_dataset(tmp_path: Path) -> None:
    if not MC_MAZE.is_dir():
        pytest.skip(f"../shared/data/mc_maze_2trials not found: {MC_MAZE} (real MC_Maze trials)")
    files = [MC_MAZE / "trial_748_data.csv", MC_MAZE / "trial_1356_data.csv"]
    csv = from_mc_maze_csv(files)  # the CSV reader; the NWB path below is the one tested
    # float64 velocities straight from the CSV text, for the NWB file
    from poyo_hf.data.converters import read_mc_maze_csv

    vel = []
    for f in files:
        header, table = read_mc_maze_csv(f)
        vel.append(table[:, [header.index("hand_vel_x"), header.index("hand_vel_y")]])
    vel = np.concatenate(vel)  # (T, 2) float64
    # facts from PROVENANCE.md
    assert csv.unit_ids.size == 182
    in_748 = csv.spike_times < 2290
    assert (in_748.sum(), (~in_748).sum()) == (1654, 1790)
    assert np.unique(csv.spike_unit_index[in_748]).size == 152
    assert np.unique(csv.spike_unit_index[~in_748]).size == 156

    nwb_path = _mc_maze_nwb(tmp_path / "sub-Jenkins_ses-mc-maze-2trials.nwb", csv, vel)
    rec = from_nwb(nwb_path, session_id="mc_maze_jenkins", task="maze_reaching")
    assert rec.unit_ids.tolist() == csv.unit_ids.tolist()
    assert rec.unit_ids[0] == "mc_maze_jenkins/1011"
    assert (rec.subject_id, rec.species, rec.lab) == ("Jenkins", "macaca_mulatta", "shenoy")
    out = write_dataset([rec], tmp_path / "mc_maze", card_info={"license": "cc-by-4.0"})

    rows = _stream_rows(out)
    assert set(rows) == {"train", "test"}
    for split, lo, hi in (("train", 0, 2290), ("test", 2290, 1e9)):
        got_t = np.concatenate([np.asarray(r["spike_times"], np.float64) for r in rows[split]])
        got_u = np.concatenate([np.asarray(r["spike_unit_index"]) for r in rows[split]])
        keep = (csv.spike_times >= lo) & (csv.spike_times < hi)
        np.testing.assert_array_equal(got_t, csv.spike_times[keep])  # float64, exact
        unit_ids = rows[split][0]["unit_ids"]
        assert unit_ids == csv.unit_ids.tolist()
        np.testing.assert_array_equal(np.asarray(unit_ids)[got_u],
                                      csv.unit_ids[csv.spike_unit_index[keep]])
        bt = np.concatenate([r["behavior_timestamps"] for r in rows[split]])
        bv = np.concatenate([np.asarray(r["behavior_values"], np.float32) for r in rows[split]])
        bkeep = (csv.behavior_timestamps >= lo) & (csv.behavior_timestamps < hi)
        np.testing.assert_array_equal(bt, csv.behavior_timestamps[bkeep])
        np.testing.assert_array_equal(bv, vel[bkeep].astype(np.float32))
    # the card's numbers are the data's
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(out / "README.md")
    assert card.data.license == "cc-by-4.0"
    row = next(line for line in card.text.splitlines() if line.startswith("| mc_maze_jenkins |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:5] == ["182", str(1654 + 1790)]


# --------------------------------------------------------------------------- layout, schema


def test_write_dataset_layout_schema_and_roundtrip(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    recs = [_rec("lab/s1"), _rec("lab/s2")]
    out = write_dataset(recs, tmp_path / "ds", max_segment_s=0.75)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "data/test/lab_s1.parquet", "data/test/lab_s2.parquet",
        "data/train/lab_s1.parquet", "data/train/lab_s2.parquet",
        "data/valid/lab_s1.parquet", "data/valid/lab_s2.parquet",
        "poyo_dataset.json",
    ]
    want = segment_features(2).arrow_schema
    schema = pq.read_schema(out / "data/train/lab_s1.parquet")
    assert schema.names == want.names
    assert [f.type for f in schema] == [f.type for f in want]
    assert list(COLUMN_DOCS) == want.names  # the card documents every column
    # streaming load: exact features, segments cut at 0.75 s
    import datasets

    ds = datasets.load_dataset(str(out), streaming=True)
    assert ds["train"].features == segment_features(2)
    train = list(ds["train"])
    assert [(r["session_id"], r["start"], r["end"]) for r in train][:3] == [
        ("lab/s1", 0.0, 2 / 3), ("lab/s1", 2 / 3, 4 / 3), ("lab/s1", 4 / 3, 2.0)]
    # rebuilt recordings equal the originals (epochs cut at segment borders merged back)
    for orig, back in zip(recs, load_recordings(out), strict=True):
        for f in ("unit_ids", "spike_times", "spike_unit_index", "behavior_timestamps"):
            np.testing.assert_array_equal(getattr(back, f), getattr(orig, f))
        np.testing.assert_array_equal(back.behavior_values, orig.behavior_values)  # NaN too
        assert {k: (v[0].tolist(), v[1].tolist()) for k, v in back.epochs.items()} == {
            "reach": ([0.5], [1.5]), "hold": ([0.0], [0.5])}
        assert {k: (v[0].tolist(), v[1].tolist()) for k, v in back.splits.items()} == {
            k: (v[0].tolist(), v[1].tolist()) for k, v in orig.splits.items()}
        assert back.source == orig.source
    rows = load_recording_rows(out, split="valid", session_id="lab/s2")
    assert [r["split"] for r in rows] == ["valid", "valid"]
    assert rows[0]["behavior_values"].shape == (50, 2)  # [2, 3) cut in two 0.5 s pieces


def test_summary_and_card_match_data(tmp_path: Path) -> None:
    from huggingface_hub import DatasetCard

    recs = [_rec("s1"), _rec("s2", n=25)]
    out = write_dataset(recs, tmp_path / "ds", card_info={
        "license": "mit", "pretty_name": "Tiny test set", "tags": ["synthetic"],
        "citation": "Doe et al. 2024"})
    s = read_dataset_summary(out)
    assert s == json.loads((out / "poyo_dataset.json").read_text())
    assert [x["unit_ids"] for x in s["sessions"]] == [r.unit_ids.tolist() for r in recs]
    assert [x["n_spikes"] for x in s["sessions"]] == [40, 25]
    assert s["n_units"] == 6 and s["n_spikes"] == 65
    assert s["split_durations_s"] == {"train": 4.0, "valid": 2.0, "test": 2.0}
    assert s["behavior"]["name"] == "hand_vel" and s["behavior"]["dim"] == 2
    # behaviour stats: per-dim mean / std over the train split, NaN ignored
    train = np.concatenate([r.behavior_values[r.behavior_timestamps < 2.0] for r in recs])
    np.testing.assert_allclose(s["behavior"]["stats"]["mean"], np.nanmean(train, 0), rtol=1e-6)
    np.testing.assert_allclose(s["behavior"]["stats"]["std"], np.nanstd(train, 0), rtol=1e-5)
    assert s["behavior"]["stats"]["n_samples"] == [398, 398]
    # card: YAML block + one table row per session with the data's numbers
    card = DatasetCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["configs"] == [{"config_name": "default", "data_files": [
        {"split": "train", "path": "data/train/*.parquet"},
        {"split": "valid", "path": "data/valid/*.parquet"},
        {"split": "test", "path": "data/test/*.parquet"}]}]
    assert meta["license"] == "mit" and meta["pretty_name"] == "Tiny test set"
    assert meta["task_categories"] == ["time-series-forecasting"]
    assert {"neuroscience", "spikes", "synthetic"} <= set(meta["tags"])
    for rec, x in zip(recs, s["sessions"]):
        row = next(line for line in card.text.splitlines() if line.startswith(f"| {rec.session_id} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells == [rec.session_id, "m1", "center_out_reaching", "3", str(x["n_spikes"]),
                         "4.0", "hand_vel (2)", "2.0", "1.0", "1.0"]
        assert f"`{rec.session_id}`: test recording {rec.session_id}" in card.text
    assert "Doe et al. 2024" in card.text and "| `spike_times` |" in card.text


# --------------------------------------------------------------------------- atomic writes


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")] == []


def test_invalid_second_recording_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="session 'bad': spike_times is not sorted"):
        write_dataset([_rec("good"), _rec("bad", bad=True)], tmp_path / "new" / "ds")
    assert list(tmp_path.iterdir()) == []  # not even the parent folder we would have made


def test_failure_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = dio._write_shard
    calls = []

    def flaky(rows, features, path):
        calls.append(path)
        if len(calls) == 4:
            raise OSError("disk full")
        real(rows, features, path)

    monkeypatch.setattr(dio, "_write_shard", flaky)
    with pytest.raises(OSError, match="disk full"):
        write_dataset([_rec("a"), _rec("b")], tmp_path / "ds")
    assert len(calls) == 4
    _no_leftovers(tmp_path, "ds")


def test_existing_folder_rules(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()  # an empty folder is fine
    write_dataset([_rec("a")], out)
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        write_dataset([_rec("b")], out)
    assert read_dataset_summary(out)["sessions"][0]["session_id"] == "a"
    write_dataset([_rec("b")], out, overwrite=True)
    assert read_dataset_summary(out)["sessions"][0]["session_id"] == "b"
    assert not (out / "data/train/a.parquet").exists()
    _no_leftovers(tmp_path, "ds.tmp")
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_dataset([_rec("a")], precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "recs, kwargs, match",
    [
        (lambda: [_rec("a"), _rec("a")], {}, "appears twice"),
        (lambda: [_rec("a"), _rec("b")], {"max_segment_s": 0}, "max_segment_s"),
        (lambda: [_rec("a"), _rec("b", dim=3)], {}, "different behaviour dimensions"),
        (list, {}, "no recordings"),
        (lambda: [_rec("a")], {"card_info": {"licence": "mit"}}, "unknown key"),
    ],
)
def test_write_dataset_rejects(tmp_path: Path, recs, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        write_dataset(recs(), tmp_path / "ds", **kwargs)
    _no_leftovers(tmp_path, "ds")


def test_unit_ids_must_be_globally_unique(tmp_path: Path) -> None:
    a = _rec("a")
    b = _rec("b")
    b.unit_ids = a.unit_ids.copy()
    with pytest.raises(SchemaError, match="unit id 'a/a' is also a unit of session 'a'"):
        write_dataset([a, b], tmp_path / "ds")


# --------------------------------------------------------------------------- Hub push


def test_push_dataset_to_hub_checks_repo_id_first(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub

    out = write_dataset([_rec("a")], tmp_path / "ds")
    calls: list[tuple] = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))
            return f"https://hub.example/datasets/{repo_id}"

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    for bad in ("datasets/me/ds", "me/..ds", "me/ds.git", "", "a/b/c"):
        with pytest.raises(ValueError, match="invalid Hub repo id"):
            push_dataset_to_hub(out, bad)
    assert calls == []  # nothing reached the Hub client
    url = push_dataset_to_hub(out, "me/tiny-spikes", token="hf_x", private=True)
    assert url == "https://hub.example/datasets/me/tiny-spikes"
    assert calls[1] == ("create_repo", "me/tiny-spikes",
                        {"repo_type": "dataset", "private": True, "exist_ok": True})
    up = calls[2][1]
    assert (up["repo_id"], up["repo_type"], Path(up["folder_path"])) == ("me/tiny-spikes", "dataset", out)
    with pytest.raises(FileNotFoundError, match="not a poyo_hf dataset"):
        push_dataset_to_hub(tmp_path, "me/x")


# --------------------------------------------------------------------------- CLI


def test_cli_help_at_every_level(capsys) -> None:
    for argv in (["--help"], ["convert", "--help"], ["convert", "nwb", "--help"],
                 ["convert", "npz", "--help"], ["convert", "binned", "--help"],
                 ["convert", "csv-mc-maze", "--help"], ["synth", "--help"], ["info", "--help"]):
        assert data_main(argv) == 0
    out = capsys.readouterr().out
    assert "--push-to-hub" in out and "--bin-width" in out and "--sessions-per-animal" in out


def test_cli_convert_npz_binned_and_info(tmp_path: Path, capsys) -> None:
    ev = tmp_path / "ev.npz"
    np.savez(ev, spike_times=np.array([0.1, 0.4]), spike_units=np.array(["x", "y"]),
             behavior=np.zeros((5, 2)), behavior_timestamps=np.arange(5) * 0.1)
    assert data_main(["convert", "npz", str(ev), "--out", str(tmp_path / "a"), "--task", "t"]) == 0
    s = read_dataset_summary(tmp_path / "a")
    assert s["sessions"][0]["unit_ids"] == ["ev/x", "ev/y"] and s["sessions"][0]["task"] == "t"
    binned = tmp_path / "counts.npz"
    np.savez(binned, counts=np.array([[1, 0], [0, 2]]), behavior=np.ones((2, 2)))
    argv = ["convert", "binned", str(binned), "--bin-width", "0.25", "--placement", "center",
            "--out", str(tmp_path / "b")]
    assert data_main(argv) == 0
    rows = load_recording_rows(tmp_path / "b")
    np.testing.assert_array_equal(rows[0]["spike_times"], [0.125, 0.3125, 0.4375])
    assert data_main(["info", str(tmp_path / "b")]) == 0
    assert "3 spikes" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["convert", "binned", "{counts}", "--bin-width", "0", "--out", "{out}"],
         "bin_width must be a finite number > 0 seconds, got 0.0"),
        (["convert", "binned", "{neg}", "--bin-width", "0.1", "--out", "{out}"], "counts must be >= 0"),
        (["convert", "npz", "{missing}", "--out", "{out}"], "no such file"),
        (["convert", "nwb", "{counts}", "--out", "{out}"], "cannot"),
        (["convert", "binned", "{counts}", "--bin-width", "0.1", "--out", "{out}",
          "--push-to-hub", "bad..id"], "invalid --push-to-hub repo id"),
    ],
)
def test_cli_errors_one_line_exit_2(tmp_path: Path, capsys, argv, match) -> None:
    np.savez(tmp_path / "counts.npz", counts=np.array([[1, 0]]))
    np.savez(tmp_path / "neg.npz", counts=np.array([[1, -1]]))
    names = {"counts": tmp_path / "counts.npz", "neg": tmp_path / "neg.npz",
             "missing": tmp_path / "missing.npz", "out": tmp_path / "out"}
    assert data_main([a.format(**names) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()


def test_cli_csv_mc_maze(tmp_path: Path, capsys) -> None:
    if not MC_MAZE.is_dir():
        pytest.skip(f"../shared/data/mc_maze_2trials not found: {MC_MAZE} (real MC_Maze trials)")
    assert data_main(["convert", "csv-mc-maze", str(MC_MAZE), "--out", str(tmp_path / "m")]) == 0
    s = read_dataset_summary(tmp_path / "m")
    assert (s["n_units"], s["n_spikes"]) == (182, 3444)
    assert "182 units, 3444 spikes" in capsys.readouterr().out


def test_cli_synth_adapts_to_simulator(tmp_path: Path, monkeypatch) -> None:
    """`synth` maps its flags onto SimulatorConfig fields (a stand-in simulator here)."""
    import dataclasses

    import poyo_hf.data as data_pkg

    @dataclasses.dataclass
    class SimulatorConfig:
        n_animals: int = 1
        sessions_per_animal: int = 1
        seed: int = 0

    seen = {}

    def simulate_corpus(cfg):
        seen["cfg"] = cfg
        return [_rec(f"animal{a}/session{s}") for a in range(cfg.n_animals)
                for s in range(cfg.sessions_per_animal)]

    fake = types.ModuleType("poyo_hf.data.synthetic")
    fake.SimulatorConfig = SimulatorConfig
    fake.simulate_corpus = simulate_corpus
    monkeypatch.setitem(sys.modules, "poyo_hf.data.synthetic", fake)
    monkeypatch.setattr(data_pkg, "synthetic", fake, raising=False)
    argv = ["synth", "--out", str(tmp_path / "syn"), "--animals", "2", "--sessions-per-animal",
            "3", "--seed", "5"]
    assert data_main(argv) == 0
    assert seen["cfg"] == SimulatorConfig(n_animals=2, sessions_per_animal=3, seed=5)
    assert read_dataset_summary(tmp_path / "syn")["n_sessions"] == 6


def test_cli_synth_real_simulator(tmp_path: Path) -> None:
    synthetic = pytest.importorskip("poyo_hf.data.synthetic")
    argv = ["synth", "--out", str(tmp_path / "syn"), "--animals", "1", "--sessions-per-animal",
            "1", "--seed", "0"]
    assert data_main(argv) == 0
    s = read_dataset_summary(tmp_path / "syn")
    recs = synthetic.simulate_corpus(synthetic.SimulatorConfig(n_animals=1, sessions_per_animal=1))
    assert s["n_sessions"] == 1
    assert s["sessions"][0]["unit_ids"] == recs[0].unit_ids.tolist()


@pytest.mark.slow
def test_push_to_loopback_hub_then_stream(tmp_path: Path) -> None:
    """Real client path on the loopback Hub: push, load_dataset(repo, streaming=True), re-push
    with fewer sessions (stale shards deleted). Runs in a subprocess: the Hub clients read
    HF_ENDPOINT at import time."""
    import subprocess

    hub_server = pytest.importorskip("poyo_hf.testing.hub_server")
    from poyo_hf.testing.hub_env import hub_environment

    two = write_dataset([_rec("a"), _rec("b")], tmp_path / "two")
    one = write_dataset([_rec("a")], tmp_path / "one")
    code = f"""
import json, numpy as np
from datasets import load_dataset
from poyo_hf.data.io import push_dataset_to_hub
from huggingface_hub import HfApi
out = {{}}
out["url"] = push_dataset_to_hub({str(two)!r}, "tester/spikes")
ds = load_dataset("tester/spikes", streaming=True)
out["sessions"] = sorted({{r["session_id"] for r in ds["train"]}})
out["spikes"] = sum(len(r["spike_times"]) for s in ds for r in ds[s])
push_dataset_to_hub({str(one)!r}, "tester/spikes")
out["files"] = sorted(HfApi().list_repo_files("tester/spikes", repo_type="dataset"))
print("RESULT=" + json.dumps(out))
"""
    home = tmp_path / "hf_home"
    cwd = tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    with hub_server.serve_hub() as server:
        proc = subprocess.run([sys.executable, "-c", code], env=hub_environment(server.url, home),
                              cwd=cwd, capture_output=True, text=True, timeout=240, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT=")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT="):])
    assert res["url"].endswith("tester/spikes")
    assert res["sessions"] == ["a", "b"] and res["spikes"] == 80
    assert [f for f in res["files"] if f.startswith("data/")] == [
        "data/test/a.parquet", "data/train/a.parquet", "data/valid/a.parquet"]
