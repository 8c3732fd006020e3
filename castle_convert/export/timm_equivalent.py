"""A directory converted from a transformers ViT / DeiT / DINOv2 / CLIP / SigLIP / SigLIP2 / DINOv3, loaded as the
equivalent timm model.

timm's ``local-dir:`` / ``hf-hub:`` / ``castle_<arch>`` routes build timm classes, and the weights of a
transformers source carry transformers' names. :func:`plan` says which timm architecture computes the
same function (or why none does), with its constructor arguments read from the transformers config;
:func:`timm_state` renames (and, for layers a hybrid kept softmax, fuses q/k/v of) the state dict.

| transformers class | timm equivalent | what is equal |
|---|---|---|
| ``ViTModel`` / ``ViTForImageClassification`` | ``VisionTransformer`` (class token, token pooling) | logits; ``forward_features`` = ``last_hidden_state``; ``ViTModel``'s pooler (dense + tanh) is not part of timm's model |
| ``DeiTModel`` / ``DeiTForImageClassificationWithTeacher`` | ``VisionTransformerDistilled`` (class + distillation token, the two heads averaged) | logits; ``forward_features`` = ``last_hidden_state`` |
| ``Dinov2Model`` | ``VisionTransformer`` with LayerScale (``vit_*_dinov2``) | ``forward_features`` = ``last_hidden_state``, ``model(x)`` = ``pooler_output`` |
| ``Dinov2WithRegistersModel`` | ``VisionTransformer`` with register tokens, ``no_embed_class`` (``vit_*_reg*_dinov2``): the class token's position embedding is folded into it | as ``Dinov2Model`` |
| ``CLIPVisionModel`` | ``VisionTransformer`` ``vit_*_clip_quickgelu_*`` (``vit_*_clip_*`` for GELU): ``pre_norm`` (``pre_layrnorm``), class token, ``post_layernorm`` as ``fc_norm`` | ``forward_features`` = ``last_hidden_state`` (before ``post_layernorm``, as in transformers), ``model(x)`` = ``pooler_output`` (``post_layernorm`` of the class token). timm's own ``vit_*_clip_*`` applies that norm to every token in ``forward_features`` (``norm``); here it is ``fc_norm``, after pooling, so that both outputs match transformers |
| ``SiglipVisionModel`` | ``VisionTransformer`` ``vit_*_siglip_*``: no class token, ``global_pool='map'`` (``AttentionPoolLatent``: ``probe`` → ``latent``, ``in_proj`` → ``q`` / ``kv``; stays softmax), ``gelu_tanh`` | ``forward_features`` = ``last_hidden_state`` (after ``post_layernorm``), ``model(x)`` = ``pooler_output``; without a head (``vision_use_head=False``) ``model(x)`` = ``last_hidden_state`` |
| ``DINOv3ViTModel`` | ``Eva`` ``vit_*_dinov3``: DINOv3 RoPE (``RotaryEmbeddingDinoV3``, ``rope_temperature`` = ``rope_theta``; its sin/cos within 1.2e-7 of transformers' up to 28×20 patches), register tokens, LayerScale (``gamma_1``/``gamma_2``), ``q_bias``/``v_bias`` (with ``key_bias``: ``attn_type='rope'``, whose fused ``qkv`` has a key bias; under RoPE softmax does not ignore one) | ``forward_features`` = ``last_hidden_state``, ``model(x)`` = ``pooler_output`` (class token); GELU MLP, or the gated SiLU MLP (``use_gated_mlp``) as Eva's ``GluMlp`` (``fc1`` = ``gate_proj`` stacked on ``up_proj``) |
| ``Siglip2VisionModel`` (NaFlex) | ``NaFlexVit`` ``naflexvit_*_siglip``: Linear patch embedding (``embeds.proj``, the same (P, P, C) patch layout), the (G, G) table as ``embeds.pos_embed`` resized per image bilinear + antialiased (``pos_embed_interp_mode='bilinear'``, ``pos_embed_antialias``, no ``align_corners``, aspect ratio not kept: transformers' ``resize_positional_embeddings``, within 2.2e-6 on N(0, 1) tables), no class token, MAP head as ``attn_pool`` | ``forward_features(x)`` = ``last_hidden_state``, ``model(x)`` = ``pooler_output`` (without a head: ``last_hidden_state``) for images (B, C, H, W) of any size, and for a NaFlex dict (``patches`` = ``pixel_values``, ``patch_coord`` row-major, ``patch_valid`` = ``pixel_attention_mask``): the real tokens and the pooled output of a padded batch |

Position embeddings: transformers' DINOv2 with registers resamples them like timm (bicubic,
antialiased); ViT, DeiT, DINOv2, CLIP and SigLIP without antialiasing. For those the timm model is built at the
directory's own resolution (``deploy_resolution``: what its processor produces; older directories:
``distilled_resolution``, else the config's ``image_size``) with the
embedding resampled there the transformers way: equal outputs at that size; at other sizes timm's
antialiased resampling makes them differ slightly. DINOv3 has no absolute position embedding, and SigLIP2 resizes its
table per image the way timm's NaFlexVit is built to here: equal at every size.
Training-time RoPE augmentation (transformers' ``pos_embed_rescale`` etc.) is not carried over; inference is.
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
    "CLIPVisionModel": "vit_base_patch16_clip_224", "SiglipVisionModel": "vit_base_patch16_siglip_224",
    "DINOv3ViTModel": "vit_small_patch16_dinov3", "Siglip2VisionModel": "naflexvit_base_patch16_siglip",
}
_NO_EQUIVALENT = {
    "DeiTForImageClassification": "its head reads the class token only, while timm's DeiT averages the class "
                                  "and distillation heads",
    "Dinov2ForImageClassification": "its head reads the class token and the mean patch token together",
    "Dinov2WithRegistersForImageClassification": "its head reads the class token and the mean patch token together",
}
_TOWERS = ("CLIPVisionModel", "SiglipVisionModel")
# transformers hidden_act -> timm act_layer computing the same function
_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
        "relu": "relu", "silu": "silu"}


@dataclass
class Equivalent:
    """The timm architecture computing what a transformers-source directory computes."""

    architecture: str
    model_args: dict
    resolution: int                       # px at which the two are equal (transformers' own resampling)
    norm_eps: float
    hf_class: str
    antialiased: bool = False             # transformers resamples the position embedding as timm does
    naflex: bool = False                  # timm NaFlexVit: embeds.proj / embeds.pos_embed (1, G, G, D), never resampled
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
    if hf_class == "Siglip2VisionModel":
        return _plan_naflex(config, hf_class)
    dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    patch, image = _size(config["patch_size"]), _size(config["image_size"])
    if image[0] != image[1] or patch[0] != patch[1]:
        return f"transformers {hf_class} with a non-square image_size / patch_size has no timm equivalent here"
    resolution = int(config.get("deploy_resolution") or config.get("distilled_resolution") or image[0])
    act = config.get("hidden_act", "gelu")
    if hf_class in _TOWERS:
        return _plan_tower(config, hf_class, dim, heads, patch[0], resolution, act)
    if hf_class == "DINOv3ViTModel":
        return _plan_dinov3(config, hf_class, dim, heads, patch[0], resolution, act)
    if act != "gelu" or config.get("use_swiglu_ffn") or \
            config.get("num_channels", 3) != 3 and hf_class.startswith("Dinov2"):
        return f"transformers {hf_class} with hidden_act={act!r} / SwiGLU has no timm equivalent"
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


def _mlp_ratio(config: dict, dim: int) -> Union[float, str]:
    """``intermediate_size / hidden_size`` when timm's ``int(dim * mlp_ratio)`` gives it back exactly, else why not."""
    hidden = int(config["intermediate_size"])
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else f"intermediate_size={hidden} is not int(hidden_size * ratio)"


def _plan_tower(config: dict, hf_class: str, dim: int, heads: int, patch: int, resolution: int,
                act: str) -> Union[Equivalent, str]:
    """CLIP / SigLIP vision towers: timm's ``vit_*_clip_*`` (pre-norm, class token, ``post_layernorm`` as
    ``fc_norm`` after pooling) and ``vit_*_siglip_*`` (no class token, MAP head as ``attn_pool``)."""
    if act not in _ACT:
        return f"transformers {hf_class} with hidden_act={act!r} has no timm activation castle-convert maps"
    mlp = _mlp_ratio(config, dim)
    if isinstance(mlp, str):
        return f"transformers {hf_class} with {mlp} has no timm equivalent"
    args = dict(img_size=resolution, patch_size=patch, in_chans=int(config.get("num_channels", 3)), embed_dim=dim,
                depth=int(config["num_hidden_layers"]), num_heads=heads, mlp_ratio=mlp, qkv_bias=True,
                num_classes=0, dynamic_img_size=True, act_layer=_ACT[act], init_values=None)
    arch = _EQUIVALENT[hf_class]
    if hf_class == "CLIPVisionModel":
        # pre_norm: pre_layrnorm, and no patch-embedding bias; fc_norm: post_layernorm after pooling (HF's
        # pooler_output), so forward_features stays HF's last_hidden_state (no final norm on every token)
        args.update(class_token=True, global_pool="token", pre_norm=True, fc_norm=True)
        arch = "vit_base_patch16_clip_quickgelu_224" if act == "quick_gelu" else arch
    elif config.get("vision_use_head", True):
        args.update(class_token=False, global_pool="map")        # MAP head: timm's AttentionPoolLatent
    else:
        args.update(class_token=False, global_pool="", fc_norm=False)   # no head: every token is the output
    return Equivalent(architecture=arch, model_args=args, resolution=resolution,
                      norm_eps=float(config.get("layer_norm_eps", 1e-5)), hf_class=hf_class,
                      converted_modules=[timm_path(p) for p in config.get("converted_modules") or []])


def _plan_naflex(config: dict, hf_class: str) -> Union[Equivalent, str]:
    """SigLIP2's NaFlex tower: timm's ``NaFlexVit`` ``naflexvit_*_siglip`` (Linear patch embedding on (P, P, C)
    patches, the (G, G) position table resized per image bilinear + antialiased as transformers does, no class
    token, MAP head as ``attn_pool``). No resolution is baked in: both resize the same table for every grid."""
    dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    patch, act = _size(config["patch_size"]), config.get("hidden_act", "gelu_pytorch_tanh")
    grid = int(round(int(config["num_patches"]) ** 0.5))
    if grid * grid != int(config["num_patches"]) or patch[0] != patch[1]:
        return (f"transformers {hf_class} with num_patches={config['num_patches']} / patch_size={config['patch_size']} "
                "(not a square grid of square patches) has no timm equivalent")
    if act not in _ACT:
        return f"transformers {hf_class} with hidden_act={act!r} has no timm activation castle-convert maps"
    mlp = _mlp_ratio(config, dim)
    if isinstance(mlp, str):
        return f"transformers {hf_class} with {mlp} has no timm equivalent"
    head = bool(config.get("vision_use_head", True))
    # transformers' resize_positional_embeddings = F.interpolate(bilinear, align_corners=False, antialias=True) to
    # (rows, cols), the aspect ratio not kept: timm's learned NaFlex table with these settings, images and NaFlex dicts
    args = dict(img_size=grid * patch[0], patch_size=patch[0], in_chans=int(config.get("num_channels", 3)),
                embed_dim=dim, depth=int(config["num_hidden_layers"]), num_heads=heads, mlp_ratio=mlp, qkv_bias=True,
                num_classes=0, act_layer=_ACT[act], init_values=None, class_token=False, reg_tokens=0,
                pos_embed="learned", pos_embed_grid_size=(grid, grid), pos_embed_interp_mode="bilinear",
                pos_embed_antialias=True, pos_embed_align_corners=False, pos_embed_ar_preserving=False,
                pos_embed_use_grid_sample=False, embed_proj_type="linear", patchify_channels_last=True,
                global_pool="map" if head else "", fc_norm=False)
    resolution = int(config.get("deploy_resolution") or config.get("distilled_resolution") or grid * patch[0])
    return Equivalent(architecture=_EQUIVALENT[hf_class], model_args=args, resolution=resolution,
                      norm_eps=float(config.get("layer_norm_eps", 1e-6)), hf_class=hf_class, naflex=True,
                      converted_modules=[timm_path(p) for p in config.get("converted_modules") or []])


def _plan_dinov3(config: dict, hf_class: str, dim: int, heads: int, patch: int, resolution: int,
                 act: str) -> Union[Equivalent, str]:
    """DINOv3: timm's Eva ``vit_*_dinov3`` (DINOv3 RoPE, register tokens, LayerScale, class-token pooling)."""
    gated = bool(config.get("use_gated_mlp"))
    if act != ("silu" if gated else "gelu"):      # timm's Eva: GELU Mlp, or GluMlp with SiLU (SwiGLU)
        return (f"transformers {hf_class} with use_gated_mlp={gated} and hidden_act={act!r} has no timm Eva "
                f"equivalent (Eva's {'SwiGLU MLP is SiLU' if gated else 'MLP is GELU'})")
    if not config.get("mlp_bias", True) or not config.get("proj_bias", True):
        return f"transformers {hf_class} without MLP / output-projection biases has no timm Eva equivalent"
    mlp = _mlp_ratio(config, dim)
    if isinstance(mlp, str):
        return f"transformers {hf_class} with {mlp} has no timm equivalent"
    args = dict(img_size=resolution, patch_size=patch, in_chans=int(config.get("num_channels", 3)), embed_dim=dim,
                depth=int(config["num_hidden_layers"]), num_heads=heads, mlp_ratio=mlp,
                qkv_bias=bool(config.get("query_bias", True) or config.get("value_bias", True)),
                init_values=float(config.get("layerscale_value", 1.0)),
                num_reg_tokens=int(config.get("num_register_tokens", 0)), global_pool="token", use_fc_norm=False,
                rope_temperature=float(config.get("rope_theta", 100.0)), num_classes=0, dynamic_img_size=True,
                swiglu_mlp=gated, scale_mlp=False)
    if config.get("key_bias"):
        # RoPE turns a key bias into a per-position term softmax does not ignore, and EvaAttention's key bias is a
        # fixed zero: timm's AttentionRope (one fused qkv with a full bias) holds it
        args["attn_type"] = "rope"
    return Equivalent(architecture=_EQUIVALENT[hf_class], model_args=args, resolution=resolution,
                      norm_eps=float(config.get("layer_norm_eps", 1e-5)), hf_class=hf_class,
                      converted_modules=[timm_path(p) for p in config.get("converted_modules") or []])


_BLOCK = re.compile(r"^(?:[a-z0-9_]+\.)?(?:encoder\.layers?|layers?)\.(\d+)\.(.+)$")
_IN_BLOCK = [("attention.attn.", "attn."), ("self_attn.attn.", "attn."), ("layernorm_before.", "norm1."),
             ("layernorm_after.", "norm2."), ("layer_norm1.", "norm1."), ("layer_norm2.", "norm2."),
             ("norm1.", "norm1."), ("norm2.", "norm2."), ("intermediate.dense.", "mlp.fc1."),
             ("output.dense.", "mlp.fc2."), ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."),
             ("mlp.up_proj.", "mlp.fc1."), ("mlp.gate_proj.", "mlp.fc1."), ("mlp.down_proj.", "mlp.fc2."),
             ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma")]
_SOFTMAX_QKV = [("attention.attention.query.", "q"), ("attention.attention.key.", "k"),
                ("attention.attention.value.", "v"), ("attention.q_proj.", "q"), ("attention.k_proj.", "k"),
                ("attention.v_proj.", "v"), ("self_attn.q_proj.", "q"), ("self_attn.k_proj.", "k"),
                ("self_attn.v_proj.", "v")]
_SOFTMAX_OUT = ("attention.output.dense.", "attention.o_proj.", "self_attn.out_proj.")
_TOP = {"embeddings.cls_token": "cls_token", "embeddings.distillation_token": "dist_token",
        "embeddings.register_tokens": "reg_token", "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",       # DINOv3
        "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
        "embeddings.class_embedding": "cls_token",                             # CLIP / SigLIP towers
        "embeddings.position_embedding.weight": "pos_embed",
        "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
        "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
        "pre_layrnorm.weight": "norm_pre.weight", "pre_layrnorm.bias": "norm_pre.bias",
        "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias",
        "head.probe": "attn_pool.latent", "head.attention.out_proj.weight": "attn_pool.proj.weight",
        "head.attention.out_proj.bias": "attn_pool.proj.bias", "head.layernorm.weight": "attn_pool.norm.weight",
        "head.layernorm.bias": "attn_pool.norm.bias", "head.mlp.fc1.weight": "attn_pool.mlp.fc1.weight",
        "head.mlp.fc1.bias": "attn_pool.mlp.fc1.bias", "head.mlp.fc2.weight": "attn_pool.mlp.fc2.weight",
        "head.mlp.fc2.bias": "attn_pool.mlp.fc2.bias",
        "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias", "norm.weight": "norm.weight",
        "norm.bias": "norm.bias", "classifier.weight": "head.weight",
        "classifier.bias": "head.bias", "cls_classifier.weight": "head.weight", "cls_classifier.bias": "head.bias",
        "distillation_classifier.weight": "head_dist.weight", "distillation_classifier.bias": "head_dist.bias"}
_DROPPED = ("embeddings.mask_token", "pooler.")


def timm_path(hf_path: str) -> str:
    """``encoder.layers.3.self_attn`` / ``encoder.layer.3.attention`` / ``model.layer.3.attention`` →
    ``blocks.3.attn``."""
    m = _BLOCK.match(hf_path)
    return f"blocks.{m.group(1)}.attn" if m else hf_path


def _base_key(key: str) -> str:
    """A key without the base-model prefix (``vit.``, ``deit.``, ``dinov2.``, ``vision_model.``)."""
    head, _, rest = key.partition(".")
    return rest if head in ("vit", "deit", "dinov2", "dinov2_with_registers", "vision_model") else key


def _resample(pos: torch.Tensor, prefix: int, old: int, new: int) -> torch.Tensor:
    """transformers' ViT/DeiT/DINOv2/CLIP/SigLIP resampling (bicubic, not antialiased) of a (1, prefix + old², D)
    embedding."""
    if old == new:
        return pos
    D = pos.shape[-1]
    grid = pos[:, prefix:].float().reshape(1, old, old, D).permute(0, 3, 1, 2)        # (1, D, old, old)
    grid = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :prefix], grid.permute(0, 2, 3, 1).reshape(1, new * new, D).to(pos.dtype)], dim=1)


def _fused_softmax(out: dict, softmax: dict, eva: bool) -> None:
    """q, k, v of the layers a hybrid kept softmax, fused as timm holds them: ``qkv.weight`` (3D, D) and
    ``qkv.bias`` (3D,) (a missing bias is zero); EvaAttention keeps ``q_bias`` / ``v_bias`` apart and its key bias
    is a fixed zero (:func:`plan` picks ``AttentionRope`` for a source with a key bias)."""
    for k, parts in softmax.items():
        if k.endswith(".weight"):
            out[k] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)                # (3D, D)
            continue
        q = parts.get("q", torch.zeros_like(next(iter(parts.values()))))
        v = parts.get("v", torch.zeros_like(q))
        if eva:
            attn = k[: -len(".qkv.bias")]
            out[f"{attn}.q_bias"], out[f"{attn}.v_bias"] = q, v
        else:
            out[k] = torch.cat([q, parts.get("k", torch.zeros_like(q)), v], 0)          # (3D,)


def timm_state(state: dict[str, torch.Tensor], eq: Equivalent, config: dict) -> dict[str, torch.Tensor]:
    """The transformers-named state dict of a converted directory under the equivalent timm model's names."""
    out: dict[str, torch.Tensor] = {}
    softmax: dict[str, dict[str, torch.Tensor]] = {}
    glu: dict[str, dict[str, torch.Tensor]] = {}
    eva = eq.hf_class == "DINOv3ViTModel"
    for key, value in state.items():
        k = _base_key(key)
        if k.startswith(_DROPPED):
            continue
        if k == "head.attention.in_proj_weight" or k == "head.attention.in_proj_bias":   # SigLIP MAP head
            D = value.shape[0] // 3                          # (3D, D) / (3D,): [q | k | v]
            kind = k.rsplit("_", 1)[-1]
            out[f"attn_pool.q.{kind}"], out[f"attn_pool.kv.{kind}"] = value[:D], value[D:]
            continue
        if k in _TOP:
            if value.numel():                             # (1, 0, D) register tokens of a model without any
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
        if eva:                                           # Eva's LayerScale: gamma_1 / gamma_2
            new = {"ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2"}.get(new, new)
        if eva and rest.startswith("mlp.gate_proj."):     # gated MLP: timm's GluMlp packs [gate | up] in fc1
            glu.setdefault(f"blocks.{i}.mlp.fc1.{rest.split('.')[-1]}", {})["gate"] = value
            continue
        if eva and rest.startswith("mlp.up_proj.") and eq.model_args.get("swiglu_mlp"):
            glu.setdefault(f"blocks.{i}.{new}", {})["up"] = value
            continue
        out[f"blocks.{i}.{new}"] = value
    for k, parts in glu.items():
        out[k] = torch.cat([parts["gate"], parts["up"]], 0)                           # (2H, D) / (2H,)
    _fused_softmax(out, softmax, eva and eq.model_args.get("attn_type") != "rope")
    if eq.model_args.get("fc_norm") and "norm.weight" in out:     # CLIP: post_layernorm after pooling
        out["fc_norm.weight"], out["fc_norm.bias"] = out.pop("norm.weight"), out.pop("norm.bias")
    if "cls_token" in out:
        out["cls_token"] = out["cls_token"].reshape(1, 1, -1)   # CLIP's class_embedding is (D,)
    if "pos_embed" not in out:                            # RoPE only (DINOv3)
        return out
    if eq.naflex:                                         # NaFlexVit: the (G, G) table itself, resized per call
        G = eq.model_args["pos_embed_grid_size"][0]
        out["embeds.pos_embed"] = out.pop("pos_embed").reshape(1, G, G, -1)          # (1, G, G, D)
        for k in ("weight", "bias"):                      # (D, P·P·C): the same (P, P, C) patch layout
            out[f"embeds.proj.{k}"] = out.pop(f"patch_embed.proj.{k}")
        return out
    prefix = 2 if "dist_token" in out else int("cls_token" in out)
    patch = _size(config["patch_size"])[0]
    old, new = _size(config["image_size"])[0] // patch, eq.resolution // patch
    pos = out["pos_embed"].reshape(1, -1, out["pos_embed"].shape[-1])   # CLIP / SigLIP's nn.Embedding: (N, D)
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
    from castle_convert.preprocess import RESAMPLE_NAMES
    out = {"input_size": (3, resolution, resolution), "crop_pct": 1.0}
    if processor:
        out.update(mean=tuple(processor.get("image_mean", ())) or None, std=tuple(processor.get("image_std", ())) or None,
                   interpolation=RESAMPLE_NAMES.get(processor.get("resample")))   # as the processor resizes
        size, crop = processor.get("size") or {}, processor.get("crop_size") or {}
        if processor.get("do_center_crop") and "shortest_edge" in size and crop.get("height"):
            out["crop_pct"] = crop["height"] / size["shortest_edge"]
    return {k: v for k, v in out.items() if v is not None}
