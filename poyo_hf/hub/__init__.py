"""Publishing POYO checkpoints to the Hugging Face Hub and loading them back.

* :func:`publish` / ``poyo-hf publish``: stage a checkpoint (weights, processor, remote code,
  results, plots, rendered card) and upload it in one commit;
* :func:`render_model_card`: the card from the checkpoint's own files (``hub_cards/`` template);
* :func:`load_checkpoint`: model + processor from a folder or repo id, checked against each other.
"""

from .cards import render_model_card
from .loading import load_checkpoint
from .publish import PublishError, check_repo_id, publish, stage_checkpoint

__all__ = ["PublishError", "check_repo_id", "load_checkpoint", "publish", "render_model_card", "stage_checkpoint"]
