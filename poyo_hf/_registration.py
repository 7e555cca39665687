"""Auto-class registration: the one place where poyo_hf touches transformers' registries.

Called once from ``poyo_hf/__init__.py``; idempotent (``exist_ok=True``), no other side effects.
"""

from __future__ import annotations

_DONE = False


def register_auto_classes() -> None:
    """Register POYO with AutoConfig / AutoModel / AutoModelForTimeSeriesPrediction /
    AutoFeatureExtractor / AutoProcessor, and mark the classes for Hub custom code so that a
    saved folder carries its modeling files and an ``auto_map`` (``trust_remote_code=True``
    then loads it in a process where poyo_hf is not installed)."""
    global _DONE
    if _DONE:
        return
    from transformers import (
        AutoConfig,
        AutoFeatureExtractor,
        AutoModel,
        AutoModelForTimeSeriesPrediction,
        AutoProcessor,
    )

    from .models.poyo import PoyoConfig, PoyoForDecoding, PoyoProcessor

    AutoConfig.register("poyo", PoyoConfig, exist_ok=True)
    # POYO's trunk is of no use without its readout, so AutoModel gives the decoder
    # (PoyoModel stays importable for feature extraction).
    AutoModel.register(PoyoConfig, PoyoForDecoding, exist_ok=True)
    AutoModelForTimeSeriesPrediction.register(PoyoConfig, PoyoForDecoding, exist_ok=True)
    AutoFeatureExtractor.register(PoyoConfig, PoyoProcessor, exist_ok=True)
    AutoProcessor.register(PoyoConfig, PoyoProcessor, exist_ok=True)

    PoyoConfig.register_for_auto_class()
    PoyoForDecoding.register_for_auto_class("AutoModel")
    PoyoProcessor.register_for_auto_class("AutoFeatureExtractor")

    from .models.ndt_registration import register_ndt_auto_classes

    register_ndt_auto_classes()
    _DONE = True
