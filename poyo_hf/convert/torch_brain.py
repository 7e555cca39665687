"""Convert a torch_brain POYO checkpoint into a ``save_pretrained`` folder.

Accepted inputs (torch_brain 0.2.x):
  * a Lightning checkpoint: ``hyper_parameters["model"]`` holds the POYO constructor arguments,
    ``state_dict`` the weights with ``model.``-prefixed keys, and the unit / session
    vocabularies as ``unit_emb.vocab`` / ``session_emb.vocab`` ordered dicts (word -> row);
  * a plain ``POYO.state_dict()`` saved with ``torch.save`` (shapes are inferred; pass the
    scalars that cannot be inferred, e.g. ``sequence_length``, as overrides).

Security: the file is read with ``torch.load(weights_only=True)``, which only rebuilds tensors
and plain containers. Anything else (e.g. an omegaconf object inside the hyper-parameters) is
refused with a message naming the type; ``allow_unsafe_pickle=True`` (``--allow-unsafe-pickle``)
opts in to a full unpickle for files you trust.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..models.poyo import PoyoConfig, PoyoForDecoding, PoyoProcessor

# Types a Lightning checkpoint of POYO needs beyond what weights_only allows by default.
_EXTRA_SAFE_TYPES: list[Any] = [OrderedDict]

_HPARAM_MAP = {
    "sequence_length": "sequence_length",
    "latent_step": "latent_step",
    "num_latents_per_step": "num_latents_per_step",
    "dim": "hidden_size",
    "depth": "num_hidden_layers",
    "dim_head": "head_dim",
    "cross_heads": "num_cross_attention_heads",
    "self_heads": "num_self_attention_heads",
    "ffn_dropout": "ffn_dropout",
    "lin_dropout": "lin_dropout",
    "atn_dropout": "attention_dropout",
    "emb_init_scale": "initializer_range",
    "t_min": "rotary_t_min",
    "t_max": "rotary_t_max",
}


class UnsafeCheckpointError(ValueError):
    """The checkpoint needs a full unpickle (arbitrary code); refused unless opted in."""


def load_checkpoint(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> Mapping[str, Any]:
    """Read a torch checkpoint safely (``weights_only=True``) unless explicitly opted out."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    if allow_unsafe_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(_EXTRA_SAFE_TYPES):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError with the offending global in the text
        text = str(err)
        match = re.search(r"Unsupported global: GLOBAL ([\w\.]+)", text) or re.search(r"GLOBAL ([\w\.]+)", text)
        if match is None and "weights_only" not in text:
            raise
        kind = match.group(1) if match else "an object weights_only cannot rebuild"
        raise UnsafeCheckpointError(
            f"{str(path)!r} contains {kind}, which loading it would have to unpickle (that can run arbitrary "
            "code). Only tensors and plain containers are read by default. If you trust this file, pass "
            "--allow-unsafe-pickle (allow_unsafe_pickle=True)."
        ) from None


def _vocab_list(vocab: Any, name: str) -> list[str]:
    """torch_brain vocab (word -> row, with 'NA' at row 0) -> ids ordered by row 1..n."""
    if not isinstance(vocab, Mapping):
        raise ValueError(f"{name} must be an ordered dict of id -> row, got {type(vocab).__name__}.")
    rows = sorted((int(i), str(w)) for w, i in vocab.items() if int(i) != 0)
    expected = list(range(1, len(rows) + 1))
    if [i for i, _ in rows] != expected:
        raise ValueError(f"{name} rows are not 1..{len(rows)} (plus 'NA' at 0); the checkpoint is inconsistent.")
    return [w for _, w in rows]


def _infer_hparams(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    dim = state["unit_emb.weight"].shape[1]
    depth = len({k.split(".")[1] for k in state if k.startswith("proc_layers.")})
    head_dim = 64
    return {
        "dim": int(dim),
        "depth": depth,
        "dim_head": head_dim,
        "cross_heads": int(state["enc_atn.to_q.weight"].shape[0] // head_dim),
        "self_heads": int(state["proc_layers.0.0.to_qkv.weight"].shape[0] // (3 * head_dim)) if depth else 8,
        "num_latents_per_step": int(state["latent_emb.weight"].shape[0]),
    }


def _map_key(key: str, readout_name: str) -> str | None:
    """torch_brain POYO key -> PoyoForDecoding key (None = not a weight we keep)."""
    attn = {"norm": "norm", "norm_context": "context_norm", "to_q": "q_proj", "to_kv": "kv_proj",
            "to_qkv": "qkv_proj", "to_out": "o_proj"}
    ffn = {"0": "norm", "1.net.0": "fc1", "1.net.3": "fc2"}
    if key.endswith(".vocab") or key == "rotary_emb.omega":
        return None
    for emb in ("unit_emb", "session_emb", "token_type_emb", "latent_emb"):
        if key == f"{emb}.weight":
            return f"poyo.{key}"
    if key.startswith("readout."):
        return f"readouts.{readout_name}.{key.split('.', 1)[1]}"
    m = re.fullmatch(r"(enc|dec)_atn\.(\w+)\.(weight|bias)", key)
    if m:
        block = "encoder" if m.group(1) == "enc" else "decoder"
        return f"poyo.{block}.cross_attn.{attn[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(enc|dec)_ffn\.(0|1\.net\.0|1\.net\.3)\.(weight|bias)", key)
    if m:
        block = "encoder" if m.group(1) == "enc" else "decoder"
        return f"poyo.{block}.ffn.{ffn[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"proc_layers\.(\d+)\.0\.(\w+)\.(weight|bias)", key)
    if m:
        return f"poyo.layers.{m.group(1)}.self_attn.{attn[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"proc_layers\.(\d+)\.1\.(0|1\.net\.0|1\.net\.3)\.(weight|bias)", key)
    if m:
        return f"poyo.layers.{m.group(1)}.ffn.{ffn[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"unexpected key {key!r} in the torch_brain state dict; is this a POYO checkpoint?")


def convert_torch_brain_state(
    ckpt: Mapping[str, Any],
    readout_name: str = "hand_vel",
    **overrides: Any,
) -> tuple[PoyoForDecoding, PoyoProcessor]:
    """Build a (model, processor) pair from a loaded torch_brain checkpoint mapping."""
    if "state_dict" in ckpt:  # Lightning
        state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in ckpt["state_dict"].items()}
        hparams = dict((ckpt.get("hyper_parameters") or {}).get("model") or {})
    else:
        state, hparams = dict(ckpt), {}
    for required in ("unit_emb.weight", "session_emb.weight", "readout.weight", "enc_atn.to_q.weight"):
        if required not in state:
            raise ValueError(f"checkpoint has no {required!r}; it does not look like a torch_brain POYO checkpoint.")
    hparams.pop("_target_", None)
    hparams.pop("dim_out", None)
    merged = _infer_hparams(state)
    merged.update({k: v for k, v in hparams.items() if k in _HPARAM_MAP})
    kwargs = {_HPARAM_MAP[k]: v for k, v in merged.items() if k in _HPARAM_MAP}
    for k in ("sequence_length", "latent_step", "ffn_dropout", "lin_dropout", "attention_dropout",
              "initializer_range", "rotary_t_min", "rotary_t_max"):
        if k in kwargs:
            kwargs[k] = float(kwargs[k])
    units = _vocab_list(state["unit_emb.vocab"], "unit_emb.vocab") if "unit_emb.vocab" in state else [
        f"unit_{i}" for i in range(1, state["unit_emb.weight"].shape[0])
    ]
    sessions = _vocab_list(state["session_emb.vocab"], "session_emb.vocab") if "session_emb.vocab" in state else [
        f"session_{i}" for i in range(1, state["session_emb.weight"].shape[0])
    ]
    dim_out = int(state["readout.weight"].shape[0])
    kwargs.update(
        unit_vocab_size=len(units) + 1,
        session_vocab_size=len(sessions) + 1,
        readout_dims={readout_name: dim_out},
    )
    kwargs.update(overrides)
    config = PoyoConfig(**kwargs)
    model = PoyoForDecoding(config)
    ours = {}
    for key, value in state.items():
        new = _map_key(key, readout_name)
        if new is not None:
            ours[new] = value
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise ValueError(f"conversion mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}.")
    # torch_brain unit ids are "<session id>/<...>": recover each session's unit table from the prefix.
    session_units = {s: [u for u in units if u.startswith(s + "/")] for s in sessions}
    processor = PoyoProcessor(
        sequence_length=config.sequence_length,
        unit_vocab=units,
        session_vocab=sessions,
        session_units={s: u for s, u in session_units.items() if u},
        readout_names=[readout_name],
    )
    processor.check_config(config)
    return model.eval(), processor


def convert_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    readout_name: str = "hand_vel",
    allow_unsafe_pickle: bool = False,
    **overrides: Any,
) -> Path:
    """Read ``checkpoint`` and write a ``save_pretrained`` folder (config, safetensors, processor)."""
    ckpt = load_checkpoint(checkpoint, allow_unsafe_pickle=allow_unsafe_pickle)
    model, processor = convert_torch_brain_state(ckpt, readout_name=readout_name, **overrides)
    out = Path(output_dir)
    tmp = out.with_name(out.name + ".tmp-convert")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
