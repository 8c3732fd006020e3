"""A directory converted from a transformers ViT / DeiT / DINOv2, loaded as the equivalent timm ViT.

timm's ``local-dir:`` / ``hf-hub:`` / ``castle_<arch>`` routes build timm classes, and the weights of a
transformers source carry transformers' names. :func:`plan` says which timm architecture computes the
same function (or why none does), with its constructor arguments read from the transformers config;
:func:`timm_state` renames (and, for layers a hybrid kept softmax, fuses q/k/v of) the state dict.

| transformers class | timm equivalent |
|---|---|
| ``ViTModel`` / ``ViTForImageClassification`` | ``VisionTransformer`` (class token, token pooling); ``ViTModel``'s pooler is not part of timm's model |
| ``DeiTModel`` / ``DeiTForImageClassificationWithTeacher`` | ``VisionTransformerDistilled`` (class + distillation token, the two heads averaged) |
| ``Dinov2Model`` | ``VisionTransformer`` with LayerScale (``vit_*_dinov2``) |
| ``Dinov2WithRegistersModel`` | ``VisionTransformer`` with register tokens, ``no_embed_class`` (``vit_*_reg*_dinov2``): the class token's position embedding is folded into it |

Position embeddings: transformers' DINOv2 with registers resamples them like timm (bicubic,
antialiased); ViT, DeiT and DINOv2 without antialiasing. For those the timm model is built at the
directory's own resolution (``distilled_resolution``, else the config's ``image_size``) with the
embedding resampled there the transformers way: equal outputs at that size; at other sizes timm's
antialiased resampling makes them differ slightly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

# transformers class -> (timm architecture registered as castle_<arch>, timm class family)
_EQUIVALENT = {
    "ViTModel": "vit_base_patch16_224", "ViTForImageClassification": "vit_base_patch16_224",
    "DeiTModel": "deit_base_distilled_patch16_224",
    "DeiTForImageClassificationWithTeacher": "deit_base_distilled_patch16_224",
    "Dinov2Model": "vit_small_patch14_dinov2", "Dinov2WithRegistersModel": "vit_small_patch14_reg4_dinov2",
}
_NO_EQUIVALENT = {
    "DeiTForImageClassification": "its head reads the class token only, while timm's DeiT averages the class "
                                  "and distillation heads",
    "Dinov2ForImageClassification": "its head reads the class token and the mean patch token together",
    "Dinov2WithRegistersForImageClassification": "its head reads the class token and the mean patch token together",
    "CLIPVisionModel": "the weight mapping onto timm's vit_*_clip_* (pre-norm, quick-GELU) is not written yet",
    "SiglipVisionModel": "the weight mapping onto timm's vit_*_siglip_* (attention-pool head) is not written yet",
    "DINOv3ViTModel": "timm's vit_*_dinov3 is an Eva model, whose castle_ route is not written yet",
}


@dataclass
class Equivalent:
    """The timm architecture computing what a transformers-source directory computes."""

    architecture: str
    model_args: dict
    resolution: int                       # px at which the two are equal (transformers' own resampling)
    norm_eps: float
    hf_class: str
    antialiased: bool = False             # transformers resamples the position embedding as timm does
    converted_modules: list = field(default_factory=list)


def _size(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def plan(config: dict) -> Union[Equivalent, str]:
    """The timm equivalent of a directory's ``config.json`` (a transformers source), or why there is none."""
    src = config.get("source") or {}
    hf_class = (src.get("architectures") or ["?"])[0]
    if hf_class in _NO_EQUIVALENT:
        return f"transformers {hf_class} has no timm equivalent: {_NO_EQUIVALENT[hf_class]}"
    if hf_class not in _EQUIVALENT:
        return f"transformers {hf_class} has no timm equivalent castle-convert knows"
    if config.get("hidden_act", "gelu") != "gelu" or config.get("use_swiglu_ffn") or \
            config.get("num_channels", 3) != 3 and hf_class.startswith("Dinov2"):
        return f"transformers {hf_class} with hidden_act={config.get('hidden_act')!r} / SwiGLU has no timm equivalent"
    dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    patch, image = _size(config["patch_size"]), _size(config["image_size"])
    if image[0] != image[1] or patch[0] != patch[1]:
        return f"transformers {hf_class} with a non-square image_size / patch_size has no timm equivalent here"
    resolution = int(config.get("distilled_resolution") or image[0])
    mlp = (config["intermediate_size"] / dim) if "intermediate_size" in config and not hf_class.startswith("Dinov2") \
        else float(config.get("mlp_ratio", 4))
    headless = "ForImageClassification" not in hf_class
    num_labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
    args = dict(img_size=resolution, patch_size=patch[0], in_chans=int(config.get("num_channels", 3)), embed_dim=dim,
                depth=int(config["num_hidden_layers"]), num_heads=heads, mlp_ratio=mlp,
                qkv_bias=bool(config.get("qkv_bias", True)), num_classes=0 if headless else num_labels,
                dynamic_img_size=True)
    registers = hf_class.startswith("Dinov2WithRegisters")
    if hf_class.startswith("Dinov2"):
        args.update(init_values=float(config.get("layerscale_value", 1.0)), global_pool="token",
                    reg_tokens=int(config.get("num_register_tokens", 0)) if registers else 0,
                    no_embed_class=registers)
    else:
        args.update(init_values=None, global_pool="token", class_token=True)
    return Equivalent(architecture=_EQUIVALENT[hf_class], model_args=args, resolution=resolution,
                      norm_eps=float(config.get("layer_norm_eps", 1e-12)), hf_class=hf_class, antialiased=registers,
                      converted_modules=[timm_path(p) for p in config.get("converted_modules") or []])


_BLOCK = re.compile(r"^(?:[a-z0-9_]+\.)?(?:encoder\.layers?|layers)\.(\d+)\.(.+)$")
_IN_BLOCK = [("attention.attn.", "attn."), ("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."),
             ("norm1.", "norm1."), ("norm2.", "norm2."), ("intermediate.dense.", "mlp.fc1."),
             ("output.dense.", "mlp.fc2."), ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."),
             ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma")]
_SOFTMAX_QKV = [("attention.attention.query.", "q"), ("attention.attention.key.", "k"),
                ("attention.attention.value.", "v"), ("attention.q_proj.", "q"), ("attention.k_proj.", "k"),
                ("attention.v_proj.", "v")]
_SOFTMAX_OUT = ("attention.output.dense.", "attention.o_proj.")
_TOP = {"embeddings.cls_token": "cls_token", "embeddings.distillation_token": "dist_token",
        "embeddings.register_tokens": "reg_token", "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias", "classifier.weight": "head.weight",
        "classifier.bias": "head.bias", "cls_classifier.weight": "head.weight", "cls_classifier.bias": "head.bias",
        "distillation_classifier.weight": "head_dist.weight", "distillation_classifier.bias": "head_dist.bias"}
_DROPPED = ("embeddings.mask_token", "pooler.")


def timm_path(hf_path: str) -> str:
    """``vit.layers.3.attention`` / ``encoder.layer.3.attention`` → ``blocks.3.attn``."""
    m = _BLOCK.match(hf_path)
    return f"blocks.{m.group(1)}.attn" if m else hf_path


def _base_key(key: str) -> str:
    """A key without the base-model prefix (``vit.``, ``deit.``, ``dinov2.``) of the classifier classes."""
    head, _, rest = key.partition(".")
    return rest if head in ("vit", "deit", "dinov2", "dinov2_with_registers") else key


def _resample(pos: torch.Tensor, prefix: int, old: int, new: int) -> torch.Tensor:
    """transformers' ViT/DeiT/DINOv2 resampling (bicubic, not antialiased) of a (1, prefix + old², D) embedding."""
    if old == new:
        return pos
    D = pos.shape[-1]
    grid = pos[:, prefix:].float().reshape(1, old, old, D).permute(0, 3, 1, 2)        # (1, D, old, old)
    grid = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :prefix], grid.permute(0, 2, 3, 1).reshape(1, new * new, D).to(pos.dtype)], dim=1)


def timm_state(state: dict[str, torch.Tensor], eq: Equivalent, config: dict) -> dict[str, torch.Tensor]:
    """The transformers-named state dict of a converted directory under the equivalent timm model's names."""
    out: dict[str, torch.Tensor] = {}
    softmax: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        k = _base_key(key)
        if k.startswith(_DROPPED):
            continue
        if k in _TOP:
            out[_TOP[k]] = value
            continue
        m = _BLOCK.match(key)
        if not m:
            raise KeyError(f"{key} has no counterpart in timm's {eq.architecture}")
        i, rest = m.group(1), m.group(2)
        part = next(((old, qkv) for old, qkv in _SOFTMAX_QKV if rest.startswith(old)), None)
        if part is not None:                              # a layer the hybrid kept softmax: q, k, v fused into qkv
            softmax.setdefault(f"blocks.{i}.attn.qkv.{rest[len(part[0]):]}", {})[part[1]] = value
            continue
        if rest.startswith(_SOFTMAX_OUT):
            out[f"blocks.{i}.attn.proj.{rest.split('.')[-1]}"] = value
            continue
        new = next((n + rest[len(o):] for o, n in _IN_BLOCK if rest.startswith(o)), None)
        if new is None:
            raise KeyError(f"{key} has no counterpart in timm's {eq.architecture}")
        out[f"blocks.{i}.{new}"] = value
    for k, parts in softmax.items():
        out[k] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    prefix = 2 if "dist_token" in out else 1
    patch = _size(config["patch_size"])[0]
    old, new = _size(config["image_size"])[0] // patch, eq.resolution // patch
    pos = out["pos_embed"]
    if not eq.antialiased:
        pos = _resample(pos, prefix, old, new)
    if eq.model_args.get("no_embed_class"):              # timm positions only the patches: fold the class
        out["cls_token"] = out["cls_token"] + pos[:, :1]   # token's (constant) position into it
        pos = pos[:, 1:]
    out["pos_embed"] = pos
    return out


def set_norm_eps(model: torch.nn.Module, eps: float) -> None:
    """transformers' ``layer_norm_eps`` on every LayerNorm of the timm model (timm's default is 1e-6)."""
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = eps


def hf_data_config(processor: Optional[dict], resolution: int) -> dict:
    """timm's data-config fields from a ``preprocessor_config.json`` at the equivalent's resolution."""
    out = {"input_size": (3, resolution, resolution), "crop_pct": 1.0}
    if processor:
        out.update(mean=tuple(processor.get("image_mean", ())) or None, std=tuple(processor.get("image_std", ())) or None)
        size, crop = processor.get("size") or {}, processor.get("crop_size") or {}
        if processor.get("do_center_crop") and "shortest_edge" in size and crop.get("height"):
            out["crop_pct"] = crop["height"] / size["shortest_edge"]
    return {k: v for k, v in out.items() if v is not None}
