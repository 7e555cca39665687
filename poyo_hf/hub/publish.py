"""``poyo-hf publish CHECKPOINT_DIR REPO_ID``: push a POYO checkpoint with its card to the Hub.

What is uploaded (staged in a temporary folder; the checkpoint folder itself is never written):

* ``config.json`` + ``model.safetensors`` + ``preprocessor_config.json`` (vocabularies), re-saved
  through ``save_pretrained`` from the loaded, checked model and processor, so that both carry
  an ``auto_map`` and the modeling files (``configuration_poyo.py``, ``modeling_poyo.py``,
  ``cpu_kernels.py``, ``processing_poyo.py``) ship beside them: ``from_pretrained(repo, trust_remote_code=True)``
  then works where ``poyo_hf`` is not installed;
* ``eval_results.json``, ``training_info.json`` and the plots, as they are;
* ``README.md``: the model card rendered from those files (:func:`render_model_card`).

Then ``create_repo(exist_ok=True)`` and one ``upload_folder`` commit, whose sha is returned
(pin it with ``from_pretrained(repo, revision=sha)``).

Failure modes, each with a message that says what to do: an invalid repo id -> ``ValueError``
before any request; an incomplete or inconsistent checkpoint -> ``FileNotFoundError`` /
``ValueError`` before any request; an unreachable or refusing Hub -> :class:`PublishError`
(a ``RuntimeError``) naming the endpoint and the repo.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from .cards import read_checkpoint_files, render_model_card

__all__ = ["PublishError", "check_repo_id", "main", "publish", "render_model_card", "stage_checkpoint"]

# Copied to the Hub as they are (when present): the measurements the card is rendered from.
RECORD_FILES: tuple[str, ...] = ("eval_results.json", "training_info.json")


class PublishError(RuntimeError):
    """The Hub could not be reached or refused the upload (the local checkpoint is unchanged)."""


def check_repo_id(repo_id: Any) -> str:
    """Return ``repo_id`` if it is a valid Hub model repo id, else raise ``ValueError`` naming it.

    Uses ``huggingface_hub.utils.validate_repo_id`` (the Hub client's own rule) and additionally
    requires the ``namespace/name`` form, so a repo id never depends on which account is logged in.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

    fix = "Use 'namespace/name' with letters, digits, '-', '_' and '.', e.g. 'my-lab/poyo-mp'."
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"invalid Hub repo id {repo_id!r}: expected a non-empty string. {fix}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"invalid Hub repo id {repo_id!r}: {err} {fix}") from None
    if repo_id.count("/") != 1:
        raise ValueError(f"invalid Hub repo id {repo_id!r}: it has no namespace. {fix}")
    return repo_id


def stage_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    staging: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    license: str | None = None,
) -> Path:
    """Write everything :func:`publish` uploads into ``staging`` (an empty or new folder).

    The model and processor are loaded with :func:`poyo_hf.load_checkpoint` (which refuses an
    unreadable weights file and vocabularies that disagree with the embedding tables) and saved
    again with ``save_pretrained``: with the Auto classes registered for remote code, that writes
    the ``auto_map`` entries and copies the self-contained modeling files.
    """
    from .loading import load_checkpoint

    source = Path(checkpoint_dir)
    files = read_checkpoint_files(source)  # completeness + readable safetensors header, named errors
    card = render_model_card(source, repo_id=repo_id, license=license)
    model, processor = load_checkpoint(source)
    out = Path(staging)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    for name in RECORD_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    for rel in files.plots:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, out / rel)
    card.save(str(out / "README.md"))
    return out


def publish(
    checkpoint_dir: str | os.PathLike[str],
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    license: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload a POYO checkpoint folder with its rendered card; returns the commit sha.

    Args:
        checkpoint_dir: a folder with config.json, model.safetensors, preprocessor_config.json
            and, when the training programs wrote them, eval_results.json, training_info.json
            and plots (``*.png``, ``eval/*.png``). It is only read.
        repo_id: ``namespace/name`` of the model repo (created if missing).
        revision: branch to commit to (created from main if missing); default main.
        private: create the repo private (an existing repo keeps its visibility).
        commit_message: default "Upload POYO checkpoint <folder name>".
        token: Hub token (default: the logged-in one / ``HF_TOKEN``).
        license: license id for the card (see :func:`render_model_card`).
        endpoint: Hub URL (default ``HF_ENDPOINT`` / huggingface.co).

    Raises:
        ValueError: invalid repo id (before anything else), or an inconsistent checkpoint.
        FileNotFoundError: the folder is not a complete checkpoint.
        PublishError: the Hub was unreachable or refused the upload.
    """
    check_repo_id(repo_id)
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ValueError(f"revision must be a branch name, got {revision!r}.")
    source = Path(checkpoint_dir)
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    where = f"{api.endpoint} (repo {repo_id!r}{f', branch {revision!r}' if revision else ''})"
    with tempfile.TemporaryDirectory(prefix="poyo-publish-") as tmp:
        staged = stage_checkpoint(source, Path(tmp) / "repo", repo_id=repo_id, license=license)
        try:
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=str(staged),
                repo_type="model",
                revision=revision,
                commit_message=commit_message or f"Upload POYO checkpoint {source.resolve().name}",
                # Files of an older push that this one no longer has (renamed plots, say) go away;
                # the Hub client never deletes .gitattributes.
                delete_patterns=["*"],
            )
        except Exception as err:
            if not _is_hub_error(err):
                raise
            raise PublishError(
                f"could not publish {source} to {where}: {type(err).__name__}: {err}. Check the endpoint "
                "(HF_ENDPOINT), your network and your write access to the repo (token); the local checkpoint "
                "was not changed."
            ) from err
    return str(commit.oid)


def _is_hub_error(err: BaseException) -> bool:
    """Errors of the Hub or of the transport: HTTP answers (``HfHubHTTPError`` is an ``OSError``),
    refused or dropped connections and timeouts (the HTTP client's transport errors, matched by
    module so the check does not depend on which httpx fork huggingface_hub ships with)."""
    if isinstance(err, (OSError, ConnectionError, TimeoutError)):
        return True
    return any(
        cls.__module__.split(".")[0].startswith(("httpx", "httpcore", "requests", "urllib3"))
        for cls in type(err).__mro__
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="poyo-hf publish",
        description="Publish a POYO checkpoint folder to the Hub with a model card rendered from its "
        "config, weights, eval_results.json and training_info.json.",
    )
    parser.add_argument("checkpoint_dir", help="checkpoint folder (e.g. a pretrain run's OUTPUT/model)")
    parser.add_argument("repo_id", help="namespace/name of the model repo")
    parser.add_argument("--revision", default=None, help="branch to commit to (default main)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--commit-message", default=None, help="commit message")
    parser.add_argument(
        "--license", default=None, help="license id for the card (default: mit for synthetic data, else other)"
    )
    parser.add_argument(
        "--render-only",
        metavar="DIR",
        default=None,
        help="write the staged repo (card, weights, code) to DIR and upload nothing",
    )
    args = parser.parse_args(argv)
    try:
        if args.render_only is not None:
            check_repo_id(args.repo_id)
            out = Path(args.render_only)
            if out.exists() and any(out.iterdir()):
                raise ValueError(f"--render-only folder {out} is not empty; give a new folder.")
            stage_checkpoint(args.checkpoint_dir, out, repo_id=args.repo_id, license=args.license)
            print(json.dumps({"staged": str(out)}))
            return 0
        sha = publish(
            args.checkpoint_dir,
            args.repo_id,
            revision=args.revision,
            private=args.private,
            commit_message=args.commit_message,
            license=args.license,
        )
    except (ValueError, FileNotFoundError, PublishError) as err:
        print(f"poyo-hf publish: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"repo_id": args.repo_id, "commit": sha}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
