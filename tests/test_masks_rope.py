"""The attention kinds' RoPE and key-padding masks, at the attention level (DESIGN.md §2 "RoPE, masks").

RoPE: :func:`apply_rope` is timm's / transformers' rotation and keeps norms. Masks: a padded batch of
differently sized images (``token_mask`` (B, N), ``grid_sizes`` (B, 2)) gives each image the output it gets
alone, in the training form (linear branch, softmax branch, masked softmax) and the inference form, both kinds.
"""

from __future__ import annotations

import pytest
import timm
import torch

import castle_convert as cc
from castle_convert.attention import CastlingModule
from castle_convert.attention.functional import apply_rope
from families import TINY


@pytest.mark.parametrize("half", [False, True])
def test_apply_rope_is_timms_rotation_and_keeps_norms(half):
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 1 + 6, 8, generator=g)                  # (B, h, N, d), one prefix token
    angle = torch.randn(6, 8, generator=g)
    rope = torch.cat([angle.sin(), angle.cos()], -1)               # (M, 2d) [sin | cos]
    got = apply_rope(x, rope, half, 1)
    assert torch.equal(got[:, :, :1], x[:, :, :1]), "prefix tokens are not rotated"
    assert torch.allclose(got[:, :, 1:], apply_rot_embed_cat(x[:, :, 1:], rope, half=half), atol=1e-6)
    if half:                                                       # transformers' DINOv3 formula
        from transformers.models.dinov3_vit.modeling_dinov3_vit import rotate_half
        cos, sin = rope[:, 8:], rope[:, :8]
        assert torch.allclose(got[:, :, 1:], x[:, :, 1:] * cos + rotate_half(x[:, :, 1:]) * sin, atol=1e-6)
    # a true rotation (one angle per rotated pair: interleaved pairs, or the two halves) keeps norms
    pair = angle[:, :4].repeat(1, 2) if half else angle[:, ::2].repeat_interleave(2, -1)   # (M, d)
    rotated = apply_rope(x, torch.cat([pair.sin(), pair.cos()], -1), half, 1)
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def _attention(kind: str, form: str):
    torch.manual_seed(0)
    model = cc.convert(timm.create_model("test_vit", **TINY, num_classes=10).eval(), kind=kind)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".dw." in name or name.endswith(("gamma", "relu_gain")):
                p.add_(torch.randn(p.shape) * 0.3)
    if form == "inference":
        model = cc.finalize(model, force=True)
    attn = model.blocks[0].attn
    assert isinstance(attn, CastlingModule)
    return attn.eval()


CASES = [("linear_angular", "training", 0.0, 0.0), ("linear_angular", "training", 1.0, 0.0),
         ("linear_angular", "training", 0.5, 1.0), ("linear_angular", "inference", 0.0, 0.0),
         ("separable", "training", 0.0, 0.0), ("separable", "training", 0.5, 1.0), ("separable", "inference", 0.0, 0.0)]


@pytest.mark.parametrize("kind, form, gate, threshold", CASES)
def test_padded_batch_gives_each_image_its_own_output(kind, form, gate, threshold):
    attn = _attention(kind, form)
    if form == "training":
        attn.set_schedule(gate, threshold)
    g = torch.Generator().manual_seed(1)
    grids = [(2, 3), (3, 3)]
    alone = [torch.randn(1, 1 + r * c, 32, generator=g) for r, c in grids]          # (1, N_i, C) each
    N = max(a.shape[1] for a in alone)
    x = torch.cat([torch.cat([a, torch.randn(1, N - a.shape[1], 32, generator=g)], 1) for a in alone])  # junk pad
    mask = torch.tensor([[i < a.shape[1] for i in range(N)] for a in alone])         # (B, N)
    sizes = torch.tensor(grids)                                                       # (B, 2)
    with torch.no_grad():
        out = attn(x, token_mask=mask, grid_sizes=sizes)                              # (B, N, C)
        unmasked = attn(x, grid_sizes=sizes) if form == "inference" or gate < 1.0 else None   # the junk mixes in
        for b, (a, grid) in enumerate(zip(alone, grids)):
            ref = attn(a, grid=grid)[0]                                               # (N_b, C)
            assert (out[b, :a.shape[1]] - ref).abs().max() <= 1e-5, (b, (out[b, :a.shape[1]] - ref).abs().max())
        if unmasked is not None:
            n0 = alone[0].shape[1]
            assert (unmasked[0, :n0] - out[0, :n0]).abs().max() > 1e-3, "without the mask the padding leaks in"


def test_masks_other_than_key_padding_are_an_error():
    attn = _attention("linear_angular", "inference")
    x = torch.randn(1, 5, 32)
    with pytest.raises(Exception, match="mask"):
        attn(x, attn_mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(Exception, match="causal"):
        attn(x, is_causal=True)
