"""Schedules on fractional epochs: the castling anneal (gate g_t, threshold τ_t) and the lr."""

from __future__ import annotations

import math

from castle_convert.recipes import AnnealSection


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


def lr_scheduler(optimizer, total_steps: int, warmup_steps: int = 0, min_lr_rate: float = 0.0):
    """Linear warmup over ``warmup_steps`` ((step + 1) / warmup: the first step already learns), then cosine from the
    optimizer's lr to ``min_lr_rate`` × lr at ``total_steps`` (``min_lr_rate=1``: constant after warmup):
    transformers' ``cosine_warmup_with_min_lr`` schedule (``cosine_with_min_lr``, whose warmup starts at 0, on a
    transformers without it), a ``LambdaLR``."""
    from transformers import SchedulerType, get_scheduler
    name = "cosine_warmup_with_min_lr" if "cosine_warmup_with_min_lr" in {t.value for t in SchedulerType} \
        else "cosine_with_min_lr"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(1, total_steps),
                         scheduler_specific_kwargs={"min_lr_rate": float(min_lr_rate)})


class GateSchedule:
    """The castling anneal as a scheduler object, for training loops other than ``cc.distill``.

    The gate starts at 1, where the converted model computes its teacher's softmax attention and
    the linear branch gets exactly zero gradient; this object moves ``g`` 1 → 0 (and the mask
    threshold τ 0 → ``threshold``) over the fraction ``[start, end]`` of training, then keeps
    ``g = 0`` so the rest trains the inference form. Plain loop::

        schedule = cc.GateSchedule(student, total_steps=epochs * len(loader))
        for images, labels in ...:
            loss.backward(); optimizer.step(); optimizer.zero_grad()
            schedule.step()                       # one optimizer step
        deployable = cc.finalize(student)

    timm scheduler style (``total_epochs`` + ``updates_per_epoch``): ``step_update(num_updates)``
    after each update, and/or ``step(epoch)`` at the start/end of each epoch, as timm's train.py calls
    its lr scheduler. ``state_dict`` / ``load_state_dict`` checkpoint it.
    """

    def __init__(self, model, total_steps: int | None = None, *, total_epochs: float | None = None,
                 updates_per_epoch: int | None = None, start: float = 0.0, end: float = 0.8,
                 threshold: float = AnnealSection.threshold, curve: str = AnnealSection.curve):
        if (total_steps is None) == (total_epochs is None):
            raise ValueError("GateSchedule: pass exactly one of total_steps (step() after each optimizer step) "
                             "or total_epochs (step(epoch) / step_update(num_updates) with updates_per_epoch)")
        total = total_steps if total_steps is not None else total_epochs
        if not total or total <= 0:
            raise ValueError(f"GateSchedule: the training length must be positive, got {total!r}")
        if not (0.0 <= start <= end < 1.0):
            raise ValueError(f"GateSchedule: need 0 <= start <= end < 1 (fractions of training), got start={start}, "
                             f"end={end}; end < 1 leaves the last part of training at gate 0, the inference form")
        if curve not in ("cosine", "linear"):
            raise ValueError(f"GateSchedule: curve={curve!r}, choose 'cosine' or 'linear'")
        self.model = model
        self.total = float(total)
        self.unit = "steps" if total_steps is not None else "epochs"
        self.updates_per_epoch = updates_per_epoch
        self.anneal = AnnealSchedule(AnnealSection(start_epoch=start, end_epoch=end, curve=curve,
                                                   threshold=float(threshold)))
        self.t = 0.0
        self.gate, self.threshold = self._apply()

    def _apply(self) -> tuple[float, float]:
        from castle_convert.convert import set_schedule
        g, tau = self.anneal.update(self.t / self.total)
        set_schedule(self.model, g, tau)
        self.gate, self.threshold = g, tau
        return g, tau

    def step(self, epoch: float | None = None, metric=None) -> tuple[float, float]:
        """Advance one unit (no argument) or go to ``epoch`` (timm style); returns (gate, threshold)."""
        self.t = self.t + 1 if epoch is None else float(epoch)
        return self._apply()

    def step_update(self, num_updates: int, metric=None) -> tuple[float, float]:
        """timm's per-update call: ``num_updates`` optimizer steps so far."""
        if self.unit == "steps":
            self.t = float(num_updates)
        elif not self.updates_per_epoch:
            raise ValueError("GateSchedule.step_update with total_epochs needs updates_per_epoch=len(loader) // accum")
        else:
            self.t = num_updates / self.updates_per_epoch
        return self._apply()

    def state_dict(self) -> dict:
        return {"t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.t = float(state["t"])
        self._apply()
