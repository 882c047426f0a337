"""LatentSync's sampler: diffusers' ``DDIMScheduler`` with the official ``configs/scheduler_config.json``
(scaled-linear betas 0.00085 -> 0.012 over 1000 steps, ``steps_offset`` 1, no clipping, the last
step lands on alpha_cumprod[0]); "leading" spacing (diffusers' default, which that file relies on):
20 steps are t = 951, 901, ..., 1."""
from __future__ import annotations

from diffusers import DDIMScheduler

SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}


def build_scheduler(steps: int) -> DDIMScheduler:
    if steps < 1:
        raise ValueError(f"steps: {steps} must be >= 1")
    scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps)
    return scheduler
