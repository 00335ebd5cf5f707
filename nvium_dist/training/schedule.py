"""The AdamW optimizer, its parameter groups, and learning-rate schedules (warmup + cosine, warmup-stable-decay)."""
from __future__ import annotations

import math

import torch
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


def build_optimizer(model: nn.Module, training: TrainingConfig, device: str, offload: bool) -> torch.optim.Optimizer:
    """AdamW as training.optimizer asks. "auto": torch's fused AdamW on CUDA (nothing to compile), DeepSpeed's
    vectorised CPU Adam for an optimizer offloaded from CUDA, torch's AdamW on CPU. "torch": torch's AdamW
    (fused on CUDA unless offloaded). "deepspeed": DeepSpeed's FusedAdam on CUDA, its CPU Adam otherwise;
    both are JIT-compiled on first use (minutes, on every node)."""
    groups = adamw_param_groups(model, training.weight_decay)
    settings = dict(lr=training.lr, betas=(training.adam_beta1, training.adam_beta2), eps=training.adam_eps)
    on_cuda = device == "cuda" and not offload
    choice = training.optimizer
    if choice == "deepspeed" or (choice == "auto" and device == "cuda" and offload):
        if on_cuda:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **settings)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **settings)
    return torch.optim.AdamW(groups, fused=on_cuda or None, **settings)


def lr_multiplier(step: int, training: TrainingConfig) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based)."""
    if training.lr_schedule == "wsd" and training.wsd_decay == "cosine":
        return paper_wsd_multiplier(step, training)
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


def paper_wsd_multiplier(step: int, training: TrainingConfig) -> float:
    """The paper's warmup-stable-decay (its 1.5B run): transformers' get_wsd_schedule with its default shapes
    (linear warmup, cosine decay) and min_lr_ratio, laid out as the paper's code does: warmup and decay steps are
    floor(fraction x steps), the rest is stable."""
    total, floor = training.train_iters, training.min_lr_ratio
    warmup, decay = int(training.warmup_fraction * total), int(training.decay_fraction * total)
    decay_start = total - decay
    if step < warmup:
        return floor + (1.0 - floor) * step / warmup  # from min_lr_ratio x lr, not from 0
    if step < decay_start:
        return 1.0
    if step < total:
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * (step - decay_start) / decay))
    return floor
