"""Auto-class registration for NDT (called from ``poyo_hf/_registration.py``; idempotent).

Kept outside ``models/ndt/`` so that the model folder stays self-contained Hub custom code.
"""

from __future__ import annotations


def register_ndt_auto_classes() -> None:
    """Register NDT ("ndt") with the Auto classes; AutoModel gives :class:`NdtForMaskedModeling`
    (readout to rates + loss), as for POYO. See ``poyo_hf._registration.register_model_family``."""
    from .._registration import register_model_family
    from .ndt import NdtConfig, NdtForMaskedModeling, NdtProcessor

    register_model_family("ndt", NdtConfig, NdtForMaskedModeling, NdtProcessor)


__all__ = ["register_ndt_auto_classes"]
