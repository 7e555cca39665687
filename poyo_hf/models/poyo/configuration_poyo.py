"""POYO model configuration.

The config is the single source of truth for the model-processor contract: window length,
latent grid, rotary periods, vocabulary sizes, readouts and target normalisation. The processor
reads these values from it (see ``processing_poyo.PoyoProcessor.from_config``).
"""

import functools
import math

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import PreTrainedConfig

# Named presets (spec sec. 5). Values are the reference's shipped configs; dropouts as shipped
# (lin 0.4, ffn 0.2, attention 0.2).
POYO_PRESETS: dict[str, dict] = {
    # "POYO 1.3M": POYO-mp in the paper era, single-session models.
    "poyo-mp": dict(
        hidden_size=64,
        num_hidden_layers=6,
        num_latents_per_step=16,
        num_cross_attention_heads=2,
        num_self_attention_heads=8,
    ),
    # "POYO 11.8M": POYO-1 (and POYO-mp in the current reference).
    "poyo-1": dict(
        hidden_size=128,
        num_hidden_layers=24,
        num_latents_per_step=32,
        num_cross_attention_heads=4,
        num_self_attention_heads=8,
    ),
    # Single-session model: the small shape, trained on one session (unit dropout 60/300/1000).
    "poyo-single": dict(
        hidden_size=64,
        num_hidden_layers=6,
        num_latents_per_step=16,
        num_cross_attention_heads=2,
        num_self_attention_heads=8,
    ),
}


_FLOAT_FIELDS = ('sequence_length', 'latent_step', 'ffn_dropout', 'lin_dropout', 'attention_dropout', 'initializer_range', 'rotary_t_min', 'rotary_t_max', 'unit_dropout_peak')


def _plain_errors(cls):
    """Re-raise ``@strict``'s wrapper exceptions as the plain ``ValueError`` / ``TypeError`` our
    users catch (its wrappers derive from ``Exception`` only); the message is kept."""
    strict_init = cls.__init__

    @functools.wraps(strict_init)
    def __init__(self, *args, **kwargs):
        try:
            strict_init(self, *args, **kwargs)
        except StrictDataclassClassValidationError as err:
            cause = err.__cause__
            raise (cause if isinstance(cause, (ValueError, TypeError)) else ValueError(str(err))) from None
        except StrictDataclassFieldValidationError as err:
            raise TypeError(f"PoyoConfig: {err}") from None

    cls.__init__ = __init__
    return cls


@_plain_errors
@strict
class PoyoConfig(PreTrainedConfig):
    r"""Configuration of a POYO decoder (Azabou et al., NeurIPS 2023).

    Args:
        sequence_length: context window length in seconds (default 1.0).
        latent_step: spacing of the latent time grid in seconds (default 0.125 -> 8 steps).
        num_latents_per_step: learned latents repeated at every latent step (total latents =
            ``sequence_length / latent_step * num_latents_per_step``).
        hidden_size: model width ``dim``.
        num_hidden_layers: number of self-attention blocks over the latents (``depth``).
        num_cross_attention_heads / num_self_attention_heads: heads of the encoder/decoder
            cross-attention and of the processor self-attention.
        head_dim: per-head width (64); the inner attention width is ``heads * head_dim``.
        ffn_mult: GEGLU feed-forward expansion (hidden = ``ffn_mult * hidden_size``).
        ffn_dropout, lin_dropout, attention_dropout: dropouts (feed-forward inner, residual
            branches of the processor, attention probabilities).
        initializer_range: std of the N(0, s) embedding init (0.02).
        rotary_t_min, rotary_t_max: shortest and longest rotary period in seconds, both
            included (2.0627 reproduces the paper-era periods; see spec sec. 3).
        unit_vocab_size, session_vocab_size: rows of the unit / session embedding tables
            (index 0 is reserved for padding, so a vocabulary of n ids needs n + 1 rows).
        readout_dims: output dimension of each readout, e.g. ``{"hand_vel": 2}``.
        target_mean, target_std: per readout and per dimension, the statistics used to
            z-score targets; predictions are returned in physical units.
        unit_dropout_min/mode/max/peak: triangular unit-dropout augmentation used in training.
    """

    model_type = "poyo"
    keys_to_ignore_at_inference = ["last_hidden_state", "latent_hidden_state", "normalized_predictions"]

    sequence_length: int | float = 1.0
    latent_step: int | float = 0.125
    num_latents_per_step: int = 16
    hidden_size: int = 64
    num_hidden_layers: int = 6
    num_cross_attention_heads: int = 2
    num_self_attention_heads: int = 8
    head_dim: int = 64
    ffn_mult: int = 4
    ffn_dropout: int | float = 0.2
    lin_dropout: int | float = 0.4
    attention_dropout: int | float = 0.2
    initializer_range: int | float = 0.02
    rotary_t_min: int | float = 1e-4
    rotary_t_max: int | float = 2.0627
    num_token_types: int = 4
    unit_vocab_size: int = 1
    session_vocab_size: int = 1
    readout_dims: dict[str, int] | None = None
    target_mean: dict[str, list[float]] | None = None
    target_std: dict[str, list[float]] | None = None
    unit_dropout_min: int = 30
    unit_dropout_mode: int = 100
    unit_dropout_max: int = 300
    unit_dropout_peak: int | float = 4.0
    preset: str | None = None

    def __post_init__(self, **kwargs):
        # Numbers given as ints (``sequence_length=1``) are accepted and stored as floats.
        for name in _FLOAT_FIELDS:
            setattr(self, name, float(getattr(self, name)))
        if self.readout_dims is None:
            self.readout_dims = {"hand_vel": 2}
        self.readout_dims = {str(k): int(v) for k, v in self.readout_dims.items()}
        mean = dict(self.target_mean or {})
        std = dict(self.target_std or {})
        for name, d in self.readout_dims.items():
            mean.setdefault(name, [0.0] * d)
            std.setdefault(name, [1.0] * d)
        self.target_mean = {k: [float(x) for x in v] for k, v in mean.items()}
        self.target_std = {k: [float(x) for x in v] for k, v in std.items()}
        super().__post_init__(**kwargs)

    # -- derived sizes -------------------------------------------------------------------
    @property
    def num_latent_steps(self) -> int:
        return int(round(self.sequence_length / self.latent_step))

    @property
    def num_latents(self) -> int:
        return self.num_latent_steps * self.num_latents_per_step

    @property
    def readout_names(self) -> list[str]:
        return list(self.readout_dims)

    @property
    def max_output_dim(self) -> int:
        return max(self.readout_dims.values())

    # -- checks --------------------------------------------------------------------------
    def validate_architecture(self):
        """Cross-field checks; each message names the bad value and how to fix it."""
        positive_ints = {
            "num_latents_per_step": self.num_latents_per_step,
            "hidden_size": self.hidden_size,
            "num_cross_attention_heads": self.num_cross_attention_heads,
            "num_self_attention_heads": self.num_self_attention_heads,
            "head_dim": self.head_dim,
            "ffn_mult": self.ffn_mult,
            "unit_vocab_size": self.unit_vocab_size,
            "session_vocab_size": self.session_vocab_size,
        }
        for name, value in positive_ints.items():
            if value < 1:
                raise ValueError(f"PoyoConfig.{name} must be >= 1, got {value}.")
        if self.num_hidden_layers < 0:
            raise ValueError(f"PoyoConfig.num_hidden_layers must be >= 0, got {self.num_hidden_layers}.")
        for name in ("sequence_length", "latent_step", "rotary_t_min", "rotary_t_max", "initializer_range"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"PoyoConfig.{name} must be a finite number > 0, got {value}.")
        steps = self.sequence_length / self.latent_step
        if abs(steps - round(steps)) > 1e-6:
            raise ValueError(
                f"PoyoConfig.sequence_length ({self.sequence_length}) must be a whole multiple of "
                f"latent_step ({self.latent_step}); e.g. latent_step={self.sequence_length / max(1, round(steps))}."
            )
        if self.head_dim % 4 != 0:
            raise ValueError(
                f"PoyoConfig.head_dim must be a multiple of 4 (half of it rotates as pairs), got {self.head_dim}."
            )
        if not self.rotary_t_min < self.rotary_t_max:
            raise ValueError(
                f"PoyoConfig.rotary_t_min ({self.rotary_t_min}) must be smaller than rotary_t_max "
                f"({self.rotary_t_max})."
            )
        for name in ("ffn_dropout", "lin_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"PoyoConfig.{name} must be in [0, 1), got {value}.")
        if self.num_token_types < 3:
            raise ValueError(
                f"PoyoConfig.num_token_types must be >= 3 (spike, start, end), got {self.num_token_types}."
            )
        if not self.readout_dims:
            raise ValueError("PoyoConfig.readout_dims is empty; give at least one readout, e.g. {'hand_vel': 2}.")
        for name, d in self.readout_dims.items():
            if d < 1:
                raise ValueError(f"PoyoConfig.readout_dims[{name!r}] must be >= 1, got {d}.")
            for stat in ("target_mean", "target_std"):
                values = getattr(self, stat).get(name)
                if values is None or len(values) != d:
                    raise ValueError(
                        f"PoyoConfig.{stat}[{name!r}] must have {d} values (one per output dim), got {values}."
                    )
                if not all(math.isfinite(v) for v in values):
                    raise ValueError(f"PoyoConfig.{stat}[{name!r}] must be finite, got {values}.")
            if any(v <= 0 for v in self.target_std[name]):
                raise ValueError(
                    f"PoyoConfig.target_std[{name!r}] must be > 0, got {self.target_std[name]}."
                )
        extra = set(self.target_mean) - set(self.readout_dims)
        if extra:
            raise ValueError(f"PoyoConfig.target_mean names readouts {sorted(extra)} absent from readout_dims.")
        if not 1 <= self.unit_dropout_min <= self.unit_dropout_mode <= self.unit_dropout_max:
            raise ValueError(
                "PoyoConfig unit dropout needs 1 <= unit_dropout_min <= unit_dropout_mode <= unit_dropout_max, got "
                f"{self.unit_dropout_min}/{self.unit_dropout_mode}/{self.unit_dropout_max}."
            )
        if self.preset is not None and self.preset not in POYO_PRESETS:
            raise ValueError(f"PoyoConfig.preset {self.preset!r} unknown; choose from {sorted(POYO_PRESETS)}.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Also accepts a preset name (``"poyo-mp"``, ``"poyo-1"``, ``"poyo-single"``) when no
        local folder of that name exists and the call comes from the user.

        Calls made while loading a model (``AutoConfig`` / ``PreTrainedModel.from_pretrained``
        pass ``_from_auto`` or ``return_unused_kwargs``) always read the folder or Hub repo: a
        published checkpoint named like a preset (``AutoModel.from_pretrained("poyo-1")`` on a Hub
        that serves bare ids) must load its own config, not the preset's shape.
        """
        import os

        name = str(pretrained_model_name_or_path)
        internal = kwargs.get("_from_auto") or "return_unused_kwargs" in kwargs
        if name in POYO_PRESETS and not os.path.isdir(name) and not internal:
            return cls.from_preset(name, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "PoyoConfig":
        """Build a config from a named preset: ``poyo-mp``, ``poyo-1`` or ``poyo-single``.

        ``overrides`` replace preset values (e.g. ``readout_dims``, vocabulary sizes).
        """
        if name not in POYO_PRESETS:
            raise ValueError(f"Unknown POYO preset {name!r}; choose from {sorted(POYO_PRESETS)}.")
        kwargs = dict(POYO_PRESETS[name])
        if name == "poyo-single":
            kwargs.update(unit_dropout_min=60, unit_dropout_mode=300, unit_dropout_max=1000)
        kwargs.update(overrides)
        kwargs.setdefault("preset", name)
        return cls(**kwargs)


__all__ = ["PoyoConfig", "POYO_PRESETS"]
