"""Small session checkpoints: a unit-identification result stored as only what changed.

Unit identification (``poyo-hf adapt --mode unit-identification``) leaves every weight of the base
bit-identical and only appends rows to the unit and session embedding tables. A *session delta*
folder therefore holds:

* ``session_delta.safetensors``: ``unit_emb_rows`` (n_new_units, D) and ``session_emb_rows``
  (n_new_sessions, D), the appended rows in vocabulary order;
* ``session_delta.json``: the new sessions with their unit ids (the vocabulary entries, in order),
  the base's table sizes, and a pointer to the exact base: ``base_model`` (Hub id or path),
  ``base_revision`` (the commit sha when the base came from a Hub) and ``base_weights_sha256``
  (the sha256 of the base's ``model.safetensors``, checked on load, so a local base that changed
  since is refused instead of silently giving other outputs).

:func:`load_session_checkpoint` loads the base and applies the delta in one call; its outputs are
identical (``torch.equal``) to the full adapted model's.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

DELTA_WEIGHTS = "session_delta.safetensors"
DELTA_META = "session_delta.json"
DELTA_FILES = (DELTA_WEIGHTS, DELTA_META)
DELTA_FORMAT = "poyo-session-delta"
DELTA_VERSION = 1


def _state_without_embeddings(model: Any) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k not in ("poyo.unit_emb.weight", "poyo.session_emb.weight")}


def save_session_delta(
    model: Any,
    processor: Any,
    base_id: str,
    base_revision: str | None,
    out_dir: str | os.PathLike,
    *,
    base_dir: str | os.PathLike | None = None,
) -> Path:
    """Write the session delta of an adapted ``model`` / ``processor`` against its base.

    Args:
        model, processor: the adapted model (a unit-identification result) and its processor.
        base_id: the base as the user names it (Hub id or folder path); recorded in the delta.
        base_revision: the base's exact Hub commit (None for a local folder).
        out_dir: the delta folder (replaced atomically).
        base_dir: a local copy of the base (default: resolved from ``base_id`` / ``base_revision``).

    Raises ``ValueError`` when the model is not the base plus appended rows (e.g. a full
    fine-tune, whose trunk changed: save the full model instead).
    """
    from safetensors.torch import save_file

    from poyo_hf import PoyoForDecoding, PoyoProcessor

    from .adapt import resolve_base, sha256_file

    base_dir = Path(base_dir) if base_dir is not None else resolve_base(base_id, base_revision)["local_dir"]
    base = PoyoForDecoding.from_pretrained(base_dir)
    base_proc = PoyoProcessor.from_pretrained(base_dir)
    nu, ns = base_proc.unit_vocab_size, base_proc.session_vocab_size
    if list(processor.unit_vocab[: nu - 1]) != list(base_proc.unit_vocab) or list(
        processor.session_vocab[: ns - 1]
    ) != list(base_proc.session_vocab):
        raise ValueError(f"the processor's vocabulary does not extend the base {base_id!r}'s; is this its base?")
    ours, theirs = _state_without_embeddings(model), _state_without_embeddings(base)
    changed = sorted(k for k in theirs if k not in ours or not torch.equal(ours[k], theirs[k]))
    emb, bemb = model.poyo.unit_emb.weight.detach(), base.poyo.unit_emb.weight
    semb, bsemb = model.poyo.session_emb.weight.detach(), base.poyo.session_emb.weight
    if not torch.equal(emb[:nu], bemb) or not torch.equal(semb[:ns], bsemb):
        changed.append("rows of the base's own units or sessions")
    if changed:
        raise ValueError(
            f"the model differs from its base {base_id!r} beyond new embedding rows ({changed[:3]}...): a session "
            "delta only holds a unit-identification result; save the full model with save_pretrained instead."
        )
    sessions = {sid: list(processor.session_units[sid]) for sid in processor.session_vocab[ns - 1 :]}
    new_units = list(processor.unit_vocab[nu - 1 :])
    if [u for units in sessions.values() for u in units] != new_units:
        raise ValueError(
            "the new units are not exactly the new sessions' units in order (a session reuses base units?); "
            "such a vocabulary cannot be stored as a session delta."
        )
    meta = {
        "format": DELTA_FORMAT,
        "version": DELTA_VERSION,
        "base_model": str(base_id),
        "base_revision": base_revision,
        "base_weights_sha256": sha256_file(Path(base_dir) / "model.safetensors"),
        "base_unit_vocab_size": nu,
        "base_session_vocab_size": ns,
        "hidden_size": int(model.config.hidden_size),
        "sessions": sessions,
    }
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {"unit_emb_rows": emb[nu:].contiguous().clone(), "session_emb_rows": semb[ns:].contiguous().clone()},
        str(tmp / DELTA_WEIGHTS),
        metadata={"format": DELTA_FORMAT},
    )
    (tmp / DELTA_META).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _delta_files(path_or_id: str | os.PathLike, revision: str | None) -> tuple[Path, Path, str | None]:
    """Local paths of the delta's two files (downloading from a Hub when not a folder)."""
    p = Path(path_or_id)
    if p.is_dir():
        missing = [f for f in DELTA_FILES if not (p / f).is_file()]
        if missing:
            raise ValueError(f"{path_or_id!r} is not a session delta folder (missing {missing}).")
        return p / DELTA_META, p / DELTA_WEIGHTS, None
    from huggingface_hub import HfApi, hf_hub_download

    try:
        sha = HfApi().model_info(str(path_or_id), revision=revision).sha
        meta = Path(hf_hub_download(str(path_or_id), DELTA_META, revision=sha))
        weights = Path(hf_hub_download(str(path_or_id), DELTA_WEIGHTS, revision=sha))
    except Exception as err:  # RepositoryNotFound, EntryNotFound, offline, ...
        raise ValueError(f"cannot load the session delta {str(path_or_id)!r} (revision {revision!r}): {err}") from err
    return meta, weights, sha


def load_session_checkpoint(
    path_or_id: str | os.PathLike, *, revision: str | None = None, base: str | os.PathLike | None = None
) -> tuple[Any, Any]:
    """``(model, processor)``: the delta's base with the delta applied (one call).

    Args:
        path_or_id: a session delta folder or a Hub repo id holding one.
        revision: the delta's Hub revision.
        base: where the base is, overriding the recorded ``base_model`` (e.g. a moved folder);
            its weights must still hash to the recorded ``base_weights_sha256``.
    """
    from safetensors.torch import load_file

    from .adapt import load_base

    meta_path, weights_path, _ = _delta_files(path_or_id, revision)
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != DELTA_FORMAT:
        raise ValueError(f"{path_or_id!r}: {DELTA_META} has format {meta.get('format')!r}, expected {DELTA_FORMAT!r}.")
    if int(meta.get("version", 0)) > DELTA_VERSION:
        raise ValueError(f"{path_or_id!r}: session delta version {meta['version']} is newer than this poyo_hf reads.")
    base_ref = str(base) if base is not None else meta["base_model"]
    model, processor, resolved = load_base(base_ref, None if base is not None else meta.get("base_revision"))
    if resolved["weights_sha256"] != meta["base_weights_sha256"]:
        raise ValueError(
            f"the base {base_ref!r} is not the one this delta was made on (weights sha256 "
            f"{resolved['weights_sha256'][:12]}... != recorded {meta['base_weights_sha256'][:12]}...); give the "
            "original base with base=..."
        )
    if (processor.unit_vocab_size, processor.session_vocab_size) != (
        meta["base_unit_vocab_size"],
        meta["base_session_vocab_size"],
    ):
        raise ValueError(f"the base {base_ref!r} has other vocabulary sizes than the delta records.")
    rows = load_file(str(weights_path))
    sessions: Mapping[str, list[str]] = meta["sessions"]
    for sid, units in sessions.items():
        processor.add_session(sid, units)
    model.grow_vocabularies(processor)
    nu, ns = meta["base_unit_vocab_size"], meta["base_session_vocab_size"]
    unit_rows, session_rows = rows["unit_emb_rows"], rows["session_emb_rows"]
    if unit_rows.shape != (processor.unit_vocab_size - nu, model.config.hidden_size) or session_rows.shape != (
        processor.session_vocab_size - ns,
        model.config.hidden_size,
    ):
        raise ValueError(f"{path_or_id!r}: the delta's rows do not match its vocabulary entries.")
    with torch.no_grad():
        model.poyo.unit_emb.weight[nu:] = unit_rows
        model.poyo.session_emb.weight[ns:] = session_rows
    processor.check_config(model.config)
    model.eval()
    return model, processor


def push_session_delta(
    delta_dir: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
) -> str:
    """Upload a session delta folder (with a card naming ``base_model``) to a Hub repo; returns the commit sha."""
    from huggingface_hub import HfApi

    delta_dir = Path(delta_dir)
    meta = json.loads((delta_dir / DELTA_META).read_text())
    card = render_delta_card(delta_dir, repo_id=repo_id)
    tmp = delta_dir / "README.md.tmp"
    tmp.write_text(str(card))
    os.replace(tmp, delta_dir / "README.md")
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(delta_dir),
        revision=revision,
        commit_message=commit_message or f"POYO session delta for {', '.join(meta['sessions'])}",
    )
    return info.oid


def render_delta_card(delta_dir: str | os.PathLike, *, repo_id: str | None = None) -> Any:
    """A model card for a session delta, rendered from its metadata and measured results."""
    from huggingface_hub import ModelCard, ModelCardData

    delta_dir = Path(delta_dir)
    meta = json.loads((delta_dir / DELTA_META).read_text())
    results_path = delta_dir / "eval_results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    info_path = delta_dir / "training_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    synthetic = any(d.get("synthetic") for d in info.get("datasets", []))
    # A Hub base is named by id; a local base has no id the Hub could link to.
    hub_base = meta["base_revision"] is not None
    data = ModelCardData(
        library_name="poyo_hf",
        pipeline_tag="time-series-forecasting",
        tags=["poyo", "neural-decoding", "session-delta"] + (["synthetic-data"] if synthetic else []),
        base_model=meta["base_model"] if hub_base else None,
    )
    sessions = ", ".join(f"`{s}` ({len(u)} units)" for s, u in meta["sessions"].items())
    lines = [
        f"# POYO session delta{f' {repo_id}' if repo_id else ''}",
        "",
        f"Unit-identification adaptation of `{meta['base_model']}`"
        + (f" at commit `{meta['base_revision']}`" if hub_base else "")
        + f" to {sessions}: only the new unit and session embedding rows are stored; every other weight is the "
        "base's, unchanged.",
        "",
    ]
    if results:
        r2, w = results.get("r2"), results.get("wiener_r2")
        lines += [
            f"Measured on the session's held-out {results.get('split', '?')} split"
            + (" (synthetic data)" if synthetic else "")
            + f": R^2 {r2:.3f}"
            + (f", Wiener filter {w:.3f}" if w is not None else "")
            + f", trained on {results.get('n_train_trials', '?')} trials.",
            "",
        ]
    lines += [
        "```python",
        "from poyo_hf.training.session_delta import load_session_checkpoint",
        f"model, processor = load_session_checkpoint({(repo_id or 'DELTA_FOLDER')!r})",
        "```",
        "",
        f"The base's weights must hash to sha256 `{meta['base_weights_sha256']}`.",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


__all__ = [
    "DELTA_FILES",
    "load_session_checkpoint",
    "push_session_delta",
    "render_delta_card",
    "save_session_delta",
]
