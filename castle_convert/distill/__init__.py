"""Distillation: losses, schedules, the Accelerate training loop, evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from torch import nn


def distill(teacher: nn.Module, student: nn.Module, data, recipe="quick", *, overrides: Optional[list[str]] = None,
            work_dir: Optional[Union[str, Path]] = None, resume: bool = False, progress: bool = True):
    """Distil a converted ``student`` against ``teacher``; returns a ``DistillResult`` whose
    ``student`` is finalized (inference form).

    Args:
        data: a ``DataBundle`` or a spec (``DIR``, ``hf:NAME[:CONFIG]``, ``fashion-mnist``) built
            with the teacher's own transforms.
        recipe: a ``Recipe`` or a recipe name/path; ``overrides`` as ``["optim.lr=1e-4", ...]``.
        work_dir: where checkpoints (``--resume``) and TensorBoard logs go.
    """
    from castle_convert.data import DataBundle, build_data
    from castle_convert.distill.loop import distill as _distill
    from castle_convert.recipes import Recipe, load_recipe

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise ValueError("overrides apply to a recipe name or path, not to a Recipe object")
    if not isinstance(data, DataBundle):
        d = recipe.data
        data = build_data(str(data), teacher, resolution=d.resolution, augmentation=d.augmentation,
                          max_train_samples=d.max_train_samples, max_eval_samples=d.max_eval_samples,
                          seed=recipe.seed)
    return _distill(teacher, student, data, recipe, work_dir=Path(work_dir) if work_dir else None,
                    resume=resume, progress=progress)
