"""Model shapes for tests: small enough that a training step takes milliseconds on the CPU."""

from __future__ import annotations

__all__ = ["TINY_POYO_OVERRIDES"]

# PoyoConfig overrides (on top of a preset) for a tiny POYO with dropout off and unit dropout
# scaled to corpora of 30-150 units.
TINY_POYO_OVERRIDES: dict[str, int | float] = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_latents_per_step": 4,
    "num_cross_attention_heads": 1,
    "num_self_attention_heads": 2,
    "head_dim": 32,
    "ffn_mult": 2,
    "attention_dropout": 0.0,
    "lin_dropout": 0.0,
    "ffn_dropout": 0.0,
    "unit_dropout_min": 10,
    "unit_dropout_mode": 30,
    "unit_dropout_max": 60,
}
