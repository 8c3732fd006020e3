"""Relative position bias (BEiT, vit_relpos_*): convert with the bias dropped? Measured on tiny models.

The linear form cannot add a bias to N×N logits it never forms. Dropping the bias leaves the DW term and
stage 1 to take over its role. This script measures, on tiny random models with the stage-1 test's protocol
(q/k sharpened ×100 so attention is peaked, 40 steps of attention transfer, lr 3e-3, q/k + castling
parameters trained, noise images, held-out batch), each layer's relative stage-1 error before and after,
for: the model's teacher with its bias (N(0, 1) tables: the size of pretrained BEiT biases), the same model
with the bias zeroed in the teacher (what the linear form can reach without it), and plain ViT (test_vit).

    python benchmarks/relpos_stage1.py
"""

from __future__ import annotations

import copy
import json

import timm
import torch
from torch import nn

import castle_convert as cc
from castle_convert.adapters.timm_eva import _qkv
from castle_convert.attention.base import SoftmaxAttentionSpec
from castle_convert.attention.linear_angular import LinearAngularAttention
from castle_convert.config import CastlingConfig
from castle_convert.convert import calibrate
from castle_convert.distill.transfer import attention_transfer

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


class NoBias(nn.Module):
    """The converted attention in place of a relative-position-bias attention: the bias argument is dropped."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x, *args, grid=None, **kwargs):
        return self.attn(x, grid=grid)


def convert_dropping_bias(teacher: nn.Module) -> nn.Module:
    student = copy.deepcopy(teacher)
    n = teacher.patch_embed.num_patches + teacher.num_prefix_tokens
    config = CastlingConfig(ref_tokens=n)
    paths = []
    for i, blk in enumerate(student.blocks):
        a = blk.attn
        spec = SoftmaxAttentionSpec(dim=a.qkv.in_features, num_heads=a.num_heads, head_dim=a.qkv.out_features // 3 // a.num_heads,
                                    scale=float(a.scale), qkv=_qkv(a), proj=a.proj,
                                    num_prefix_tokens=teacher.num_prefix_tokens,
                                    q_norm=getattr(a, "q_norm", nn.Identity()), k_norm=getattr(a, "k_norm", nn.Identity()),
                                    out_norm=nn.Identity())
        blk.attn = NoBias(LinearAngularAttention.from_pretrained_attention(spec, config))
        paths.append(f"blocks.{i}.attn")
    student.castling_config, student.castling_converted = config, paths
    calibrate(student)                        # γ from the (bias-free) softmax branch, as convert does
    return student


def sharpen(model: nn.Module, factor: float = 100.0) -> nn.Module:
    with torch.no_grad():
        for blk in model.blocks:
            w = blk.attn.qkv.weight
            C = w.shape[0] // 3
            w[:2 * C] *= factor ** 0.5
            if getattr(blk.attn, "q_bias", None) is not None:
                blk.attn.q_bias *= factor ** 0.5
    return model


def set_bias(model: nn.Module, std: float) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, std) if std else p.zero_()
            elif ".rel_pos." in name:                 # vit_relpos: the MLP producing the bias
                if std:
                    p.normal_(0, std)
                else:
                    p.zero_()


def stage1(teacher: nn.Module, student: nn.Module) -> dict:
    images = lambda s: torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(s))  # noqa: E731
    r = attention_transfer(teacher, student, [images(s) for s in range(8)], steps=40, lr=3e-3, train="qk",
                           eval_batches=[images(99)], progress=False)
    return {k: [round(r.errors_before[k], 3), round(v, 3)] for k, v in r.errors.items()}


def main() -> None:
    out = {}
    for arch in ("beit_base_patch16_224", "vit_relpos_base_patch16_224"):
        for label, std in (("bias N(0,1)", 1.0), ("bias zeroed", 0.0)):
            torch.manual_seed(0)
            teacher = timm.create_model(arch, **TINY).eval()
            set_bias(teacher, std)
            sharpen(teacher)
            out[f"{arch} / {label}"] = stage1(teacher, convert_dropping_bias(teacher))
    torch.manual_seed(0)
    vit = sharpen(timm.create_model("test_vit", **TINY).eval())
    out["test_vit (reference)"] = stage1(vit, cc.convert(vit))
    for k, v in out.items():
        print(f"{k:45s} " + "  ".join(f"{p}: {b:.3f} -> {a:.3f}" for p, (b, a) in v.items()))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
