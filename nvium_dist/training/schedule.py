"""AdamW parameter groups and learning-rate schedules (warmup + cosine, warmup-stable-decay)."""
from __future__ import annotations

import math

from torch import nn

from nvium_dist.config import TrainingConfig


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases (every 1-D parameter) and the input embedding."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "embedding" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_multiplier(step: int, training: TrainingConfig) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based)."""
    total = training.train_iters
    warmup = max(1, round(training.warmup_fraction * total))
    floor = training.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    if training.lr_schedule == "wsd":
        decay_start = total - max(1, round(training.decay_fraction * total))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, total - decay_start)
        return 1.0 - (1.0 - floor) * min(1.0, progress)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
