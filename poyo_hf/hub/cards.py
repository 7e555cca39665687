"""Model cards rendered from a checkpoint's own files, never from numbers typed by hand.

Everything the card states comes from the checkpoint folder (contract: ``/tmp/coord/INTERFACE.md``
and ``docs/presets.md``):

* ``config.json``: architecture, preset, vocabulary sizes, readouts;
* ``model.safetensors``: the parameter count (tensor shapes read from the file header);
* ``eval_results.json``: R² per session and its mean, beside the Wiener-filter baseline;
* ``training_info.json``: kind of run, base model, datasets with their provenance (synthetic
  data is called synthetic, with its sessions, spikes and hours), recipe and compute.

The text comes from the Jinja template ``hub_cards/model_card_template.md`` through
``huggingface_hub.ModelCard.from_template``; the YAML front matter from ``ModelCardData`` (with
``EvalResult`` entries that become the ``model-index``).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_TEMPLATE",
    "CheckpointFiles",
    "count_parameters",
    "read_checkpoint_files",
    "render_model_card",
]

DEFAULT_TEMPLATE = Path(__file__).resolve().parents[2] / "hub_cards" / "model_card_template.md"
"""The card template; lives beside the rendered example cards in ``hub_cards/``."""

# library_name "transformers", not "poyo_hf": the repo is a transformers checkpoint (config.json +
# model.safetensors + auto_map remote code) that plain transformers loads with
# trust_remote_code=True, so the Hub's transformers integration (usage snippet, download counts)
# applies; "poyo_hf" is no library the Hub knows. The package is named in the tags instead.
LIBRARY_NAME = "transformers"
PIPELINE_TAG = "time-series-forecasting"  # no neural-decoding tag exists; the closest (hf-notes)
BASE_TAGS: tuple[str, ...] = ("poyo", "poyo_hf", "neuroscience", "neural-decoding", "spikes", "custom_code")
KIND_TEXT = {
    "pretrain": "pretrained from scratch",
    "full-finetune": "fine-tuned (all weights)",
    "unit-identification": "adapted by unit identification (only the unit and session embeddings trained)",
}
# Recipe keys shown in the card's table, in this order (the whole recipe is in training_info.json).
RECIPE_KEYS: tuple[str, ...] = (
    "preset",
    "config_overrides",
    "init_from",
    "max_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "weight_decay",
    "flat_fraction",
    "final_lr_ratio",
    "max_grad_norm",
    "optimizer",
    "unit_dropout",
    "mixed_precision",
    "seed",
    "eval_split",
)


@dataclass
class CheckpointFiles:
    """What a checkpoint folder holds, read once (``eval_results``/``training_info`` may be absent)."""

    path: Path
    config: dict[str, Any]
    n_parameters: int
    eval_results: dict[str, Any] | None = None
    training_info: dict[str, Any] | None = None
    plots: list[str] = field(default_factory=list)  # paths relative to ``path``


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} cannot be read as JSON ({err}); re-export the checkpoint.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def count_parameters(weights: str | os.PathLike[str]) -> int:
    """Number of parameters in a safetensors file, from its header (no tensor is loaded).

    Raises:
        ValueError: the file is truncated or corrupted (the message names it).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as fh:
            return int(sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys()))
    except Exception as err:  # SafetensorError (Rust) or OSError
        raise ValueError(
            f"{weights} cannot be read as safetensors ({err}): the file is truncated or corrupted; "
            "re-export the checkpoint with save_pretrained."
        ) from err


def read_checkpoint_files(checkpoint_dir: str | os.PathLike[str]) -> CheckpointFiles:
    """Read the card's inputs from a checkpoint folder.

    Raises:
        FileNotFoundError: not a folder, or no ``config.json`` / ``model.safetensors`` /
            ``preprocessor_config.json`` in it.
        ValueError: a file is unreadable (named) or the config is not a POYO config.
    """
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist (or is not a folder).")
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder} is not a complete checkpoint: {name} is missing. A checkpoint folder holds "
                "config.json, model.safetensors and preprocessor_config.json (model.save_pretrained + "
                "processor.save_pretrained)."
            )
    config = _read_json(folder / "config.json")
    if config.get("model_type") != "poyo":
        raise ValueError(
            f"{folder / 'config.json'} has model_type {config.get('model_type')!r}; publishing renders POYO "
            "cards only (model_type 'poyo')."
        )
    files = CheckpointFiles(path=folder, config=config, n_parameters=count_parameters(folder / "model.safetensors"))
    if (folder / "eval_results.json").is_file():
        files.eval_results = _read_json(folder / "eval_results.json")
    if (folder / "training_info.json").is_file():
        files.training_info = _read_json(folder / "training_info.json")
    files.plots = sorted(
        str(p.relative_to(folder)).replace(os.sep, "/")
        for pattern in ("*.png", "eval/*.png")
        for p in folder.glob(pattern)
    )
    return files


# --------------------------------------------------------------------------- formatting
def _r2(x: Any) -> str:
    return "n/a" if x is None or not math.isfinite(float(x)) else f"{float(x):.4f}"


def _int(x: Any) -> str:
    return f"{int(x):,}"


def _is_hub_id(value: Any) -> bool:
    """A ``namespace/name`` repo id (not a local path): only those may go into the card's YAML."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

    if not isinstance(value, str) or value.count("/") != 1 or value.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def session_results(eval_results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-session rows ``{session, r2, wiener_r2, n_samples}`` from either layout of the results
    file: ``r2_per_session``/``wiener_r2_per_session``/``n_eval_samples`` (what
    ``training.evaluation`` writes) or ``sessions: {id: {r2, wiener_r2, ...}}``."""
    rows: dict[str, dict[str, Any]] = {}
    for sid, r2 in (eval_results.get("r2_per_session") or {}).items():
        rows[sid] = {"session": sid, "r2": r2}
    for sid, r2 in (eval_results.get("wiener_r2_per_session") or {}).items():
        rows.setdefault(sid, {"session": sid, "r2": None})["wiener_r2"] = r2
    for sid, n in (eval_results.get("n_eval_samples") or {}).items():
        if sid in rows:
            rows[sid]["n_samples"] = n
    for sid, entry in (eval_results.get("sessions") or {}).items():
        if isinstance(entry, dict):
            row = rows.setdefault(sid, {"session": sid, "r2": None})
            row["r2"] = entry.get("r2", row.get("r2"))
            row["wiener_r2"] = entry.get("wiener_r2", row.get("wiener_r2"))
            row["n_samples"] = entry.get("n_eval_samples", entry.get("n_samples", row.get("n_samples")))
    return [rows[sid] for sid in sorted(rows)]


# --------------------------------------------------------------------------- rendering
def _eval_results_yaml(files: CheckpointFiles, datasets: list[dict[str, Any]], model_name: str) -> list[Any]:
    """``EvalResult`` entries: POYO R² per session (dataset config = session) and the mean, and
    the Wiener-filter baseline beside each (metric ``wiener_filter_r2``)."""
    from huggingface_hub import EvalResult

    res = files.eval_results or {}
    readout = ", ".join(files.config.get("readout_dims") or {}) or "behaviour"
    split = str(res.get("split") or "test")
    by_session = {sid: d for d in datasets for sid in d.get("session_ids") or []}

    def dataset_of(sid: str | None) -> tuple[str, str]:
        d = by_session.get(sid) if sid else (datasets[0] if len(datasets) == 1 else None)
        if d is None:
            names = sorted({x["name"] for x in datasets}) or ["evaluation data"]
            return "poyo_hf-corpus", " + ".join(names)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(d["name"])).strip("-") or "dataset"
        return (d["repo_id"] if _is_hub_id(d.get("repo_id")) else slug), d["name"]

    out = []

    def add(sid: str | None, metric: str, name: str, value: Any) -> None:
        if value is None or not math.isfinite(float(value)):
            return
        dtype, dname = dataset_of(sid)
        out.append(
            EvalResult(
                task_type=PIPELINE_TAG,
                task_name=f"Neural decoding of {readout}",
                dataset_type=dtype,
                dataset_name=dname,
                dataset_config=sid,
                dataset_split=split,
                metric_type=metric,
                metric_name=name,
                metric_value=float(value),
            )
        )

    add(None, "r2", "R² (mean over sessions)", res.get("r2"))
    add(None, "wiener_filter_r2", "Wiener filter R² (baseline, mean over sessions)", res.get("wiener_r2"))
    for row in session_results(res):
        add(row["session"], "r2", "R²", row.get("r2"))
        add(row["session"], "wiener_filter_r2", "Wiener filter R² (baseline)", row.get("wiener_r2"))
    return out


def _datasets_context(info: dict[str, Any] | None) -> list[dict[str, Any]]:
    out = []
    for d in (info or {}).get("datasets") or []:
        entry = dict(d)
        entry.setdefault("name", Path(str(d.get("source", "dataset"))).name)
        repo = d.get("repo_id")
        entry["label"] = (
            f"[{repo}](https://huggingface.co/datasets/{repo})" if _is_hub_id(repo) else f"`{entry['name']}`"
        )
        entry["hours_text"] = f"{float(d.get('duration_s', 0.0)) / 3600:.2f}"
        entry["n_units"] = _int(d.get("n_units", 0))
        entry["n_spikes"] = _int(d.get("n_spikes", 0))
        entry["provenance"] = str(d.get("provenance") or "not stated").replace("|", "/")
        out.append(entry)
    return out


def _data_statement(info: dict[str, Any] | None) -> str:
    if info is None:
        return (
            "Not recorded: this checkpoint folder holds no `training_info.json` (e.g. weights converted "
            "from another release; see that release for its training data)."
        )
    ds = info.get("datasets") or []
    if not ds:
        return "`training_info.json` lists no datasets."
    sessions = sum(int(d.get("n_sessions", 0)) for d in ds)
    spikes = sum(int(d.get("n_spikes", 0)) for d in ds)
    hours = sum(float(d.get("duration_s", 0.0)) for d in ds) / 3600
    amount = f"{sessions} sessions, {_int(spikes)} spikes, {hours:.2f} hours of recording"
    if all(d.get("synthetic") for d in ds):
        return (
            f"**Synthetic data only.** This model was trained on simulated spiking data ({amount}), "
            "not on recordings from any animal: the sessions come from the seeded `poyo_hf` simulator "
            "(`poyo_hf.data.synthetic`), as their provenance below says."
        )
    if any(d.get("synthetic") for d in ds):
        return f"Trained on a mix of **synthetic** (simulated) and real data ({amount} in all); see the table."
    return f"Trained on {amount} of recorded data; provenance as stated by each dataset."


def render_model_card(
    checkpoint_dir: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    license: str | None = None,
    template_path: str | os.PathLike[str] | None = None,
) -> Any:
    """Render the model card of a checkpoint folder (numbers from its files, see module docstring).

    Args:
        checkpoint_dir: a POYO ``save_pretrained`` folder (plus ``eval_results.json`` and
            ``training_info.json`` when the training programs wrote them).
        repo_id: the Hub repo the card is for (title and loading snippets); default: the
            folder name.
        license: SPDX-style license id for the YAML; default ``"mit"`` (this package's licence)
            when every training dataset is synthetic, else ``"other"`` (state the data's terms).
        template_path: a Jinja template (default ``hub_cards/model_card_template.md``).

    Returns:
        a ``huggingface_hub.ModelCard`` (``.save(path)`` writes ``README.md``).
    """
    from huggingface_hub import ModelCard, ModelCardData

    files = read_checkpoint_files(checkpoint_dir)
    template = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(
            f"model card template {template} not found; pass template_path= (the default lives in the "
            "poyo_hf source tree under hub_cards/)."
        )
    cfg, info, res = files.config, files.training_info, files.eval_results
    model_name = (repo_id or files.path.resolve().name).split("/")[-1]
    datasets = _datasets_context(info)
    synthetic = bool(datasets) and all(d.get("synthetic") for d in datasets)
    kind = str((info or {}).get("kind") or "pretrain")
    base = (info or {}).get("base_model")
    base_revision = (info or {}).get("base_revision")
    recipe = (info or {}).get("recipe") or {}
    compute = (info or {}).get("compute") or {}

    tags = list(BASE_TAGS)
    if cfg.get("preset"):
        tags.append(str(cfg["preset"]))
    if synthetic:
        tags.append("synthetic-data")
    extra: dict[str, Any] = {}
    if base and kind != "pretrain" and _is_hub_id(base):
        extra["base_model"] = base
        extra["base_model_relation"] = "finetune"
    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        license=license or ("mit" if synthetic else "other"),
        tags=tags,
        datasets=[d["repo_id"] for d in datasets if _is_hub_id(d.get("repo_id"))] or None,
        model_name=model_name,
        eval_results=_eval_results_yaml(files, datasets, model_name) or None,
        **extra,
    )

    preset = cfg.get("preset")
    preset_text = f"`{preset}`" if preset else "none (custom shape)"
    if preset and recipe.get("config_overrides"):
        preset_text += f", with config overrides `{recipe['config_overrides']}`"
    readouts = cfg.get("readout_dims") or {}
    readouts_text = ", ".join(f"`{k}` ({v} dims)" for k, v in readouts.items())

    what = "synthetic spiking data" if synthetic else "spiking data"
    if info is None:
        summary = "A POYO neural population decoder (how it was trained is not recorded with this checkpoint)."
    elif kind == "pretrain":
        summary = f"A POYO neural population decoder, {KIND_TEXT['pretrain']} on {what} with `poyo-hf pretrain`."
    else:
        summary = f"A POYO neural population decoder, {KIND_TEXT.get(kind, kind)} from `{base}`"
        summary += f" (revision `{base_revision}`)" if base_revision else ""
        summary += f" on {what}."
    summary += f" It decodes {readouts_text} from spike times."
    if res is not None and res.get("r2") is not None:
        summary += f" Held-out R² {_r2(res.get('r2'))} (Wiener filter: {_r2(res.get('wiener_r2'))})."

    recipe_rows = []
    for key in RECIPE_KEYS:
        if key in recipe and recipe[key] is not None:
            recipe_rows.append((key, f"`{recipe[key]}`" if key == "config_overrides" else recipe[key]))
    if res is not None and res.get("learning_rate") is not None and recipe.get("learning_rate") is None:
        recipe_rows.append(("learning_rate (from the batch-size rule)", res["learning_rate"]))
    recipe_statement = (
        "The full run arguments are in `training_info.json` (`recipe`); the main ones:"
        if recipe
        else "Not recorded (no `training_info.json` recipe)."
    )
    compute_rows = []
    names = {
        "device": "device",
        "processes": "processes",
        "precision": "precision",
        "steps": "optimizer steps",
        "train_windows_seen": "training windows seen",
        "wall_seconds": "wall-clock seconds (training + final evaluation)",
    }
    for key, label in names.items():
        if key in compute:
            value = compute[key]
            if key == "wall_seconds":
                value = f"{float(value):.1f}"
            elif key in ("steps", "train_windows_seen"):
                value = _int(value)
            compute_rows.append((label, value))
    for lib, version in ((info or {}).get("software") or {}).items():
        compute_rows.append((lib, version))

    eval_rows = []
    eval_mean: dict[str, str] = {}
    if res is not None:
        for row in session_results(res):
            n = row.get("n_samples")
            eval_rows.append(
                {
                    "session": row["session"],
                    "r2": _r2(row.get("r2")),
                    "wiener": _r2(row.get("wiener_r2")),
                    "samples": _int(n) if n is not None else "n/a",
                }
            )
        eval_mean = {"r2": _r2(res.get("r2")), "wiener": _r2(res.get("wiener_r2"))}
        window = res.get("window_length_s")
        step = res.get("window_step_s")
        tiling = (
            f"{window} s windows at a {step} s step, predictions stitched" if window and step else "stitched windows"
        )
        eval_statement = (
            f"R² of the decoded behaviour on the held-out `{res.get('split', 'test')}` split of the training "
            f"sessions ({tiling}), per session and averaged over sessions, beside a Wiener filter fit per session "
            "on its train split and scored on exactly the same samples (`eval_results.json`)."
        )
    else:
        eval_statement = "No `eval_results.json` in this checkpoint folder: it is published without evaluation."

    limitations = []
    if synthetic:
        limitations.append(
            "Trained only on synthetic data: the R² above measures decoding of *simulated* motor cortex. "
            "It says nothing about real recordings, and the weights are not expected to decode real data "
            "without fine-tuning."
        )
    limitations.append(
        "Decodes only the sessions and units in its processor's vocabulary; a new session needs "
        "`processor.add_session` + `model.grow_vocabularies` and a fine-tune (`poyo-hf adapt`)."
    )
    if res is not None:
        limitations.append(
            f"Scored on unseen time of the training sessions (`{res.get('split', 'test')}` split), not on new "
            "sessions or new animals."
        )
    if compute.get("steps") is not None:
        limitations.append(
            f"A short run ({_int(compute['steps'])} optimizer steps on `{compute.get('device', '?')}`), far shorter "
            "than the paper's recipe: the numbers are what this run measured, not what the architecture reaches."
        )
    if info is None:
        limitations.append("Training data and recipe are not recorded with this checkpoint.")

    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=model_name,
        summary=summary,
        config=cfg,
        preset_text=preset_text,
        n_parameters_text=_int(files.n_parameters),
        readouts_text=readouts_text,
        data_statement=_data_statement(info),
        datasets=datasets,
        recipe_statement=recipe_statement,
        recipe_rows=recipe_rows,
        compute_rows=compute_rows,
        eval_statement=eval_statement,
        eval_rows=eval_rows,
        eval_mean=eval_mean,
        plots=files.plots,
        limitations=limitations,
        load_id=repo_id or model_name,
    )
    return card
