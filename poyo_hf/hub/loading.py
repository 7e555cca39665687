"""Load a POYO checkpoint (model + processor) and refuse one whose parts disagree.

``PoyoProcessor.from_pretrained`` cannot see the model and ``from_pretrained`` of the model
cannot see the processor, so neither alone can tell that the vocabularies in
``preprocessor_config.json`` address more (or fewer) rows than the embedding tables hold. This
is the one call that loads both and checks them together; the CLIs and ``publish`` use it.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["load_checkpoint"]


def load_checkpoint(path_or_id: str | os.PathLike[str], revision: str | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """Load ``(model, processor)`` from a checkpoint folder or Hub repo id and check they agree.

    Args:
        path_or_id: a ``save_pretrained`` folder or a Hub model repo id (``namespace/name``).
        revision: branch, tag or commit sha of a Hub repo (pin a commit sha for exact results).
        **kwargs: passed to both ``from_pretrained`` calls (``cache_dir``, ``token``, ...).

    Raises:
        ValueError: the weights file is unreadable (named), the embedding tables disagree with
            ``config.json``, or the processor's vocabularies / window / readouts disagree with
            the model's config.
    """
    from transformers import AutoModel, AutoProcessor

    import poyo_hf  # noqa: F401  (Auto registration)

    name = str(path_or_id)
    model = AutoModel.from_pretrained(name, revision=revision, **kwargs)
    processor = AutoProcessor.from_pretrained(name, revision=revision, **kwargs)
    check = getattr(processor, "check_config", None)
    if check is not None:
        try:
            check(model.config)
        except ValueError as err:
            raise ValueError(
                f"checkpoint {name!r} is inconsistent: {err} (its preprocessor_config.json vocabularies and "
                "its config.json / model.safetensors must describe the same embedding rows; re-export the model "
                "and the processor together with save_pretrained)."
            ) from None
    return model, processor
