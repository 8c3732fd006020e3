"""transformers SigLIP2 NaFlex vision towers (``Siglip2VisionModel``, the vision tower of ``Siglip2Model``,
``Siglip2ForImageClassification``): variable patch counts, padded in a batch, with a padding mask.

A NaFlex tower takes pre-patchified pixels instead of images: ``pixel_values`` (B, N, P·P·C), each image's
patches row-major over its own grid then padding, ``pixel_attention_mask`` (B, N) (1 = a real patch) and
``spatial_shapes`` (B, 2) (each image's rows, cols of patches). transformers turns the mask into an N×N
key-padding mask; the converted attentions get the call's own (B, N) mask and grids instead
(``token_mask=``, ``grid_sizes=``, added to the call's keyword arguments by a forward pre-hook of the
tower, nothing stored): padding drops out of K̂ᵀV (and the separable context vector), the DW term
convolves each image over its own grid, and every image of a padded batch gets the output it gets alone.

No prefix tokens. The MAP head and the text tower stay softmax (as SigLIP's, :mod:`hf_clip`). Images
(B, C, H, W) — what castle-convert's datasets give — are patchified the way ``Siglip2ImageProcessor`` does
(:func:`patchify`, all patches real).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn

from castle_convert.adapters.hf_clip import left_softmax  # noqa: F401  (MAP head, text tower: stay softmax)

MODEL_TYPES = ("siglip2", "siglip2_vision_model")
ROPE_HALF = False                 # no RoPE in this family


def tower(model: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """(path, module) of the NaFlex vision tower: embeddings with a Linear ``patch_embedding`` and an encoder."""
    for name, m in model.named_modules():
        emb = getattr(m, "embeddings", None)
        if isinstance(getattr(emb, "patch_embedding", None), nn.Linear) and \
                isinstance(getattr(m, "encoder", None), nn.Module) and hasattr(emb, "position_embedding_size"):
            return name, m
    return None


def num_prefix_tokens(tower_module: nn.Module) -> int:
    return 0


def patch_size(tower_module: nn.Module) -> tuple[int, int]:
    p = int(tower_module.embeddings.patch_size)
    return p, p


def default_size(config) -> int:
    """The square image side (px) of the config's ``num_patches`` (its position-embedding grid)."""
    return int(round(config.num_patches ** 0.5)) * int(config.patch_size)


def patchify(images: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (B, C, H, W) → ``(pixel_values (B, N, P·P·C), pixel_attention_mask (B, N), spatial_shapes (B, 2))``,
    patches row-major and channels last within a patch, as ``Siglip2ImageProcessor`` lays them out (border
    pixels beyond a whole patch are dropped, as there)."""
    B, C, H, W = images.shape
    gh, gw = H // patch, W // patch
    x = images[:, :, :gh * patch, :gw * patch].reshape(B, C, gh, patch, gw, patch)
    x = x.permute(0, 2, 4, 3, 5, 1).reshape(B, gh * gw, patch * patch * C)          # (B, N, P·P·C)
    mask = torch.ones(B, gh * gw, dtype=torch.long, device=images.device)            # (B, N)
    # (B, 2); on the CPU for a meta batch (MAC counting): transformers checks the shapes' values
    shapes = torch.tensor([gh, gw], dtype=torch.long,
                          device="cpu" if images.device.type == "meta" else images.device).expand(B, 2)
    return x, mask, shapes


def forward(model: nn.Module, images: torch.Tensor, interpolate: bool):
    """Image features of a dual encoder (``get_image_features``), else the model's own forward, on images."""
    patch = patch_size(tower(model)[1])[0]
    pixel_values, _, shapes = patchify(images, patch)
    # every patch is real and every image has the same grid: no mask (transformers then builds no N×N mask, a
    # meta batch stays countable) and one grid for the whole batch (the DW term is one conv2d)
    grid = (images.shape[-2] // patch, images.shape[-1] // patch)
    inputs = dict(pixel_values=pixel_values, pixel_attention_mask=None, spatial_shapes=shapes, grid=grid)
    if hasattr(model, "get_image_features") and hasattr(model, "text_model"):
        return model.get_image_features(**inputs)
    return model(**inputs)


def call_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> Optional[dict]:
    """Forward pre-hook of the tower: this call's padding mask and grids join its keyword arguments."""
    names = list(inspect.signature(module.forward).parameters)

    def argument(name: str):                         # by keyword, else by position in the forward's signature
        if name in kwargs:
            return kwargs[name]
        i = names.index(name) if name in names else len(args)
        return args[i] if i < len(args) else None

    mask = argument("pixel_attention_mask")
    if "token_mask" in kwargs or ("grid" in kwargs and mask is None):   # passed on, or one grid, no padding
        return None
    shapes, pixels = argument("spatial_shapes"), argument("pixel_values")
    if shapes is None or not isinstance(pixels, torch.Tensor):
        return None
    if mask is None:
        mask = torch.ones(pixels.shape[:2], dtype=torch.bool, device=pixels.device)   # (B, N): no padding
    check_padding(mask, shapes)
    return args, {**kwargs, "token_mask": mask.to(torch.bool), "grid_sizes": shapes.to(pixels.device)}


def _eager(*tensors: torch.Tensor) -> bool:
    return not (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()
                or any(isinstance(t, torch.fx.Proxy) or t.device.type == "meta" for t in tensors))


def check_padding(mask: torch.Tensor, shapes: torch.Tensor) -> None:
    """Raise (one line) unless each image's ``spatial_shapes`` (rows, cols) (B, 2) agree with its
    ``pixel_attention_mask`` (B, N): its rows·cols real patches first, then padding — what the image processor gives.
    Anything else made an output without an error (the DW term read padding or skipped real patches), as timm
    naflexvit's adapter already refuses (:func:`castle_convert.adapters.timm_naflex.check_row_major`)."""
    if not _eager(mask, shapes):
        return
    B, N = mask.shape
    shapes = shapes.to(mask.device).to(torch.long)
    pos = torch.arange(N, device=mask.device).unsqueeze(0)                        # (1, N)
    count = shapes[:, 0:1] * shapes[:, 1:2]                                         # (B, 1)
    ok = ((pos < count) == mask.to(torch.bool)).all(-1) & (shapes > 0).all(-1)      # (B,)
    if not bool(ok.all()):
        b = int((~ok).nonzero()[0])
        rows, cols = (int(v) for v in shapes[b])
        real = int(mask[b].to(torch.long).sum())
        raise ValueError(f"SigLIP2 with castling attention: image {b} of this batch has spatial_shapes {rows}x{cols} "
                         f"({rows * cols} patches) but its pixel_attention_mask marks {real} of {N} positions real"
                         f"{'' if real != rows * cols else ' (not the first ones)'}: pass each image's mask and "
                         "shapes as the image processor gives them (its rows·cols patches first, then padding)")
