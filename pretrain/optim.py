"""Optimisers and schedules of the pretraining: SGD with momentum or LARS, warm-up + cosine, EMA momentum.

Schedules are fvcore param schedulers evaluated at ``where = (step + 1) / total_steps``, which gives
exactly the paper code's formulas: ``lr = base * (step + 1) / warmup_steps`` during warm-up, then a cosine
from ``base`` to ``base * final_lr_ratio``; the EMA momentum goes from ``m0`` to 1 on a cosine
(``1 - (1 - m0) (1 + cos(pi k / K)) / 2``, evaluated at ``step / total_steps``).

Parameters come in two groups (``param_groups``): the weights, and the biases and normalisation parameters
(every tensor with at most one dimension). With ``exclude_bias_and_norm`` (the default, and what the
Barlow Twins and VICReg code do) the second group gets no weight decay and, under LARS, no trust-ratio
adaptation. Each group carries an ``lr_scale``: ``set_lr`` gives it ``lr * lr_scale``, so the biases can
follow the same schedule at another base rate (Barlow Twins: 0.0048 against 0.2 for the weights).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

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

OPTIMIZERS = ("sgd", "lars")
EXCLUSIONS = ("bias_and_norm", "none")  # optim.exclude: which parameters get no decay (and no LARS adaptation)

# What a checkpoint written before optim.name / optim.exclude / optim.bias_base_lr existed ran with (plain SGD,
# 1-D parameters without decay, one learning rate): a resume compares its config with these filled in.
OPTIM_KEYS_BEFORE_LARS = {"name": "sgd", "exclude": "bias_and_norm", "bias_base_lr": None}


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of the paper: lr = base * global_batch / 256."""
    return float(base_lr) * int(global_batch) / 256.0


def param_groups(model: nn.Module, weight_decay: float, exclude_bias_and_norm: bool = True,
                 bias_lr_scale: float = 1.0) -> list[dict]:
    """Two groups: the weights (decayed, adapted by LARS), then the biases and normalisation parameters (every
    tensor with <= 1 dimension; without decay or LARS adaptation when ``exclude_bias_and_norm``), whose
    learning rate is ``bias_lr_scale`` times the scheduled one."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    excluded = bool(exclude_bias_and_norm)
    return [{"params": decay, "weight_decay": float(weight_decay), "lars_exclude": False, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0 if excluded else float(weight_decay), "lars_exclude": excluded,
             "lr_scale": float(bias_lr_scale)}]


class LARS(torch.optim.Optimizer):
    """LARS (You, Gitman and Ginsburg, "Large Batch Training of Convolutional Networks", 2017) as the Barlow
    Twins and VICReg code run it: for each parameter ``w`` with gradient ``g``,

        u = g + weight_decay * w                                  (weight_decay = 0 in an excluded group)
        u = u * eta * ||w|| / ||u||    unless the group has lars_exclude, or ||w|| = 0, or ||u|| = 0 (ratio 1)
        m = momentum * m + u           (m = 0 before the first step, so the first m is u)
        w = w - lr * m

    Reference: facebookresearch/barlowtwins ``main.py`` (class LARS, with ``weight_decay_filter`` and
    ``lars_adaptation_filter`` true) and facebookresearch/vicreg ``main_vicreg.py`` (class LARS with
    ``exclude_bias_and_norm``, i.e. ``p.ndim == 1``). Written here from that definition (no maintained LARS is
    in requirements/lock.txt); the exclusion is a per-group flag ``lars_exclude`` (``param_groups`` sets it)
    instead of a predicate on the tensor.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS needs lr, momentum, weight_decay >= 0 and eta > 0; got lr={lr}, "
                             f"momentum={momentum}, weight_decay={weight_decay}, eta={eta}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, eta, momentum = group["weight_decay"], group["eta"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                if not group["lars_exclude"]:
                    w_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), eta * w_norm / u_norm,
                                        torch.ones_like(w_norm))
                    update = update * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float, name: str = "sgd",
                    eta: float = 0.001, exclude_bias_and_norm: bool = True,
                    bias_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """SGD with momentum (``name="sgd"``) or ``LARS`` (``"lars"``, trust coefficient ``eta``) over
    ``param_groups``; ``lr`` is the initial rate (the engine sets it every step with ``set_lr``)."""
    groups = param_groups(model, weight_decay, exclude_bias_and_norm, bias_lr_scale)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=eta)
    raise ConfigError(f"optim.name={name!r} is unknown; choose one of {list(OPTIMIZERS)}")


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
    """Every group at ``lr`` times its ``lr_scale`` (1 when the group has none, e.g. an older checkpoint's)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
