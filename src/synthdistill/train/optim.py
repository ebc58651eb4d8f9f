"""The optimiser, the learning-rate schedule and the fp16 gradient scaler of the distillation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from synthdistill.config import DistillConfig
from synthdistill.runtime import autocast_dtype
from synthdistill.student import parameter_groups


def make_optimizer(
    module: nn.Module,
    lr: float,
    weight_decay: float,
    betas: Sequence[float],
    eps: float,
    device: torch.device,
) -> torch.optim.AdamW:
    """AdamW over :func:`~synthdistill.student.parameter_groups` (no decay for biases, norms, the
    temperature and what timm excludes); fused on CUDA."""
    return torch.optim.AdamW(
        parameter_groups(module, weight_decay),
        lr=lr,
        betas=(float(betas[0]), float(betas[1])),
        eps=eps,
        fused=device.type == "cuda",
    )


def make_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler that is on exactly when the step autocasts to fp16 (whose small gradients
    underflow without one); bf16 and fp32 get a disabled scaler, a pass-through."""
    return torch.amp.GradScaler(device.type, enabled=autocast_dtype(device, precision) == torch.float16)


def lr_factor(step: int, config: DistillConfig, total_steps: int) -> float:
    """Linear warm-up, then constant (the paper) or cosine decay to zero."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0
