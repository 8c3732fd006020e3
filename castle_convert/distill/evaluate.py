"""Evaluation: top-1 for classifiers, embedding cosine similarity for headless backbones."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from castle_convert.adapters import cast_inputs
from castle_convert.convert import primary_output


def head_classes(model: nn.Module) -> Optional[int]:
    """Number of classes of the model's classifier head, or None for a headless backbone."""
    if hasattr(model, "pretrained_cfg") or hasattr(model, "num_classes"):        # timm
        n = getattr(model, "num_classes", 0)
        return int(n) if n else None
    if "ForImageClassification" in type(model).__name__:                       # transformers
        return int(model.config.num_labels)
    return None


def embeddings(out) -> torch.Tensor:
    """Final embeddings of a headless backbone: pooled output if any, else the class token."""
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    x = primary_output(out)
    return x[:, 0] if x.ndim == 3 else x


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator, *, classify: bool = True,
             reference: Optional[nn.Module] = None, max_batches: Optional[int] = None,
             labelled: bool = True) -> dict:
    """Top-1 (classifier) or cosine similarity to ``reference`` embeddings (headless).

    Gathers over processes (``gather_for_metrics`` drops the padding of the last batch).
    Returns ``{"top1": %, "n": images}`` or ``{"cosine": mean, "n": images}``; with ``reference``
    and a classifier also ``"agree"``: % of predictions equal to the reference's. On unlabeled images
    (``labelled=False``, e.g. ``--data natural``) a classifier gets only ``"agree"`` (100 without a reference).
    """
    was_training = model.training
    model.eval()
    correct = agree = total = 0
    cos_sum = 0.0
    try:
        for i, (images, labels) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            with accelerator.autocast():
                out = model(cast_inputs(model, images))
                ref = reference(cast_inputs(reference, images)) if reference is not None else None
            if classify:
                pred = primary_output(out).argmax(-1)
                items = [pred, labels] + ([primary_output(ref).argmax(-1)] if ref is not None else [])
                gathered = accelerator.gather_for_metrics(tuple(items))
                correct += (gathered[0] == gathered[1]).sum().item()
                if ref is not None:
                    agree += (gathered[0] == gathered[2]).sum().item()
                total += gathered[1].numel()
            else:
                cos = torch.nn.functional.cosine_similarity(embeddings(out).float(), embeddings(ref).float(), -1)
                cos = accelerator.gather_for_metrics(cos)
                cos_sum += cos.sum().item()
                total += cos.numel()
    finally:
        model.train(was_training)
    if not classify:
        return {"cosine": cos_sum / max(total, 1), "n": total}
    if not labelled:
        return {"agree": 100.0 * agree / max(total, 1) if reference is not None else 100.0, "n": total}
    result = {"top1": 100.0 * correct / max(total, 1), "n": total}
    if reference is not None:
        result["agree"] = 100.0 * agree / max(total, 1)
    return result
