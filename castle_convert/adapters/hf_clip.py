"""transformers CLIP and SigLIP vision towers (``CLIPVisionModel``, the vision tower inside ``CLIPModel`` /
``CLIPForImageClassification``, ``SiglipVisionModel``, ``SiglipModel``'s vision tower).

A CLIP-style tower is a module with ``embeddings.patch_embedding`` (a Conv2d) and an ``encoder`` whose
layers hold ``self_attn`` (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``). CLIP has a class token
(``embeddings.class_embedding``, one prefix token), SigLIP has none. What stays softmax, listed by
``inspect`` and never an error:

* SigLIP's attention-pooling head (``SiglipMultiheadAttentionPoolingHead``: one latent query over the N
  tokens, already O(N));
* the text tower of ``CLIPModel`` / ``SiglipModel`` (text tokens, not image patches).

The generic transformers machinery (shim, grid hooks, spec) is :mod:`castle_convert.adapters.hf_vit`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

MODEL_TYPES = ("clip", "clip_vision_model", "siglip", "siglip_vision_model")
ROPE_HALF = False                 # no RoPE in this family
POOLING = "attention pooling (a latent query over the N tokens, already O(N)): stays softmax"
TEXT = "text tower (text tokens, not image patches): stays softmax"


def tower(model: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """(path, module) of the vision tower: the first module with ``embeddings.patch_embedding`` and an encoder."""
    for name, m in model.named_modules():
        emb = getattr(m, "embeddings", None)
        if isinstance(getattr(emb, "patch_embedding", None), nn.Conv2d) and isinstance(getattr(m, "encoder", None),
                                                                                       nn.Module):
            return name, m
    return None


def num_prefix_tokens(tower_module: nn.Module) -> int:
    return 1 if getattr(tower_module.embeddings, "class_embedding", None) is not None else 0


def patch_size(tower_module: nn.Module) -> tuple[int, int]:
    return tuple(tower_module.embeddings.patch_embedding.kernel_size)


def left_softmax(model: nn.Module, tower_name: str) -> list[tuple[str, nn.Module, str]]:
    """(path, module, why) of the attentions that stay softmax: the pooling head and the text tower."""
    out = []
    for name, m in model.named_modules():
        if getattr(m, "probe", None) is not None and isinstance(getattr(m, "attention", None), nn.MultiheadAttention):
            out.append((name, m, POOLING))
        elif name.split(".")[-1] == "text_model" and not (tower_name + ".").startswith(name + "."):
            out.append((name, m, TEXT))
    return out


def forward(model: nn.Module, images: torch.Tensor, interpolate: bool):
    """Image features of a dual-encoder model (``get_image_features``), else the model's own forward."""
    if hasattr(model, "get_image_features") and hasattr(model, "text_model"):
        return model.get_image_features(pixel_values=images, interpolate_pos_encoding=interpolate)
    return model(images, interpolate_pos_encoding=interpolate)
