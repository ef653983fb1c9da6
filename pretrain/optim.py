"""Optimiser and schedules of the pretraining: SGD with momentum, warm-up + cosine, EMA momentum.

Schedules are fvcore param schedulers evaluated at ``where = (step + 1) / total_steps``, which gives
exactly the paper code's formulas: ``lr = base * (step + 1) / warmup_steps`` during warm-up, then a cosine
from ``base`` to ``base * final_lr_ratio``; the EMA momentum goes from ``m0`` to 1 on a cosine
(``1 - (1 - m0) (1 + cos(pi k / K)) / 2``, evaluated at ``step / total_steps``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    CosineParamScheduler,
    LinearParamScheduler,
    ParamScheduler,
)

from common.errors import ConfigError
from common.schedule import StepSchedule


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of the paper: lr = base * global_batch / 256."""
    return float(base_lr) * int(global_batch) / 256.0


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay; biases and normalisation parameters (every 1-D tensor) without."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": float(weight_decay)},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum)


def lr_scheduler(peak_lr: float, total_steps: int, warmup_steps: int, final_lr_ratio: float) -> StepSchedule:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine to ``peak_lr * final_lr_ratio``."""
    if total_steps <= 0:
        raise ConfigError(f"the schedule has {total_steps} steps; "
                          "fix: optim.epochs and the data set must give >= 1 step")
    warmup_steps = min(max(int(warmup_steps), 0), total_steps - 1)
    cosine = CosineParamScheduler(peak_lr, peak_lr * final_lr_ratio)
    if warmup_steps == 0:
        sched: ParamScheduler = cosine
    else:
        frac = warmup_steps / total_steps
        sched = CompositeParamScheduler([LinearParamScheduler(0.0, peak_lr), cosine], lengths=[frac, 1 - frac],
                                        interval_scaling=["rescaled", "rescaled"])
    return StepSchedule(sched, total_steps, offset=1)


def ema_momentum_scheduler(base_momentum: float, total_steps: int) -> StepSchedule:
    """The momentum encoder's coefficient: ``base_momentum`` -> 1 on a cosine (BYOL / the paper)."""
    return StepSchedule(CosineParamScheduler(base_momentum, 1.0), total_steps, offset=0)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
