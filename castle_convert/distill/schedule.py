"""Schedules on fractional epochs: the castling anneal (gate g_t, threshold τ_t) and the lr."""

from __future__ import annotations

import math

from castle_convert.recipes import AnnealSection, OptimSection


def _ramp(progress: float, curve: str) -> float:
    """0 → 1 over progress in [0, 1]."""
    p = min(max(progress, 0.0), 1.0)
    return p if curve == "linear" else 0.5 * (1.0 - math.cos(math.pi * p))


class AnnealSchedule:
    """g_t falls 1 → 0 and τ_t rises 0 → threshold between start_epoch and end_epoch; after
    end_epoch the model trains at g = 0 (its inference form).

    Stateful so that Accelerate checkpoints it (``register_for_checkpointing``): ``epoch`` is the
    fractional epoch of the last update.
    """

    def __init__(self, cfg: AnnealSection):
        self.cfg = cfg
        self.epoch = 0.0

    def at(self, epoch: float) -> tuple[float, float]:
        c = self.cfg
        if epoch >= c.end_epoch:
            return 0.0, c.threshold
        span = c.end_epoch - c.start_epoch
        r = _ramp((epoch - c.start_epoch) / span, c.curve) if span > 0 else float(epoch >= c.start_epoch)
        return 1.0 - r, c.threshold * r

    def update(self, epoch: float) -> tuple[float, float]:
        self.epoch = float(epoch)
        return self.at(self.epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = float(state["epoch"])


def lr_factor(step: int, total_steps: int, warmup_steps: int, cfg: OptimSection) -> float:
    """Multiplier of the base lr at optimizer step ``step``: linear warmup, then cosine to min_lr."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    floor = cfg.min_lr / cfg.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
