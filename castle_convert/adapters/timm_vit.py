"""timm Vision Transformers: vit_*, deit_* (incl. distilled), deit3_*, register-token and
DINOv2-style models, qk_norm models — every ``timm.layers.attention.Attention`` inside a
backbone that has ``patch_embed``, ``blocks`` and ``num_prefix_tokens`` — and, through
:mod:`castle_convert.adapters.timm_eva`, the Eva RoPE attentions.

Attention pooling (``timm.layers.AttentionPoolLatent``: a few latent queries over the N tokens, already
O(N)) stays softmax: listed by ``inspect``, never an error."""

from __future__ import annotations

import torch
from torch import nn

from castle_convert.adapters import (Backbone, Candidate, Rejected, Scan, attention_problem,
                                     looks_like_attention)
from castle_convert.attention.base import SoftmaxAttentionSpec

from castle_convert.adapters import timm_eva

NAME = "timm"
SUPPORTED = ["timm.layers.attention.Attention (vit_*, deit_*, deit3_*, *_reg*, *_dinov2, qk_norm)"] + timm_eva.SUPPORTED
POOLING = "attention pooling (latent queries over the N tokens, already O(N)): stays softmax"


def _pool_cls():
    from timm.layers import AttentionPoolLatent
    return AttentionPoolLatent


def _attention_cls():
    from timm.layers.attention import Attention
    return Attention


def applies(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") or any(
        type(m).__module__.startswith("timm.") for m in model.modules())


def _backbones(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if _patch_embed(m) is not None and hasattr(m, "blocks") and hasattr(m, "num_prefix_tokens")]


def _patch_embed(backbone: nn.Module):
    """The patch embedding: ``patch_embed`` (ViT, Eva), or a NaFlexVit's ``embeds``."""
    pe = getattr(backbone, "patch_embed", None)
    if pe is None and _is_naflex(backbone):
        pe = backbone.embeds
    return pe


def _is_naflex(module: nn.Module) -> bool:
    from timm.models.naflexvit import NaFlexVit
    return isinstance(module, NaFlexVit)


NAFLEX_BLOCKS = ("naflexvit with EVA / RoPE blocks (rope_type / attn_type set in its config): its per-image RoPE in a "
                 "padded batch is not passed to converted attention yet")


def _spec_builder(attn: nn.Module, num_prefix_tokens: int):
    def build() -> SoftmaxAttentionSpec:
        return SoftmaxAttentionSpec(
            dim=attn.qkv.in_features, num_heads=attn.num_heads, head_dim=attn.head_dim,
            scale=float(attn.scale), qkv=attn.qkv, proj=attn.proj,
            num_prefix_tokens=num_prefix_tokens, q_norm=attn.q_norm,
            k_norm=attn.k_norm, out_norm=attn.norm, out_gate=getattr(attn, "gate", None),
            attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p)
    return build


def scan(model: nn.Module) -> Scan:
    Attention = _attention_cls()
    eva = timm_eva.attention_classes()
    result = Scan(adapter=NAME)
    owned: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, _pool_cls()):
            result.left_softmax.append(Rejected(name=name, module=m, reason=POOLING))
            owned.update(id(x) for x in m.modules())
    for bname, backbone in _backbones(model):
        pe = _patch_embed(backbone)
        patch = tuple(getattr(pe, "patch_size", (0, 0)))
        result.backbones.append(Backbone(name=bname, patch_embed=pe, patch_size=patch,
                                         num_prefix_tokens=int(backbone.num_prefix_tokens),
                                         pad=bool(getattr(pe, "dynamic_img_pad", False))))
        for name, m in backbone.blocks.named_modules(prefix=f"{bname}.blocks" if bname else "blocks"):
            if id(m) in owned:
                continue
            if type(m) is Attention:
                owned.add(id(m))
                result.candidates.append(Candidate(
                    name=name, module=m, backbone=bname,
                    build_spec=_spec_builder(m, int(backbone.num_prefix_tokens))))
            elif type(m) in eva:
                owned.add(id(m))
                problem = NAFLEX_BLOCKS if _is_naflex(backbone) else attention_problem(m, rope_ok=True)
                if problem:
                    result.rejected.append(Rejected(name=name, module=m, reason=problem))
                    continue
                result.candidates.append(Candidate(
                    name=name, module=m, backbone=bname,
                    build_spec=timm_eva.spec_builder(m, int(backbone.num_prefix_tokens))))
    for name, m in model.named_modules():
        if id(m) in owned or not (type(m) is Attention or looks_like_attention(m)):
            continue
        if any(name.startswith(c.name + ".") for c in result.candidates):
            continue
        problem = attention_problem(m)
        if problem is None and type(m) is Attention:
            problem = "it is not inside a ViT backbone with a patch grid (patch_embed + blocks)"
        if problem is None:
            problem = f"{type(m).__module__}.{type(m).__name__} is not an attention class the timm adapter knows"
        result.rejected.append(Rejected(name=name, module=m, reason=problem))
    return result


def forward(model: nn.Module, images: torch.Tensor):
    return model(images)


def pass_grid(model: nn.Module) -> None:
    """Swap each ViT backbone and its blocks to the grid-passing subclasses of
    :mod:`castle_convert.adapters.timm_grid` (in place; idempotent; after a hybrid's layers change too)."""
    from castle_convert.adapters.timm_grid import install
    for _, backbone in _backbones(model):
        install(backbone)


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model expects by default."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        c, h, w = cfg["input_size"]
    else:
        c, (h, w) = 3, (224, 224)
    for _, backbone in _backbones(model):
        pe = _patch_embed(backbone)
        if getattr(pe, "img_size", None) is not None:
            h, w = pe.img_size
        elif getattr(pe, "pos_embed_grid_size", None) is not None:          # NaFlexVit: its position grid
            (gh, gw), (ph, pw) = pe.pos_embed_grid_size, pe.patch_size
            h, w = gh * ph, gw * pw
        proj = getattr(pe, "proj", None)
        if isinstance(proj, nn.Conv2d):
            c = proj.in_channels
        elif isinstance(proj, nn.Linear) and getattr(pe, "patch_size", None):   # NaFlexVit: patches of P·P·C
            c = proj.in_features // (pe.patch_size[0] * pe.patch_size[1])
        break
    return int(c), int(h), int(w)

