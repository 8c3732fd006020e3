"""The attention math, checked against naive N×N reference implementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import castle_convert as cc
from castle_convert.attention import LinearAngularAttention, SoftmaxAttentionSpec
from castle_convert.attention.dwconv import PatchGridDWConv
from castle_convert.attention.functional import patch_grid, resolve_grid
from families import FAMILIES

DIM, HEADS, PREFIX, GRID = 16, 2, 1, (3, 4)


def _spec() -> SoftmaxAttentionSpec:
    torch.manual_seed(0)
    return SoftmaxAttentionSpec(
        dim=DIM, num_heads=HEADS, head_dim=DIM // HEADS, scale=(DIM // HEADS) ** -0.5,
        qkv=nn.Linear(DIM, 3 * DIM), proj=nn.Linear(DIM, DIM), num_prefix_tokens=PREFIX,
        q_norm=nn.Identity(), k_norm=nn.Identity(), out_norm=nn.Identity())


def _module(**cfg) -> LinearAngularAttention:
    m = LinearAngularAttention(_spec(), cc.CastlingConfig(**cfg)).eval()
    with torch.no_grad():
        m.gamma.copy_(torch.tensor([0.7, 1.3]))
        m.dw.conv.weight.normal_()
    return m


def _heads(m, x):
    B, N, _ = x.shape
    q, k, v = m.qkv(x).reshape(B, N, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
    return q, k, v                                                           # (B, h, N, d)


def _naive_lin(m, x):
    """γ·normalize(½V + (1/π)·(Q̂K̂ᵀ)V) + DW, with the N×N matrix formed explicitly."""
    q, k, v = _heads(m, x)
    sim = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)  # (B, h, N, N)
    la = 0.5 * v + sim @ v / math.pi
    out = m.gamma.view(1, -1, 1, 1) * F.normalize(la, dim=-1)
    B, N, _ = x.shape
    out = out.transpose(1, 2).reshape(B, N, DIM)
    vt = v.transpose(1, 2).reshape(B, N, DIM)
    grid = vt[:, PREFIX:].transpose(1, 2).reshape(B, DIM, *GRID)
    dw = F.conv2d(grid, m.dw.conv.weight, padding=1, groups=DIM).flatten(2).transpose(1, 2)
    out = out + torch.cat([torch.zeros(B, PREFIX, DIM), dw], 1)
    return out


def _x(batch=2):
    return torch.randn(batch, PREFIX + GRID[0] * GRID[1], DIM, generator=torch.Generator().manual_seed(1))


def test_inference_form_matches_naive_formula():
    m = _module()
    x = _x()
    expected = m.proj(_naive_lin(m, x))
    with torch.no_grad():
        got = m.to_inference()(x, grid=GRID)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_blend_is_gated_masked_softmax(threshold):
    m = _module(threshold=threshold)
    x = _x()
    q, k, v = _heads(m, x)
    N = x.shape[1]
    p = (q @ k.transpose(-2, -1) * m.scale).softmax(-1)                       # (B, h, N, N)
    p = p * (p >= threshold / N)
    aux = (p @ v).transpose(1, 2).reshape(x.shape[0], N, DIM)
    for g in (1.0, 0.25):
        m.set_schedule(g, threshold)
        with torch.no_grad():
            got = m(x, grid=GRID)
        expected = m.proj(g * aux + (1 - g) * _naive_lin(m, x))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (float(m.last_mask_density) < 1.0) == (threshold > 0)


def test_sum_combine_matches_reference_style():
    m = _module(combine="sum", gate=0.5)
    x = _x()
    q, k, v = _heads(m, x)
    aux = (q @ k.transpose(-2, -1) * m.scale).softmax(-1) @ v
    sim = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    la = 0.5 * v + sim @ v / math.pi + 0.5 * aux
    out = m.gamma.view(1, -1, 1, 1) * F.normalize(la, dim=-1)
    B, N, _ = x.shape
    lin_dw = _naive_lin(m, x) - (m.gamma.view(1, -1, 1, 1) * F.normalize(
        0.5 * v + sim @ v / math.pi, dim=-1)).transpose(1, 2).reshape(B, N, DIM)
    expected = m.proj(out.transpose(1, 2).reshape(B, N, DIM) + lin_dw)
    with torch.no_grad():
        torch.testing.assert_close(m(x, grid=GRID), expected, atol=1e-5, rtol=1e-5)


def test_patch_grid_dwconv_uses_the_grid_of_the_call():
    conv = PatchGridDWConv(4, 3, num_prefix_tokens=2)
    with torch.no_grad():
        conv.conv.weight.normal_()
    grid = patch_grid(16, 48, (8, 8))                                        # 2 × 6 grid
    assert grid == (2, 6)
    v = torch.randn(3, 2 + 12, 4)
    out = conv(v, grid)
    ref = F.conv2d(v[:, 2:].transpose(1, 2).reshape(3, 4, 2, 6), conv.conv.weight, padding=1, groups=4)
    torch.testing.assert_close(out[:, 2:], ref.flatten(2).transpose(1, 2))
    assert out[:, :2].abs().max() == 0                                       # prefix tokens: no DW term


def test_grid_falls_back_to_square_and_rejects_impossible_counts():
    assert resolve_grid(16, None) == (4, 4)
    assert resolve_grid(12, (2, 6)) == (2, 6)
    with pytest.raises(ValueError, match="cannot place 12 patch tokens"):
        resolve_grid(12, None)
    with pytest.raises(AssertionError, match="does not match the number of patch tokens"):
        resolve_grid(12, (3, 3))


@pytest.mark.parametrize("cfg", [dict(dw="1d", dw_kernel=9), dict(dw="none"), dict(combine="sum")])
def test_options_convert_and_finalize(cfg):
    family = FAMILIES[0]
    teacher = family.build()
    student = cc.convert(teacher, **cfg)
    x = torch.randn(2, 3, family.size, family.size)
    if cfg.get("combine") != "sum":                                          # blend starts at the teacher
        with torch.no_grad():
            torch.testing.assert_close(student(x), teacher(x), atol=1e-5, rtol=1e-5)
    cc.set_schedule(student, 0.5, 1.0)
    student.train()
    student(x).pow(2).mean().backward()
    assert all(p.grad is not None for p in student.parameters())
    assert cc.finalize(student, force=True).castling_parity <= 1e-4


def test_gamma_calibrated_from_teacher_output_norm():
    family = FAMILIES[0]
    teacher = family.build()
    x = torch.randn(4, 3, family.size, family.size)
    student = cc.convert(teacher, calibration_inputs=x)
    attn = student.blocks[0].attn
    with torch.no_grad():                                                   # teacher's layer-0 attention
        h = teacher.norm_pre(teacher._pos_embed(teacher.patch_embed(x)))
        q, k, v = _qkv_heads(teacher.blocks[0].attn, teacher.blocks[0].norm1(h))
        norms = F.scaled_dot_product_attention(q, k, v).norm(dim=-1).mean(dim=(0, 2))
    torch.testing.assert_close(attn.gamma.detach(), norms, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(cc.convert(teacher, gamma_init="one").blocks[0].attn.gamma,
                              attn.gamma.detach())


def _qkv_heads(attn, x):
    B, N, _ = x.shape
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return attn.q_norm(q), attn.k_norm(k), v


def test_half_precision_high_token_count_is_finite():
    """K̂ᵀV over thousands of tokens with large values stays inside fp16/bf16 range."""
    m = _module()
    x = torch.randn(1, PREFIX + 64 * 64, DIM) * 50
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.to_inference()(x, grid=(64, 64))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("gate, threshold", [(0.0, 0.0), (0.5, 1.0)])
def test_local_transfer_loss_is_mse_to_exact_softmax(gate, threshold):
    m = _module()
    m.set_schedule(gate, threshold)
    m.compute_transfer = True
    x = _x()
    q, k, v = _heads(m, x)
    B, N, _ = x.shape
    softmax_out = ((q @ k.transpose(-2, -1) * m.scale).softmax(-1) @ v).transpose(1, 2).reshape(B, N, DIM)
    m(x, grid=GRID)
    expected = F.mse_loss(_naive_lin(m, x), softmax_out)
    torch.testing.assert_close(m.last_transfer_loss, expected, atol=1e-6, rtol=1e-5)
    m.last_transfer_loss.backward()
    assert m.gamma.grad is not None and m.dw.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("with_dw", [True, False])
def test_fused_inference_kernel_equals_the_reference_math(with_dw):
    """linear_angular_fused (inference form) == merge(γ·angular_linear) + DW, on strided qkv views,
    batch > 1, and with all-zero tokens (the eps clamps must agree)."""
    from castle_convert.attention.functional import angular_linear, linear_angular_fused, merge_heads
    torch.manual_seed(0)
    B, N, h, d = 3, 37, 4, 8
    qkv = torch.randn(B, N, 3 * h * d).view(B, N, 3, h, d)
    qkv[:, 5] = 0.0                                            # a token with q = k = v = 0
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)             # (B, h, N, d) strided views
    gamma = torch.rand(h) + 0.5
    dw = torch.randn(B, N, h * d) if with_dw else None
    ref = merge_heads(gamma.view(1, h, 1, 1) * angular_linear(q, k, v, 1e-6))
    if dw is not None:
        ref = ref + dw
    out = linear_angular_fused(q, k, v, gamma, 1e-6, dw)
    assert out.shape == (B, N, h * d)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for dt in (torch.bfloat16, torch.float16):                 # 1/√N rescaling keeps K̂ᵀV in range
        big = (v * 300).to(dt)
        low = linear_angular_fused(q.to(dt), k.to(dt), big, gamma.to(dt), 1e-6,
                                   None if dw is None else dw.to(dt))
        assert torch.isfinite(low).all()
        ref_big = merge_heads(gamma.view(1, h, 1, 1) * angular_linear(q, k, v * 300, 1e-6))
        ref_big = ref_big if dw is None else ref_big + dw
        torch.testing.assert_close(low.float(), ref_big, atol=0.05, rtol=0.05)
