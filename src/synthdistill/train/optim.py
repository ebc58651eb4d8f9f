"""The optimiser and the learning-rate schedule of the distillation."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from synthdistill.config import DistillConfig


def make_optimizer(module: nn.Module, config: DistillConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; as in CLIP training, biases, norms and the temperature (1-D tensors) get no weight decay."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, fused=device.type == "cuda")


def lr_factor(step: int, config: DistillConfig, total_steps: int) -> float:
    """Linear warm-up, then constant (the paper) or cosine decay to zero."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0
