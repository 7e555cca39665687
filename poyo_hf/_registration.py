"""Auto-class registration: the one place where poyo_hf touches transformers' registries.

Called once from ``poyo_hf/__init__.py``; idempotent (``exist_ok=True``), no other side effects.
"""

from __future__ import annotations

from typing import Any

_DONE = False


def register_model_family(model_type: str, config_cls: Any, model_cls: Any, processor_cls: Any) -> None:
    """Register one model family with AutoConfig / AutoModel / AutoModelForTimeSeriesPrediction /
    AutoFeatureExtractor / AutoProcessor, and mark its classes for Hub custom code so that a
    saved folder carries its modeling files and an ``auto_map`` (``trust_remote_code=True``
    then loads it in a process where poyo_hf is not installed).

    AutoModel gives the task model (readout + loss): the trunks predict nothing on their own
    and stay importable for hidden states.
    """
    from transformers import (
        AutoConfig,
        AutoFeatureExtractor,
        AutoModel,
        AutoModelForTimeSeriesPrediction,
        AutoProcessor,
    )

    AutoConfig.register(model_type, config_cls, exist_ok=True)
    AutoModel.register(config_cls, model_cls, exist_ok=True)
    AutoModelForTimeSeriesPrediction.register(config_cls, model_cls, exist_ok=True)
    AutoFeatureExtractor.register(config_cls, processor_cls, exist_ok=True)
    AutoProcessor.register(config_cls, processor_cls, exist_ok=True)
    config_cls.register_for_auto_class()
    model_cls.register_for_auto_class("AutoModel")
    processor_cls.register_for_auto_class("AutoFeatureExtractor")


def register_auto_classes() -> None:
    """Register POYO and NDT with the transformers Auto classes (once)."""
    global _DONE
    if _DONE:
        return
    from .models.ndt_registration import register_ndt_auto_classes
    from .models.poyo import PoyoConfig, PoyoForDecoding, PoyoProcessor

    register_model_family("poyo", PoyoConfig, PoyoForDecoding, PoyoProcessor)
    register_ndt_auto_classes()
    _DONE = True
