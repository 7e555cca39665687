"""NDT model configuration.

The config is the single source of truth for the model-processor contract: bin width, number
of observed and forward bins (the learned position table), held-in / held-out neuron counts.
The processor reads these values from it (see ``processing_ndt.NdtProcessor.from_config``).

Defaults are the released MC_Maze model of Ye & Pandarinath 2021 as run for NLB
(``configs/mc_maze.yaml`` of snel-repo/neural-data-transformers): identity embedding, 4 layers,
2 heads, feed-forward 128, learnable positions, pre-norm, T-Fixup init, log-rate readout,
25% of bins masked with spans of up to 7 bins phased in between updates 8000 and 12000.
"""

import functools
import math

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import (
    StrictDataclassClassValidationError,
    StrictDataclassFieldValidationError,
)
from transformers import PreTrainedConfig

NDT_EMBEDDINGS = ("identity", "count", "linear")
NDT_ACTIVATIONS = ("relu", "gelu")

_FLOAT_FIELDS = (
    "bin_size",
    "embedding_dropout",
    "attention_dropout",
    "hidden_dropout",
    "readout_dropout",
    "mask_ratio",
    "mask_token_ratio",
    "mask_random_ratio",
    "readout_init_range",
    "position_init_std",
    "layer_norm_eps",
)


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
            raise TypeError(f"NdtConfig: {err}") from None

    cls.__init__ = __init__
    return cls


@_plain_errors
@strict
class NdtConfig(PreTrainedConfig):
    r"""Configuration of a Neural Data Transformer (Ye & Pandarinath 2021).

    Sizes and the data contract:
        num_neurons: held-in neurons, the observed input channels ``N_in`` (MC_Maze: 137).
        num_heldout_neurons: held-out neurons ``N_out`` (MC_Maze: 45). They enter as zero input
            channels and are always predicted (co-smoothing).
        num_bins: observed bins per trial, the longest trial the position table holds (140).
        num_forward_bins: zero bins appended after the observed ones and always predicted (40).
        bin_size: bin width in seconds (0.005).

    Architecture:
        embedding: ``"identity"`` (the count vector of a bin is the token; ``hidden_size`` =
            ``num_neurons + num_heldout_neurons``), ``"count"`` (each neuron's count, clipped to
            ``max_count``, looks up a row of one shared ``(max_count + 1, count_embedding_dim)``
            table; the rows of all neurons are concatenated, ``hidden_size = N * count_embedding_dim``)
            or ``"linear"`` (``Linear(N, hidden_size)``, ``hidden_size`` defaults to ``N``).
        hidden_size: model width; derived from ``embedding`` when left as ``None``.
        num_hidden_layers (4), num_attention_heads (2), intermediate_size (128): encoder shape.
        hidden_act: ``"relu"`` (released) or ``"gelu"``.
        embedding_dropout: after the position embedding (0.2).
        attention_dropout: on the attention probabilities (0.2).
        hidden_dropout: on both residual branches and inside the feed-forward (0.2).
        readout_dropout: on the final states before the rate readout (0.2).
            The paper sweeps all dropouts in 0.3-0.7 for MC_Maze.
        context_backward, context_forward: banded attention, bin ``t`` attends to bins
            ``[t - context_backward, t + context_forward]``; ``None`` = unlimited on that side
            (both ``None``: full attention, no mask at all).
        fixup_init: T-Fixup-style scaling (Huang et al. 2020) of the attention output and
            feed-forward weights by ``0.67 * num_hidden_layers ** -0.25`` at init, as released.
        readout_init_range: the readout weights are drawn from U(-r, r), bias 0 (r = 0.1).
        position_init_std: std of the learned position table (1.0, ``nn.Embedding``'s default,
            which the reference keeps).
        max_count: clip for the ``"count"`` embedding (max count in training + 3, spec sec. 1).
        count_embedding_dim: per-neuron width of the ``"count"`` embedding.

    Masked modelling (applied in ``NdtForMaskedModeling.forward`` when training):
        mask_ratio: Bernoulli probability that a whole observed bin is masked (0.25).
        mask_token_ratio: of the held-in entries of masked bins, the fraction set to zero (0.8;
            the MC_Maze sweep draws it from 0.5-1.0).
        mask_random_ratio: of the masked entries not zeroed, the fraction given a random count
            (uniform in [0, max count of the batch]); the rest are left intact (0.5).
        mask_max_span: longest span of consecutive masked bins (7). With probability ``p`` a
            training batch draws one span width ``w ~ U{1..max_span}``; seeds are then drawn with
            probability ``mask_ratio / w`` and each seed masks ``w`` bins.
        mask_span_ramp_start, mask_span_ramp_end: ``p`` ramps linearly from 0 at update
            ``mask_span_ramp_start`` to 1 at ``mask_span_ramp_end`` (8000 / 12000 for MC_Maze).
    """

    model_type = "ndt"
    keys_to_ignore_at_inference = ["rates", "mask", "last_hidden_state"]

    num_neurons: int = 137
    num_heldout_neurons: int = 45
    num_bins: int = 140
    num_forward_bins: int = 40
    bin_size: int | float = 0.005
    embedding: str = "identity"
    count_embedding_dim: int = 2
    max_count: int = 20
    hidden_size: int | None = None
    num_hidden_layers: int = 4
    num_attention_heads: int = 2
    intermediate_size: int = 128
    hidden_act: str = "relu"
    embedding_dropout: int | float = 0.2
    attention_dropout: int | float = 0.2
    hidden_dropout: int | float = 0.2
    readout_dropout: int | float = 0.2
    context_backward: int | None = None
    context_forward: int | None = None
    fixup_init: bool = True
    readout_init_range: int | float = 0.1
    position_init_std: int | float = 1.0
    layer_norm_eps: int | float = 1e-5
    mask_ratio: int | float = 0.25
    mask_token_ratio: int | float = 0.8
    mask_random_ratio: int | float = 0.5
    mask_max_span: int = 7
    mask_span_ramp_start: int = 8000
    mask_span_ramp_end: int = 12000

    def __post_init__(self, **kwargs):
        # Numbers given as ints (``bin_size=1``) are accepted and stored as floats.
        for name in _FLOAT_FIELDS:
            setattr(self, name, float(getattr(self, name)))
        if self.hidden_size is None and self.embedding in NDT_EMBEDDINGS:
            n = self.num_neurons + self.num_heldout_neurons
            self.hidden_size = n * self.count_embedding_dim if self.embedding == "count" else n
        super().__post_init__(**kwargs)

    # -- derived sizes -------------------------------------------------------------------
    @property
    def num_total_neurons(self) -> int:
        """Held-in plus held-out neurons ``N``: the readout width."""
        return self.num_neurons + self.num_heldout_neurons

    @property
    def num_positions(self) -> int:
        """Rows of the learned position table: observed plus forward bins."""
        return self.num_bins + self.num_forward_bins

    @property
    def head_dim(self) -> int:
        return (self.hidden_size or 0) // self.num_attention_heads

    @property
    def full_context(self) -> bool:
        return self.context_backward is None and self.context_forward is None

    # -- checks --------------------------------------------------------------------------
    def validate_architecture(self):
        """Cross-field checks; each message names the bad value and how to fix it."""
        at_least_one = {
            "num_neurons": self.num_neurons,
            "num_bins": self.num_bins,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "count_embedding_dim": self.count_embedding_dim,
            "max_count": self.max_count,
            "mask_max_span": self.mask_max_span,
        }
        for name, value in at_least_one.items():
            if value < 1:
                raise ValueError(f"NdtConfig.{name} must be >= 1, got {value}.")
        for name in ("num_heldout_neurons", "num_forward_bins", "mask_span_ramp_start", "mask_span_ramp_end"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"NdtConfig.{name} must be >= 0, got {value}.")
        if self.embedding not in NDT_EMBEDDINGS:
            raise ValueError(f"NdtConfig.embedding {self.embedding!r} unknown; choose from {list(NDT_EMBEDDINGS)}.")
        if self.hidden_act not in NDT_ACTIVATIONS:
            raise ValueError(f"NdtConfig.hidden_act {self.hidden_act!r} unknown; choose from {list(NDT_ACTIVATIONS)}.")
        n = self.num_total_neurons
        if self.embedding == "identity" and self.hidden_size != n:
            raise ValueError(
                f"NdtConfig.hidden_size ({self.hidden_size}) must equal num_neurons + num_heldout_neurons ({n}) "
                "with the identity embedding; leave hidden_size=None, or use embedding='linear' for another width."
            )
        if self.embedding == "count" and self.hidden_size != n * self.count_embedding_dim:
            raise ValueError(
                f"NdtConfig.hidden_size ({self.hidden_size}) must equal (num_neurons + num_heldout_neurons) * "
                f"count_embedding_dim ({n * self.count_embedding_dim}) with the count embedding; "
                "leave hidden_size=None."
            )
        if self.hidden_size is None or self.hidden_size < 1:
            raise ValueError(f"NdtConfig.hidden_size must be >= 1, got {self.hidden_size}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"NdtConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); e.g. num_attention_heads=1 or 2 for MC_Maze's 182 neurons."
            )
        for name in ("context_backward", "context_forward"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(
                    f"NdtConfig.{name} must be None (unlimited) or >= 0 bins, got {value}."
                )
        for name in ("embedding_dropout", "attention_dropout", "hidden_dropout", "readout_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"NdtConfig.{name} must be in [0, 1), got {value}.")
        for name in ("mask_ratio", "mask_token_ratio", "mask_random_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"NdtConfig.{name} must be in [0, 1], got {value}.")
        if self.mask_span_ramp_end < self.mask_span_ramp_start:
            raise ValueError(
                f"NdtConfig.mask_span_ramp_end ({self.mask_span_ramp_end}) must be >= mask_span_ramp_start "
                f"({self.mask_span_ramp_start})."
            )
        for name in ("bin_size", "readout_init_range", "position_init_std", "layer_norm_eps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"NdtConfig.{name} must be a finite number > 0, got {value}.")


__all__ = ["NDT_EMBEDDINGS", "NdtConfig"]
