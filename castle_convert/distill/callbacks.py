"""The castling anneal for ``transformers.Trainer``: a ``TrainerCallback``."""

from __future__ import annotations

from transformers import TrainerCallback

from castle_convert.recipes import AnnealSection


class CastlingTrainerCallback(TrainerCallback):
    """Anneals the gate 1 → 0 (and τ 0 → ``threshold``) over the fraction ``[start, end]`` of
    ``state.max_steps``, then trains at gate 0 (the inference form)::

        Trainer(model=cc.convert(vit), args=..., train_dataset=..., callbacks=[cc.CastlingTrainerCallback()])
        trainer.train(); deployable = cc.finalize(trainer.model)
    """

    def __init__(self, start: float = 0.0, end: float = 0.8, threshold: float = AnnealSection.threshold,
                 curve: str = AnnealSection.curve):
        from castle_convert.distill.schedule import AnnealSchedule
        if not (0.0 <= start <= end < 1.0):
            raise ValueError(f"CastlingTrainerCallback: need 0 <= start <= end < 1 (fractions of max_steps), got "
                             f"start={start}, end={end}")
        self.anneal = AnnealSchedule(AnnealSection(start_epoch=start, end_epoch=end, curve=curve,
                                                   threshold=float(threshold)))
        self.gate = 1.0

    def _apply(self, state, model) -> None:
        from castle_convert.convert import set_schedule, training_forms
        if model is None:
            return
        if not training_forms(model):
            raise ValueError("CastlingTrainerCallback: the Trainer's model has no castling training form: "
                             "train cc.convert(model)")
        g, tau = self.anneal.update(state.global_step / max(1, state.max_steps))
        set_schedule(model, g, tau)
        self.gate = g

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)
