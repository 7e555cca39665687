"""NDT model folder: config, model and processor (self-contained; also ships as Hub custom code).

Auto-class registration lives outside this folder, in ``poyo_hf/models/ndt_registration.py``.
"""

from .configuration_ndt import NDT_EMBEDDINGS, NdtConfig
from .modeling_ndt import (
    NdtForMaskedModeling,
    NdtMaskedModelingOutput,
    NdtModel,
    NdtModelOutput,
    NdtPreTrainedModel,
)
from .processing_ndt import NdtProcessor

__all__ = [
    "NDT_EMBEDDINGS",
    "NdtConfig",
    "NdtForMaskedModeling",
    "NdtMaskedModelingOutput",
    "NdtModel",
    "NdtModelOutput",
    "NdtPreTrainedModel",
    "NdtProcessor",
]
