"""Hugging Face transformers vision towers: ViT, DeiT and DINOv2 (with or without registers) here; CLIP /
SigLIP (:mod:`~castle_convert.adapters.hf_clip`) and DINOv3 (:mod:`~castle_convert.adapters.hf_dinov3`)
through their family modules, which say where the tower is, its prefix tokens, patch size, RoPE layout and
which attentions stay softmax (pooling heads, text towers). This module is the machinery they share.

Written against module structure, not classes, so both attention layouts convert:
  * before transformers 5.9: ``XAttention(attention=XSelfAttention(query, key, value), output=XSelfOutput(dense))``
  * from 5.9 on:             ``XAttention(q_proj, k_proj, v_proj, o_proj)`` (CLIP/SigLIP: ``out_proj``)
The whole ``XAttention`` is replaced by a shim that keeps the family's call/return convention.

The patch grid of each call reaches the shims through the keyword arguments transformers passes
from the base model's forward down to every attention (``**kwargs``): a forward pre-hook on the
base model adds ``grid=(rows, cols)``, computed from that call's ``pixel_values``, to the call's
own keyword arguments (it stores nothing). Versions whose base model calls its encoder without
them (5.8: ``self.encoder(embedding_output)``) get the grid relayed on the call's own embedding
tensor: the embeddings' forward hook sets ``_castle_grid`` on the tensor it returns, and the
encoder's pre-hook turns it into the keyword argument. Versions whose layers take no ``**kwargs``
(4.x) get no grid: square inputs only. Direct calls of a layer or attention take ``grid=``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Optional, Tuple

import torch
from torch import nn

from castle_convert.adapters import (Backbone, Candidate, Rejected, Scan, attention_problem,
                                     fused_linear, looks_like_attention)
from castle_convert.attention.base import CastlingModule, SoftmaxAttentionSpec
from castle_convert.attention.functional import patch_grid

NAME = "transformers"
VIT_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers")


def _family_modules():
    from castle_convert.adapters import hf_clip, hf_dinov3, hf_siglip2
    return (hf_clip, hf_dinov3, hf_siglip2)


MODEL_TYPES = VIT_TYPES + tuple(t for f in _family_modules() for t in f.MODEL_TYPES)
SUPPORTED = [f"transformers {t} self-attention ({'/'.join(['query,key,value', 'q_proj,k_proj,v_proj'])})"
             for t in MODEL_TYPES]


def _family(model: nn.Module):
    """The family module of ``model``'s model_type (None: ViT/DeiT/DINOv2, handled here)."""
    mt = getattr(getattr(model, "config", None), "model_type", "?")
    return next((f for f in _family_modules() if mt in f.MODEL_TYPES), None)


class HFAttentionShim(nn.Module):
    """Calls a castling attention with the transformers attention signature.

    ``returns_tuple`` mirrors the replaced module: ``(out, None)`` (5.9+) or ``out`` (older).
    """

    def __init__(self, attn: CastlingModule, returns_tuple: bool):
        super().__init__()
        self.attn = attn
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                head_mask: Optional[torch.Tensor] = None, output_attentions: bool = False,
                grid: Optional[Tuple[int, int]] = None,
                position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                token_mask: Optional[torch.Tensor] = None, grid_sizes: Optional[torch.Tensor] = None, **kwargs: Any):
        # a NaFlex tower (SigLIP2) passes its padding mask itself (token_mask (B, N), grid_sizes (B, 2)):
        # the N×N attention_mask transformers built from the same mask is then not needed
        if head_mask is not None or (attention_mask is not None and token_mask is None
                                     and not _is_noop_mask(attention_mask)):
            raise NotImplementedError(
                "linear attention cannot apply an attention_mask/head_mask that hides tokens")
        rope = None
        if position_embeddings is not None:                              # RoPE (DINOv3): (cos, sin), (M, d) each
            cos, sin = position_embeddings
            rope = torch.cat([sin, cos], dim=-1)                         # (M, 2d), [sin | cos]
        out = self.attn(hidden_states, grid=grid, rope=rope, token_mask=token_mask,
                        grid_sizes=grid_sizes)                           # (B, N, dim)
        return (out, None) if self.returns_tuple else out


def _is_noop_mask(mask: torch.Tensor) -> bool:
    """transformers may build an all-visible bidirectional mask (e.g. while tracing); allow it.

    Under torch.compile / torch.export the mask is built from shapes only (no padding exists for
    images), so it is not inspected there.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or isinstance(mask, torch.fx.Proxy):
        return True
    if mask.dtype == torch.bool:
        return bool(mask.all())
    return bool((mask == 0).all())


def applies(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and type(model).__module__.startswith("transformers.")


def _out_proj(m: nn.Module) -> Optional[nn.Linear]:
    for n in ("o_proj", "out_proj"):
        if isinstance(getattr(m, n, None), nn.Linear):
            return getattr(m, n)
    return None


def _layout(m: nn.Module) -> Optional[str]:
    if isinstance(m, nn.MultiheadAttention):
        return None
    if all(isinstance(getattr(m, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj")) and \
            _out_proj(m) is not None:
        return "qkvo"
    sa, out = getattr(m, "attention", None), getattr(m, "output", None)
    if sa is not None and out is not None and isinstance(getattr(out, "dense", None), nn.Linear) and all(
            isinstance(getattr(sa, n, None), nn.Linear) for n in ("query", "key", "value")):
        return "self_output"
    return None


def _num_prefix_tokens(embeddings: nn.Module) -> int:
    n = 1 if getattr(embeddings, "cls_token", None) is not None else 0
    n += 1 if getattr(embeddings, "distillation_token", None) is not None else 0
    reg = getattr(embeddings, "register_tokens", None)
    return n + (reg.shape[1] if reg is not None else 0)


def _returns_tuple(attn: nn.Module, dim: int, n_tokens: int) -> bool:
    """Probe the original module once on a tiny input to learn its return convention (an attention that
    needs more than hidden states, e.g. DINOv3's RoPE, is read from its return annotation)."""
    p = next(attn.parameters())
    was_training = attn.training
    attn.eval()
    try:
        with torch.no_grad():
            out = attn(torch.zeros(1, n_tokens, dim, device=p.device, dtype=p.dtype))
        return isinstance(out, tuple)
    except (TypeError, ValueError):
        return "tuple" in str(inspect.signature(type(attn).forward).return_annotation).lower()
    finally:
        attn.train(was_training)


def _spec_builder(attn: nn.Module, layout: str, config, num_prefix_tokens: int, rope_half: bool = False):
    def build() -> SoftmaxAttentionSpec:
        if layout == "qkvo":
            q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, _out_proj(attn)
            heads = getattr(attn, "num_attention_heads", getattr(attn, "num_heads", None))
            head_dim = getattr(attn, "head_dim", q.out_features // heads)
            scale = float(getattr(attn, "scaling", getattr(attn, "scale", head_dim ** -0.5)))
            drop = getattr(attn, "attention_dropout", getattr(attn, "dropout", 0.0))
            attn_drop, proj_drop = float(drop if isinstance(drop, (int, float)) else 0.0), 0.0
        else:
            sa = attn.attention
            q, k, v, o = sa.query, sa.key, sa.value, attn.output.dense
            heads = getattr(sa, "num_attention_heads", config.num_attention_heads)
            head_dim = getattr(sa, "attention_head_size", q.out_features // heads)
            scale = float(getattr(sa, "scaling", head_dim ** -0.5))
            drop = getattr(sa, "dropout", None)
            attn_drop = float(drop.p if isinstance(drop, nn.Dropout)
                              else getattr(sa, "dropout_prob", config.attention_probs_dropout_prob))
            out_drop = getattr(attn.output, "dropout", None)
            proj_drop = float(out_drop.p) if isinstance(out_drop, nn.Dropout) else 0.0
        return SoftmaxAttentionSpec(
            dim=q.in_features, num_heads=int(heads), head_dim=int(head_dim), scale=scale,
            qkv=fused_linear([q, k, v]), proj=o, num_prefix_tokens=num_prefix_tokens,
            q_norm=nn.Identity(), k_norm=nn.Identity(), out_norm=nn.Identity(), rope_half=rope_half,
            attn_drop=attn_drop, proj_drop=proj_drop)
    return build


def _backbone(model: nn.Module) -> tuple[Optional[Backbone], nn.Module]:
    """(the ViT backbone of a supported model type or None, its tower: the module whose forward takes
    ``pixel_values`` and hands its keyword arguments down to every attention)."""
    config = model.config
    family = _family(model)
    if family is not None:
        found = family.tower(model)
        if found is None:
            return None, model
        name, tower = found
        return Backbone(name=name, patch_embed=tower.embeddings, patch_size=family.patch_size(tower),
                        num_prefix_tokens=family.num_prefix_tokens(tower)), tower
    base = getattr(model, "base_model", model)
    embeddings = getattr(base, "embeddings", None)
    if getattr(config, "model_type", "?") not in VIT_TYPES or embeddings is None or \
            not hasattr(embeddings, "patch_embeddings"):
        return None, base
    base_name = "" if base is model else next(n for n, m in model.named_modules() if m is base)
    pe = embeddings.patch_embeddings
    patch = getattr(pe, "patch_size", config.patch_size)
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    return Backbone(name=base_name, patch_embed=pe, patch_size=patch,
                    num_prefix_tokens=_num_prefix_tokens(embeddings)), base


def scan(model: nn.Module) -> Scan:
    result = Scan(adapter=NAME)
    config = model.config
    model_type = getattr(config, "model_type", "?")
    family = _family(model)
    owned: set[int] = set()
    backbone, base = _backbone(model)
    if backbone is not None:
        base_name, n_prefix = backbone.name, backbone.num_prefix_tokens
        rope_half = bool(getattr(family, "ROPE_HALF", False))
        result.backbones.append(backbone)
        for name, m in base.named_modules(prefix=base_name):
            layout = _layout(m)
            if layout is None or any(name.startswith(c.name + ".") for c in result.candidates):
                continue
            problem = attention_problem(m) or (attention_problem(m.attention) if layout == "self_output" else None)
            if problem:
                result.rejected.append(Rejected(name=name, module=m, reason=problem))
                continue
            owned.update(id(x) for x in m.modules())
            dim = (m.q_proj if layout == "qkvo" else m.attention.query).in_features
            returns_tuple = _returns_tuple(m, dim, n_prefix + 4)
            result.candidates.append(Candidate(
                name=name, module=m, backbone=base_name,
                build_spec=_spec_builder(m, layout, getattr(base, "config", config), n_prefix, rope_half),
                wrap=lambda inner, rt=returns_tuple: HFAttentionShim(inner, rt)))
    if family is not None:
        for name, m, why in family.left_softmax(model, backbone.name if backbone else ""):
            result.left_softmax.append(Rejected(name=name, module=m, reason=why))
            owned.update(id(x) for x in m.modules())
    for name, m in model.named_modules():
        if id(m) in owned or not looks_like_attention(m):
            continue
        if any(name.startswith(r.name + ".") for r in result.rejected):
            continue
        problem = attention_problem(m)
        if problem is None:
            problem = (f"transformers model_type '{model_type}' is not supported "
                       f"(supported: {', '.join(MODEL_TYPES)})" if model_type not in MODEL_TYPES
                       else f"{type(m).__name__} does not have a known attention layout")
        result.rejected.append(Rejected(name=name, module=m, reason=problem))
    return result


def forward(model: nn.Module, images: torch.Tensor):
    """Call the model on images of any size (position embeddings interpolated when needed)."""
    _, h, w = input_size(model)
    interpolate = tuple(images.shape[-2:]) != (h, w)
    family = _family(model)
    if family is not None:
        return family.forward(model, images, interpolate)
    return model(images, interpolate_pos_encoding=interpolate)


def _grid_kwarg(patch_size: Tuple[int, int], module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the base model: this call's patch grid joins this call's keyword arguments."""
    pixels = args[0] if args else kwargs.get("pixel_values")
    if not isinstance(pixels, torch.Tensor) or "grid" in kwargs:
        return None
    return args, {**kwargs, "grid": patch_grid(pixels.shape[-2], pixels.shape[-1], patch_size)}


def _grid_on_embeddings(patch_size: Tuple[int, int], module: nn.Module, args: tuple, kwargs: dict, out):
    """Forward hook of the embeddings: this call's grid travels on this call's embedding tensor."""
    pixels = args[0] if args else kwargs.get("pixel_values")
    if isinstance(pixels, torch.Tensor) and isinstance(out, torch.Tensor):
        out._castle_grid = patch_grid(pixels.shape[-2], pixels.shape[-1], patch_size)


def _grid_from_embeddings(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the encoder: the grid on its input tensor becomes the ``grid`` keyword argument."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if "grid" in kwargs or getattr(hidden, "_castle_grid", None) is None:
        return None
    return args, {**kwargs, "grid": hidden._castle_grid}


def _takes_kwargs(module: nn.Module) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(module.forward).parameters.values())


def pass_grid(model: nn.Module) -> None:
    """Register :func:`_grid_kwarg` on the base model, and the relay through the embedding tensor when the
    encoder takes keyword arguments (once)."""
    backbone, base = _backbone(model)
    if backbone is None or getattr(base, "_castle_passes_grid", False):
        return
    family = _family(model)
    if hasattr(family, "call_kwargs"):                 # NaFlex: the call's padding mask and grids, not an image's
        base.register_forward_pre_hook(family.call_kwargs, with_kwargs=True)
        base._castle_passes_grid = True
        return
    base.register_forward_pre_hook(functools.partial(_grid_kwarg, backbone.patch_size), with_kwargs=True)
    encoder = getattr(base, "encoder", None)
    if isinstance(encoder, nn.Module) and _takes_kwargs(encoder) and hasattr(base, "embeddings"):
        base.embeddings.register_forward_hook(functools.partial(_grid_on_embeddings, backbone.patch_size),
                                              with_kwargs=True)
        encoder.register_forward_pre_hook(_grid_from_embeddings, with_kwargs=True)
    base._castle_passes_grid = True


def input_size(model: nn.Module) -> tuple[int, int, int]:
    cfg = model.config
    cfg = getattr(cfg, "vision_config", None) or cfg            # dual encoders (CLIPModel, SiglipModel)
    family = _family(model)
    size = getattr(cfg, "image_size", None) or (family.default_size(cfg) if hasattr(family, "default_size") else 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(getattr(cfg, "num_channels", 3)), int(h), int(w)

