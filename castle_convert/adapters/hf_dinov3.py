"""transformers DINOv3 (``DINOv3ViTModel``, ``DINOv3ViTBackbone``): RoPE, register tokens, LayerScale.

The tower has ``embeddings.patch_embeddings`` (a Conv2d; class + register tokens before the patches),
``rope_embeddings`` and its encoder at ``model``. Each layer's attention (``q_proj``, ``k_proj``,
``v_proj``, ``o_proj``) gets the call's RoPE as ``position_embeddings=(cos, sin)`` (M, d) for the M
patch tokens, rotate-half layout; the shim hands it to the converted attention as ``rope=[sin | cos]``:
q and k are rotated (patch tokens only) before the angular kernel, exactly as the teacher does before
its softmax. LayerScale stays in the layer, outside the attention. No absolute position embedding:
any image size runs without interpolation.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

MODEL_TYPES = ("dinov3_vit",)
ROPE_HALF = True


def tower(model: nn.Module) -> Optional[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        emb = getattr(m, "embeddings", None)
        if isinstance(getattr(emb, "patch_embeddings", None), nn.Conv2d) and hasattr(m, "rope_embeddings"):
            return name, m
    return None


def num_prefix_tokens(tower_module: nn.Module) -> int:
    reg = getattr(tower_module.embeddings, "register_tokens", None)
    return 1 + (reg.shape[1] if reg is not None else 0)


def patch_size(tower_module: nn.Module) -> tuple[int, int]:
    return tuple(tower_module.embeddings.patch_embeddings.kernel_size)


def left_softmax(model: nn.Module, tower_name: str) -> list[tuple[str, nn.Module, str]]:
    return []


def forward(model: nn.Module, images: torch.Tensor, interpolate: bool):
    return model(images)                      # RoPE is computed for each call's own grid
