"""poyo_hf: POYO and NDT neural population decoders, the Hugging Face way.

Importing the package registers the models with the transformers Auto classes (once).
"""

from importlib.metadata import PackageNotFoundError, version

from ._registration import register_auto_classes
from .hub.loading import load_checkpoint
from .inference import PoyoStreamingDecoder, StreamingOutput
from .models.ndt import NdtConfig, NdtForMaskedModeling, NdtModel, NdtProcessor
from .models.poyo import (
    POYO_PRESETS,
    PoyoConfig,
    PoyoDecodingOutput,
    PoyoForDecoding,
    PoyoModel,
    PoyoModelOutput,
    PoyoPreTrainedModel,
    PoyoProcessor,
)

try:
    __version__ = version("poyo-hf")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

register_auto_classes()

__all__ = [
    "NdtConfig",
    "NdtForMaskedModeling",
    "NdtModel",
    "NdtProcessor",
    "POYO_PRESETS",
    "PoyoConfig",
    "PoyoDecodingOutput",
    "PoyoForDecoding",
    "PoyoModel",
    "PoyoModelOutput",
    "PoyoPreTrainedModel",
    "PoyoProcessor",
    "PoyoStreamingDecoder",
    "StreamingOutput",
    "load_checkpoint",
    "register_auto_classes",
]
