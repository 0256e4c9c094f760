"""AdamW with weight decay on matrices only, and the learning-rate schedules."""

import math

import torch

from scratchlm.train.config import TrainConfig


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Decay matrices and embeddings; never norms' gains or biases, which decay would pull
    towards zero for no regularising benefit (as in GPT-2/3 and nanoGPT)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8, fused=device.type == "cuda"
    )


def lr_at(step: int, progress: float, config: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then over the budget's progress (0..1) either cosine
    decay to `min_lr_ratio * lr`, or warmup-stable-decay: constant, then a linear decay over
    the last `cooldown_fraction` (Hägele et al. 2024), which lets a run be extended."""
    peak, floor = config.lr, config.lr * config.min_lr_ratio
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.schedule == "wsd":
        start = 1.0 - config.cooldown_fraction
        if progress <= start:
            return peak
        return floor + (peak - floor) * max(0.0, 1.0 - (progress - start) / max(config.cooldown_fraction, 1e-9))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
