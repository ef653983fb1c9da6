"""A fvcore ParamScheduler addressed by optimisation step, shared by pretraining and the evaluations."""

from __future__ import annotations

from fvcore.common.param_scheduler import ParamScheduler


class StepSchedule:
    """A fvcore ParamScheduler addressed by optimisation step: ``value(step)``."""

    def __init__(self, scheduler: ParamScheduler, total_steps: int, offset: int):
        self.scheduler, self.total_steps, self.offset = scheduler, int(total_steps), int(offset)

    def __call__(self, step: int) -> float:
        where = min(max((step + self.offset) / self.total_steps, 0.0), 1.0)
        return float(self.scheduler(where))
