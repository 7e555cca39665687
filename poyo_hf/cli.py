"""The ``poyo-hf`` command.

Each subcommand is an importable program with its own ``main(argv)`` and typed argument
dataclasses (``HfArgumentParser``); this file only dispatches, so ``poyo-hf X --help`` is the
program's own help and ``python -m`` / tests can call the programs directly.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their command runs, so
# `poyo-hf --help` stays fast and a missing optional extra only breaks its own command.
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("poyo_hf.quickstart", "the main job: synthetic + real data, pretrain, evaluate, reload (CPU, <10 min)"),
    "demo": ("poyo_hf.demo", "load a preset, tokenize spikes and decode them (smoke test)"),
    "data": ("poyo_hf.data.cli", "dataset tools: convert (NWB / arrays / binned counts), synth"),
    "pretrain": ("poyo_hf.training.pretrain", "multi-session POYO pretraining with Accelerate"),
    "evaluate": ("poyo_hf.training.evaluate", "stitched R^2 of a checkpoint beside the Wiener filter"),
    "publish": ("poyo_hf.hub.publish", "push a checkpoint to the Hub with a model card rendered from its results"),
    "adapt": ("poyo_hf.training.adapt", "few-shot adaptation to a new session (unit identification / fine-tuning)"),
    "bench": ("poyo_hf.bench", "benchmarks: model, data, ... (prints a table; --json)"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: poyo-hf COMMAND [ARGS...]",
        "",
        "POYO / NDT neural population decoding, the Hugging Face way.",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `poyo-hf COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from poyo_hf import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"poyo-hf: unknown command {name!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    from poyo_hf.allocator import keep_freed_memory

    keep_freed_memory()  # large tensors reuse mapped pages (poyo_hf/allocator.py; POYO_HF_MALLOC=default to skip)
    module = importlib.import_module(COMMANDS[name][0])
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
