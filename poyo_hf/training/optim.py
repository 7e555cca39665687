"""Optimiser and schedule of the POYO recipe (spec sec. 6)."""

from __future__ import annotations

import math

import torch

#: Linear LR scaling of the recipe: lr = 3.125e-5 * global batch (0.032 at batch 1024).
LR_PER_SAMPLE = 3.125e-5


class FlatThenCosine:
    """LR multiplier: 1.0 for the first ``flat_fraction`` of the run, then a cosine decay to
    ``final_ratio`` (1e-4 in the recipe). A callable object, not a lambda, so that
    ``LambdaLR.state_dict`` (and Accelerate's ``save_state``) keeps its settings."""

    def __init__(self, total_steps: int, flat_fraction: float = 0.5, final_ratio: float = 1e-4):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
        if not 0.0 <= flat_fraction <= 1.0:
            raise ValueError(f"flat_fraction must be in [0, 1], got {flat_fraction}.")
        self.total_steps = total_steps
        self.flat_steps = int(flat_fraction * total_steps)
        self.final_ratio = final_ratio

    def __call__(self, step: int) -> float:
        if step < self.flat_steps:
            return 1.0
        span = max(1, self.total_steps - self.flat_steps)
        progress = min(1.0, (step - self.flat_steps) / span)
        return self.final_ratio + (1.0 - self.final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (default). Embeddings, norms and biases get no weight decay.

    LAMB (the paper's optimiser) is not offered: no well-kept PyTorch package ships it today
    (torch-optimizer is unmaintained), and AdamW with the recipe's schedule trains these model
    sizes well; see README.
    """
    if lr <= 0:
        raise ValueError(f"learning rate must be > 0, got {lr}.")
    if name != "adamw":
        raise ValueError(f"optimizer {name!r} is not supported; use 'adamw'.")
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "emb" in n or "norm" in n else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)
