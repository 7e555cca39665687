"""POYO model folder: config, model and processor (self-contained; also ships as Hub custom code)."""

from .configuration_poyo import POYO_PRESETS, PoyoConfig
from .modeling_poyo import (
    PoyoDecodingOutput,
    PoyoForDecoding,
    PoyoModel,
    PoyoModelOutput,
    PoyoPreTrainedModel,
)
from .processing_poyo import PoyoProcessor

__all__ = [
    "POYO_PRESETS",
    "PoyoConfig",
    "PoyoDecodingOutput",
    "PoyoForDecoding",
    "PoyoModel",
    "PoyoModelOutput",
    "PoyoPreTrainedModel",
    "PoyoProcessor",
]
