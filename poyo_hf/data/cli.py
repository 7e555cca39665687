"""poyo-hf data: convert spike data to poyo_hf datasets, simulate corpora, inspect datasets.

Examples:

    poyo-hf data convert nwb sub-Jenkins_ses-full_desc-train_behavior+ecephys.nwb --out mc_maze
    poyo-hf data convert nwb a.nwb b.nwb --out ds --behavior cursor_vel --push-to-hub me/ds
    poyo-hf data convert npz session1.npz session2.npz --out ds
    poyo-hf data convert binned counts.npz --bin-width 0.01 --placement center --out ds
    poyo-hf data convert csv-mc-maze ../shared/data/mc_maze_2trials --out mc_maze_2trials
    poyo-hf data synth --out synth --animals 2 --sessions-per-animal 3 --seed 0
    poyo-hf data info mc_maze

User errors (bad files, bad values, existing output folders) print one line on stderr and exit
with status 2; nothing is left half-written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

PROG = "poyo-hf data"


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Top level: keep the example block as written."""


class _SubFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Subcommands: wrap the descriptions."""


def _add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, type=Path, help="dataset folder to write")
    g.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    g.add_argument("--max-segment-s", type=float, default=60.0, help="longest segment row (s)")
    g.add_argument("--license", default=None, help="licence of the data for the card, e.g. cc-by-4.0")
    g.add_argument("--pretty-name", default=None, help="title of the dataset card")
    g.add_argument("--description", default=None, help="paragraph for the dataset card")
    g.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="also upload the folder to this Hub dataset repo (namespace/name)")
    g.add_argument("--private", action="store_true", help="create the Hub repo as private")


def _add_metadata_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("session metadata (override what the file says)")
    for name in ("subject_id", "task", "brain_region", "lab", "species"):
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\nUser errors")[0],
        epilog="Run `poyo-hf data COMMAND --help` for a command's options.",
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    conv = sub.add_parser(
        "convert",
        help="convert NWB / npz event arrays / binned counts / MC_Maze CSV to a dataset",
        description="Convert recordings to a poyo_hf dataset folder (parquet + card + summary).",
        formatter_class=_SubFormatter,
    )
    csub = conv.add_subparsers(dest="source", metavar="SOURCE", required=True)

    p = csub.add_parser(
        "nwb",
        help="DANDI / NLB NWB files (units, processing/behavior, trials)",
        description="One session per NWB file in the DANDI/NLB layout: units table with "
        "spike_times (+ heldout), behaviour TimeSeries under processing/behavior, trials with "
        "split ('val' -> valid) and move_onset_time (reach epoch = move onset -0.25..+0.45 s, "
        "hold = trial start to reach). Needs pip install 'poyo-hf[nwb]'.",
        formatter_class=_SubFormatter,
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="NWB files")
    p.add_argument("--behavior", default="hand_vel",
                   help="TimeSeries under processing/behavior to decode (X_vel falls back to "
                   "the gradient of X_pos)")
    p.add_argument("--session-id", default=None, help="session id (one file only; default: file stem)")
    p.add_argument("--exclude-heldout", action="store_true", help="drop the NLB held-out units")
    _add_metadata_args(p)
    _add_output_args(p)

    p = csub.add_parser(
        "npz",
        help="npz archives of spike events",
        description="One session per .npz (read with allow_pickle=False). Keys: spike_times (S,), "
        "spike_units or unit_ids (S,), behavior (T,[D]), behavior_timestamps (T,); optional units "
        "(N,), position (T, D'), trial_start/trial_end (K,), split (K,) = train/val/test, "
        "behavior_name.",
        formatter_class=_SubFormatter,
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help=".npz files")
    p.add_argument("--session-id", default=None, help="session id (one file only; default: file stem)")
    _add_metadata_args(p)
    _add_output_args(p)

    p = csub.add_parser(
        "binned",
        help="npz archives of binned counts (T, N)",
        description="One session per .npz with key counts (T, N) of non-negative integers; "
        "optional unit_ids (N,), behavior (T,[D]) one row per bin (or with behavior_timestamps), "
        "t0, bin_width. k spikes in bin [t, t+w) are placed at t + (j + 0.5) * w / k "
        "(--placement center) or at sorted seeded uniform draws in the bin (uniform).",
        formatter_class=_SubFormatter,
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help=".npz files")
    p.add_argument("--bin-width", type=float, default=None,
                   help="bin width in seconds (default: the file's bin_width key)")
    p.add_argument("--t0", type=float, default=None, help="start of the first bin (default: file's t0 or 0)")
    p.add_argument("--placement", choices=("uniform", "center"), default="uniform",
                   help="where spikes go inside their bin")
    p.add_argument("--seed", type=int, default=0, help="seed of the uniform placement")
    p.add_argument("--behavior-name", default="hand_vel", help="name of the behaviour stream")
    p.add_argument("--session-id", default=None, help="session id (one file only; default: file stem)")
    _add_metadata_args(p)
    _add_output_args(p)

    p = csub.add_parser(
        "csv-mc-maze",
        help="the shared MC_Maze CSV trials (trial_*_data.csv) as one session",
        description="Read MC_Maze trial CSVs (1 ms rows: timestamp, hand_vel_x/y, hand_pos_x/y, "
        "unit_XXXX 0/1) into one session; trial 748 = train, trial 1356 = test, others train.",
        formatter_class=_SubFormatter,
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                   help="folder holding trial_*_data.csv, or the CSV files")
    p.add_argument("--session-id", default="mc_maze_jenkins", help="session id")
    _add_output_args(p)

    p = sub.add_parser(
        "synth",
        help="simulate a corpus of synthetic sessions (poyo_hf.data.synthetic)",
        description="Simulate animals x sessions of synthetic spiking + behaviour and write them "
        "as a dataset.",
        formatter_class=_SubFormatter,
    )
    p.add_argument("--animals", type=int, default=2, help="number of simulated animals")
    p.add_argument("--sessions-per-animal", type=int, default=3, help="sessions per animal")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    _add_output_args(p)

    p = sub.add_parser(
        "info",
        help="print the summary of a dataset folder",
        description="Print sessions, units, spikes and split durations of a dataset folder.",
        formatter_class=_SubFormatter,
    )
    p.add_argument("folder", type=Path, help="dataset folder written by `convert` or `synth`")
    return parser


# --------------------------------------------------------------------------- commands
def _metadata(args: argparse.Namespace) -> dict[str, Any]:
    names = ("subject_id", "task", "brain_region", "lab", "species")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _session_ids(args: argparse.Namespace, files: list[Path]) -> list[str | None]:
    if args.session_id is not None and len(files) > 1:
        raise ValueError("--session-id names one session; give one file, or let ids default to file stems.")
    return [args.session_id] + [None] * (len(files) - 1)


def _convert_nwb(args: argparse.Namespace) -> list[Any]:
    from .converters import from_nwb

    return [
        from_nwb(f, behavior=args.behavior, session_id=sid,
                 include_heldout=not args.exclude_heldout, **_metadata(args))
        for f, sid in zip(args.files, _session_ids(args, args.files))
    ]


def _convert_npz(args: argparse.Namespace) -> list[Any]:
    from .converters import from_npz

    return [
        from_npz(f, session_id=sid, **_metadata(args))
        for f, sid in zip(args.files, _session_ids(args, args.files))
    ]


def _convert_binned(args: argparse.Namespace) -> list[Any]:
    from .converters import from_binned
    from .schema import SchemaError

    recs = []
    for f, sid in zip(args.files, _session_ids(args, args.files)):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no such file.")
        try:
            with np.load(f, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except ValueError as err:
            raise ValueError(f"{f}: cannot read without unpickling ({err}).") from None
        if "counts" not in data:
            raise SchemaError(f"{f}: missing key 'counts' (T, N); keys present: {sorted(data)}.")
        bin_width: float | None = args.bin_width
        if bin_width is None:
            if "bin_width" not in data:
                raise ValueError(f"{f}: give --bin-width (the file has no 'bin_width' key).")
            bin_width = float(data["bin_width"])
        t0 = args.t0 if args.t0 is not None else float(data.get("t0", 0.0))
        try:
            recs.append(
                from_binned(
                    data["counts"], bin_width, t0=t0,
                    unit_ids=data["unit_ids"].tolist() if "unit_ids" in data else None,
                    placement=args.placement, seed=args.seed, session_id=sid or f.stem,
                    behavior=data.get("behavior"),
                    behavior_timestamps=data.get("behavior_timestamps"),
                    behavior_name=args.behavior_name,
                    source=f"binned counts from {f.name}, bin_width={bin_width} s, "
                    f"placement={args.placement}",
                    **_metadata(args),
                )
            )
        except ValueError as err:
            raise type(err)(f"{f}: {err}") from None
    return recs


def _convert_csv(args: argparse.Namespace) -> list[Any]:
    from .converters import from_mc_maze_csv

    paths = args.paths[0] if len(args.paths) == 1 and args.paths[0].is_dir() else args.paths
    return [from_mc_maze_csv(paths, session_id=args.session_id)]


def _synth(args: argparse.Namespace) -> list[Any]:
    try:
        from . import synthetic
    except ImportError as err:
        raise ImportError(f"`synth` needs poyo_hf.data.synthetic, which is not available ({err}).") from None
    for name, value in (("--animals", args.animals), ("--sessions-per-animal", args.sessions_per_animal)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    config = synthetic.SimulatorConfig(
        n_animals=args.animals, sessions_per_animal=args.sessions_per_animal, seed=args.seed
    )
    return list(synthetic.simulate_corpus(config))


def _write(recs: list[Any], args: argparse.Namespace, default_license: str | None = None) -> int:
    from .io import push_dataset_to_hub, read_dataset_summary, write_dataset

    if args.push_to_hub is not None:  # fail on a bad repo id before any work is written
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as err:
            raise ValueError(f"invalid --push-to-hub repo id {args.push_to_hub!r}: {err}") from None
    card = {
        "license": args.license or default_license,
        "pretty_name": args.pretty_name,
        "description": args.description,
    }
    out = write_dataset(
        recs, args.out, max_segment_s=args.max_segment_s, overwrite=args.overwrite,
        card_info={k: v for k, v in card.items() if v is not None},
    )
    s = read_dataset_summary(out)
    d = s["split_durations_s"]
    print(
        f"wrote {out}: {s['n_sessions']} session(s), {s['n_units']} units, {s['n_spikes']} spikes; "
        f"train {d['train']:.1f} s, valid {d['valid']:.1f} s, test {d['test']:.1f} s"
    )
    if args.push_to_hub is not None:
        url = push_dataset_to_hub(out, args.push_to_hub, private=args.private)
        print(f"pushed to {url}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .io import read_dataset_summary

    s = read_dataset_summary(args.folder)
    d = s["split_durations_s"]
    b = s["behavior"]
    print(
        f"{args.folder}: {s['n_sessions']} session(s), {s['n_units']} units, {s['n_spikes']} "
        f"spikes, behaviour {b['name']} ({b['dim']} dim); train {d['train']:.1f} s, "
        f"valid {d['valid']:.1f} s, test {d['test']:.1f} s"
    )
    for x in s["sessions"]:
        print(f"  {x['session_id']}: {x['n_units']} units, {x['n_spikes']} spikes, "
              f"{x['duration_s']:.1f} s, subject {x['subject_id']}, task {x['task']}")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "info":
        return _info(args)
    if args.command == "synth":
        return _write(_synth(args), args)
    convert = {
        "nwb": _convert_nwb,
        "npz": _convert_npz,
        "binned": _convert_binned,
        "csv-mc-maze": _convert_csv,
    }[args.source]
    default_license = "cc-by-4.0" if args.source == "csv-mc-maze" else None
    return _write(convert(args), args, default_license)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, message already printed)
        return int(exc.code or 0)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError) as err:
        msg = " ".join(str(err).split())
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
