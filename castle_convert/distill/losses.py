"""Distillation losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) at temperature T, scaled by T² (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, -1), F.log_softmax(teacher_logits.float() / t, -1),
                    reduction="batchmean", log_target=True) * (t * t)


def hard_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the teacher's argmax (DeiT hard distillation)."""
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(-1))


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Headless backbones: match final embeddings (cosine distance or MSE)."""
    s, t = student.float().flatten(1), teacher.float().flatten(1)
    if kind == "mse":
        return F.mse_loss(s, t)
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


def attention_transfer(student_outs: list[torch.Tensor], teacher_outs: list[torch.Tensor]) -> torch.Tensor:
    """Mean over converted layers of MSE(student attention output, teacher attention output)."""
    losses = [F.mse_loss(s.float(), t.float()) for s, t in zip(student_outs, teacher_outs)]
    return torch.stack(losses).mean()


def intermediate_features(student_outs: list[torch.Tensor], teacher_outs: list[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of the token-wise cosine distance between student and teacher block outputs
    (B, N, C): the intermediate features dense heads read, every token."""
    losses = [(1.0 - F.cosine_similarity(s.float(), t.float(), dim=-1)).mean() for s, t in zip(student_outs, teacher_outs)]
    return torch.stack(losses).mean()


class DivergenceError(RuntimeError):
    """The loss became NaN / inf during training; the message names the step and what to change."""


def is_finite(loss: torch.Tensor, accelerator=None) -> bool:
    """Whether ``loss`` is finite on every process (one all-reduce when there are several)."""
    bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).all() else 1.0, device=loss.device)
    if accelerator is not None and accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bad.item() == 0
