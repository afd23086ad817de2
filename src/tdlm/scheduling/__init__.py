"""Model scheduling for masked diffusion sampling: schedules (which model predicts at each
step), the scheduled sampler with FLOPs accounting, step-importance analysis and segment
search (spec: shared/spec/MODEL_SCHEDULING.md)."""
from .schedule import ModelPlan, Schedule, ScheduleSpec, parse_schedule, resolve_schedule
from .sampler import ScheduledSampler, check_compatible, load_scheduled, prefixes_from_validation

__all__ = ["ModelPlan", "Schedule", "ScheduleSpec", "ScheduledSampler", "check_compatible",
           "load_scheduled", "parse_schedule", "prefixes_from_validation", "resolve_schedule"]
