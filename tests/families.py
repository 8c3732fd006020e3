"""The table of model families every shared check runs on: tiny random models from configs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, dynamic_img_size=True)


@dataclass
class Family:
    id: str
    build: Callable[..., nn.Module]   # build(layers=2): one layer where the depth does not matter (graph tracing)
    size: int                 # native input resolution
    patch: int
    prefix_tokens: int
    hf: bool = False
    rope: bool = False        # RoPE inside attention: no absolute position embedding to interpolate
    pool: int = 0             # latent queries of an attention-pooling head that stays softmax (SigLIP's MAP head)
    naflex: bool = False      # takes patches + padding mask + grids (SigLIP2): images are patchified first
    # the kind the costly family × kind checks (marked ``covering``: torch.compile / torch.export) run with in the
    # fast lane, the README's test command; --lane slow runs the other two kinds (tests/conftest.py). The default
    # kind, local_global, on every trait (timm / transformers, registers, RoPE, NaFlex, attention-pooling head);
    # the other kinds each on timm and transformers sources, RoPE included.
    lane_kind: str = "local_global"

    def args(self, x: torch.Tensor) -> tuple:
        """The positional inputs of the model's own forward for images x: (x,), or a NaFlex tower's
        (pixel_values, pixel_attention_mask, spatial_shapes)."""
        if self.naflex:
            from castle_convert.adapters import hf_siglip2
            return hf_siglip2.patchify(x, self.patch)
        return (x,)

    def __call__(self, model: nn.Module, x: torch.Tensor):
        """Forward with the family's own convention; HF interpolates position embeddings."""
        if self.naflex:
            return model(*self.args(x))
        if self.hf:
            return model(x) if self.rope else model(x, interpolate_pos_encoding=True)
        return model(x)

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """All token features (B, N, C): every layer's every token reaches them."""
        if self.naflex:
            return self(model, x).last_hidden_state
        if self.hf:
            if self.rope:                     # DINOv3's base_model_prefix names its encoder
                return model(x).last_hidden_state
            return model.base_model(x, interpolate_pos_encoding=True).last_hidden_state
        return model.forward_features(x)


def _timm(name: str, **kw) -> Callable[..., nn.Module]:
    def build(layers: int = 2):
        import timm
        torch.manual_seed(0)
        tiny = {k: v for k, v in TINY.items() if not (name.startswith("naflexvit") and k == "dynamic_img_size")}
        return timm.create_model(name, pretrained=False, **{**tiny, "depth": layers, **kw}).eval()  # (NaFlexVit: any size)
    return build


def _hf(model_cls: str, config_cls: str, **kw) -> Callable[..., nn.Module]:
    def build(layers: int = 2):
        import transformers
        torch.manual_seed(0)
        cfg = getattr(transformers, config_cls)(
            hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, image_size=32, patch_size=8,
            **kw)
        return getattr(transformers, model_cls)(cfg).eval()
    return build


FAMILIES = [
    Family("timm-vit", _timm("test_vit", num_classes=10), 32, 8, 1, lane_kind="linear_angular"),
    Family("timm-deit-distilled", _timm("deit_tiny_distilled_patch16_224", num_classes=10), 32, 8, 2,
           lane_kind="separable"),
    Family("timm-deit3", _timm("deit3_small_patch16_224", num_classes=10), 32, 8, 1),
    Family("timm-reg4-dinov2", _timm("vit_small_patch14_reg4_dinov2", img_size=28, patch_size=7,
                                     num_classes=0), 28, 7, 5),
    Family("timm-qknorm", _timm("vit_tiny_patch16_224", qk_norm=True, num_classes=10), 32, 8, 1,
           lane_kind="separable"),
    Family("timm-eva02", _timm("eva02_tiny_patch14_224", num_classes=10), 32, 8, 1, rope=True),
    Family("timm-rope-mixed", _timm("vit_base_patch16_rope_mixed_224", num_classes=10), 32, 8, 1, rope=True,
           lane_kind="linear_angular"),
    Family("timm-dinov3", _timm("vit_small_patch16_dinov3", num_classes=0), 32, 8, 5, rope=True,
           lane_kind="separable"),
    Family("timm-naflexvit", _timm("naflexvit_base_patch16_gap", num_classes=10, pos_embed_grid_size=(4, 4)),
           32, 8, 4),
    Family("hf-vit", _hf("ViTForImageClassification", "ViTConfig", intermediate_size=64, num_labels=10),
           32, 8, 1, hf=True),
    Family("hf-deit", _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", intermediate_size=64,
                          num_labels=10), 32, 8, 2, hf=True, lane_kind="linear_angular"),
    Family("hf-dinov2-registers", _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", mlp_ratio=2,
                                      num_register_tokens=2), 32, 8, 3, hf=True, lane_kind="separable"),
    Family("hf-clip-vision", _hf("CLIPVisionModel", "CLIPVisionConfig", intermediate_size=64), 32, 8, 1, hf=True),
    Family("hf-siglip-vision", _hf("SiglipVisionModel", "SiglipVisionConfig", intermediate_size=64), 32, 8, 0,
           hf=True, pool=1, lane_kind="linear_angular"),
    Family("hf-siglip2-naflex", _hf("Siglip2VisionModel", "Siglip2VisionConfig", intermediate_size=64,
                                    num_patches=16), 32, 8, 0, hf=True, pool=1, naflex=True),
    Family("hf-dinov3", _hf("DINOv3ViTModel", "DINOv3ViTConfig", intermediate_size=64, num_register_tokens=2,
                            layerscale_value=0.5), 32, 8, 3, hf=True, rope=True),
]
