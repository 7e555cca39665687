"""Auto-class registration for NDT (called from ``poyo_hf/_registration.py``; idempotent).

Kept outside ``models/ndt/`` so that the model folder stays self-contained Hub custom code.
"""

from __future__ import annotations

_DONE = False


def register_ndt_auto_classes() -> None:
    """Register NDT with AutoConfig ("ndt") / AutoModel / AutoModelForTimeSeriesPrediction /
    AutoFeatureExtractor / AutoProcessor, and mark the classes for Hub custom code (a saved folder
    then carries its modeling files and an ``auto_map``, so ``trust_remote_code=True`` loads it
    where poyo_hf is not installed).

    AutoModel gives :class:`NdtForMaskedModeling` (readout to rates + loss), as for POYO: the
    encoder alone predicts nothing; :class:`NdtModel` stays importable for hidden states.
    """
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

    from .ndt import NdtConfig, NdtForMaskedModeling, NdtProcessor

    AutoConfig.register("ndt", NdtConfig, exist_ok=True)
    AutoModel.register(NdtConfig, NdtForMaskedModeling, exist_ok=True)
    AutoModelForTimeSeriesPrediction.register(NdtConfig, NdtForMaskedModeling, exist_ok=True)
    AutoFeatureExtractor.register(NdtConfig, NdtProcessor, exist_ok=True)
    AutoProcessor.register(NdtConfig, NdtProcessor, exist_ok=True)

    NdtConfig.register_for_auto_class()
    NdtForMaskedModeling.register_for_auto_class("AutoModel")
    NdtProcessor.register_for_auto_class("AutoFeatureExtractor")
    _DONE = True


__all__ = ["register_ndt_auto_classes"]
