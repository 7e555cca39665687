#!/usr/bin/env python
"""Convert a torch_brain POYO checkpoint into a Hugging Face folder.

    python scripts/convert_torch_brain_checkpoint.py CHECKPOINT OUTPUT_DIR [--readout-name hand_vel]

Then publish it with ``poyo-hf publish OUTPUT_DIR NAMESPACE/REPO``. The checkpoint is read with
``torch.load(weights_only=True)``; ``--allow-unsafe-pickle`` opts in to a full unpickle of a file
you trust (needed only if the file holds non-tensor Python objects).
"""

from __future__ import annotations

import argparse
import sys

import poyo_hf  # noqa: F401  (registers the Auto classes)
from poyo_hf.convert.torch_brain import UnsafeCheckpointError, convert_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="torch_brain Lightning .ckpt or a torch.save'd POYO.state_dict()")
    parser.add_argument("output_dir", help="folder to write (config.json, model.safetensors, preprocessor_config.json)")
    parser.add_argument("--readout-name", default="hand_vel", help="name of the readout (default: hand_vel)")
    parser.add_argument("--sequence-length", type=float, default=None, help="window length (s) for a plain state dict")
    parser.add_argument("--latent-step", type=float, default=None, help="latent step (s) for a plain state dict")
    parser.add_argument("--allow-unsafe-pickle", action="store_true", help="unpickle arbitrary objects (trusted files only)")
    args = parser.parse_args(argv)
    overrides = {}
    if args.sequence_length is not None:
        overrides["sequence_length"] = args.sequence_length
    if args.latent_step is not None:
        overrides["latent_step"] = args.latent_step
    try:
        out = convert_checkpoint(
            args.checkpoint, args.output_dir, readout_name=args.readout_name,
            allow_unsafe_pickle=args.allow_unsafe_pickle, **overrides,
        )
    except (UnsafeCheckpointError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
