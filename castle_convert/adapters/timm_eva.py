"""timm's Eva attention family: ``eva02_*``, ``vit_*_rope_*``, ``vit_*_dinov3``, ``vit_pe_*`` and friends —
``timm.models.eva.EvaAttention`` and ``timm.layers.attention.AttentionRope`` inside an ``Eva`` backbone.

Both compute q, k, v (one fused ``qkv`` or separate ``q_proj``/``k_proj``/``v_proj``; EvaAttention's fused
form keeps its biases apart, ``q_bias``, a zero ``k_bias`` buffer, ``v_bias``), q_norm/k_norm, then rotate
the patch tokens' q and k by the call's RoPE (``rope``: ``[sin | cos]``, (M, 2d), or (heads, M, 2d) for
mixed RoPE, which the model indexes per block), interleaved pairs or halves (``rotate_half``). The spec
carries the same pieces; the converted attention rotates q, k exactly so before its angular kernel
(rotations keep norms: K̂ᵀV stays one d×d sum) and before its softmax branch (gate 1 = the teacher).

EvaAttention's fixed zero ``k_bias`` becomes the middle third of the fused projection's bias: zero at the
start (the teacher exactly), trainable afterwards — softmax ignores a key bias, the angular kernel does not.

Grouped-query ``AttentionRope`` (fewer key/value heads) is refused by the shared variant check.
The RoPE reaches the converted attention the way timm passes it (``blk(x, rope=...)`` →
``attn(x, rope=...)``); the patch grid through :mod:`castle_convert.adapters.timm_grid`'s Eva classes.
"""

from __future__ import annotations

import torch
from torch import nn

from castle_convert.adapters import fused_linear
from castle_convert.attention.base import SoftmaxAttentionSpec

SUPPORTED = ["timm EvaAttention / AttentionRope with RoPE (eva02_*, vit_*_rope_*, vit_*_dinov3, vit_pe_*)"]


def attention_classes() -> tuple[type, ...]:
    from timm.layers.attention import AttentionRope
    from timm.models.eva import EvaAttention
    return (EvaAttention, AttentionRope)


def _qkv(attn: nn.Module) -> nn.Linear:
    """One Linear computing [q | k | v] exactly as the source attention does (its biases folded in)."""
    if getattr(attn, "qkv", None) is None:
        return fused_linear([attn.q_proj, attn.k_proj, attn.v_proj])
    if getattr(attn, "q_bias", None) is None:
        return attn.qkv
    w = attn.qkv.weight
    fused = nn.Linear(w.shape[1], w.shape[0], bias=True, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(w.detach())
        fused.bias.copy_(torch.cat([attn.q_bias.detach(), attn.k_bias.detach(), attn.v_bias.detach()]))
    fused.weight.requires_grad_(w.requires_grad)
    return fused


def spec_builder(attn: nn.Module, num_prefix_tokens: int):
    def build() -> SoftmaxAttentionSpec:
        return SoftmaxAttentionSpec(
            dim=(attn.qkv if getattr(attn, "qkv", None) is not None else attn.q_proj).in_features,
            num_heads=attn.num_heads, head_dim=attn.head_dim, scale=float(attn.scale), qkv=_qkv(attn),
            proj=attn.proj, num_prefix_tokens=int(getattr(attn, "num_prefix_tokens", num_prefix_tokens)),
            q_norm=attn.q_norm, k_norm=attn.k_norm, out_norm=attn.norm, out_gate=getattr(attn, "gate", None),
            rope_half=bool(getattr(attn, "rotate_half", False)),
            attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p)
    return build
