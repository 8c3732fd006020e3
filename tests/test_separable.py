"""The separable kind (MobileViTv2 separable self-attention): math, initialisation, config, costs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import castle_convert as cc
from castle_convert.attention import (SeparableAttention, SeparableAttentionInference,
                                      SoftmaxAttentionSpec)
from castle_convert.recipes import RecipeError, load_recipe
from families import FAMILIES

DIM, HEADS, PREFIX, GRID = 16, 2, 1, (3, 4)
HD = DIM // HEADS


def _spec(k_norm: bool = False, bias: bool = True) -> SoftmaxAttentionSpec:
    torch.manual_seed(0)
    norm = (lambda: nn.LayerNorm(HD)) if k_norm else nn.Identity
    spec = SoftmaxAttentionSpec(
        dim=DIM, num_heads=HEADS, head_dim=HD, scale=HD ** -0.5,
        qkv=nn.Linear(DIM, 3 * DIM, bias=bias), proj=nn.Linear(DIM, DIM), num_prefix_tokens=PREFIX,
        q_norm=norm(), k_norm=norm(), out_norm=nn.Identity())
    if k_norm:
        with torch.no_grad():
            for m in (spec.q_norm, spec.k_norm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return spec


def _module(k_norm: bool = False, perturb: bool = True, **cfg) -> SeparableAttention:
    m = SeparableAttention(_spec(k_norm), cc.CastlingConfig(kind="separable", **cfg)).eval()
    if perturb:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in (m.context_query, m.context_gain, m.relu_gain):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
            m.dw.conv.weight.normal_(generator=g)
    return m


def _x(batch=2):
    return torch.randn(batch, PREFIX + GRID[0] * GRID[1], DIM, generator=torch.Generator().manual_seed(1))


def _heads(m, x):
    B, N, _ = x.shape
    q, k, v = m.qkv(x).reshape(B, N, 3, HEADS, HD).permute(2, 0, 3, 1, 4)
    return m.q_norm(q), m.k_norm(k), v                                       # (B, h, N, d)


def _merge(t):
    B, h, N, d = t.shape
    return t.transpose(1, 2).reshape(B, N, h * d)


def _naive_sep(m, x):
    """c ⊙ (a + b ⊙ ReLU(v_i)) + DW, c = Σ_j softmax_j(scale·u·k_j) v_j, written out token by token."""
    q, k, v = _heads(m, x)
    u = m.context_query.view(HEADS, 1, HD)
    a, b = m.context_gain.view(HEADS, 1, HD), m.relu_gain.view(HEADS, 1, HD)
    s = torch.einsum("bhnd,hod->bhn", k, u * m.scale).softmax(-1)            # (B, h, N)
    c = torch.einsum("bhn,bhnd->bhd", s, v).unsqueeze(2)                     # (B, h, 1, d)
    out = _merge(c * (a + b * v.relu()))
    B, N, _ = x.shape
    vt = _merge(v)
    grid = vt[:, PREFIX:].transpose(1, 2).reshape(B, DIM, *GRID)
    dw = F.conv2d(grid, m.dw.conv.weight, padding=1, groups=DIM).flatten(2).transpose(1, 2)
    return out + torch.cat([torch.zeros(B, PREFIX, DIM), dw], 1)


def _softmax_out(m, x, threshold=0.0):
    q, k, v = _heads(m, x)
    p = (q @ k.transpose(-2, -1) * m.scale).softmax(-1)                      # (B, h, N, N)
    p = p * (p >= threshold / x.shape[1])
    return _merge(p @ v)


# -- the math ------------------------------------------------------------------------------------

@pytest.mark.parametrize("k_norm", [False, True], ids=["folded", "k_norm"])
def test_training_form_at_gate_0_and_inference_form_match_the_formula(k_norm):
    m = _module(k_norm)
    m.set_schedule(0.0, 0.0)
    x = _x()
    expected = m.proj(_naive_sep(m, x))
    inf = m.to_inference()
    assert isinstance(inf, SeparableAttentionInference)
    assert (inf.context_query is None) == (not k_norm), "context projection folded iff no k_norm"
    with torch.no_grad():
        torch.testing.assert_close(m(x, grid=GRID), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(inf(x, grid=GRID), expected, atol=1e-5, rtol=1e-5)
    assert inf.in_proj.out_features == DIM + (HEADS if not k_norm else DIM)   # query rows dropped


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_blend_is_gated_masked_softmax(threshold):
    m = _module(threshold=threshold)
    x = _x()
    aux = _softmax_out(m, x, threshold)
    for g in (1.0, 0.25):
        m.set_schedule(g, threshold)
        with torch.no_grad():
            got = m(x, grid=GRID)
        torch.testing.assert_close(got, m.proj(g * aux + (1 - g) * _naive_sep(m, x)), atol=1e-5, rtol=1e-5)
    assert (float(m.last_mask_density) < 1.0) == (threshold > 0)


def test_local_transfer_loss_is_mse_to_exact_softmax():
    m = _module()
    m.set_schedule(0.5, 1.0)
    m.compute_transfer = True
    x = _x()
    m(x, grid=GRID)
    torch.testing.assert_close(m.last_transfer_loss, F.mse_loss(_naive_sep(m, x), _softmax_out(m, x)),
                               atol=1e-6, rtol=1e-5)
    m.last_transfer_loss.backward()
    for p in (m.context_query, m.context_gain, m.relu_gain, m.dw.conv.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_half_precision_high_token_count_is_finite():
    m = _module()
    x = torch.randn(1, PREFIX + 64 * 64, DIM) * 50
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.to_inference()(x, grid=(64, 64))
    assert torch.isfinite(out).all()


# -- initialisation ------------------------------------------------------------------------------

def _teacher_layer0(teacher, x):
    with torch.no_grad():
        h = teacher.norm_pre(teacher._pos_embed(teacher.patch_embed(x)))
        return teacher.blocks[0].norm1(h)                                    # input of blocks[0].attn


def test_init_context_query_is_the_calibration_mean_query():
    family = FAMILIES[0]
    teacher = family.build()
    x = torch.randn(4, 3, family.size, family.size)
    student = cc.convert(teacher, kind="separable", calibration_inputs=x)
    attn = student.blocks[0].attn
    t_attn = teacher.blocks[0].attn
    with torch.no_grad():
        tokens = _teacher_layer0(teacher, x)
        B, N, _ = tokens.shape
        q, k, v = t_attn.qkv(tokens).reshape(B, N, 3, t_attn.num_heads, t_attn.head_dim).permute(2, 0, 3, 1, 4)
        q_mean = q.mean(dim=(0, 2))                                          # (h, d)
        torch.testing.assert_close(attn.context_query.view_as(q_mean), q_mean, atol=1e-5, rtol=1e-4)
        assert torch.equal(attn.context_gain, torch.ones_like(attn.context_gain))
        assert torch.equal(attn.relu_gain, torch.zeros_like(attn.relu_gain))
        # At init the separable branch *is* the teacher's softmax attention of the mean query,
        # the same context vector for every token.
        scores = (k @ q_mean.unsqueeze(-1) * t_attn.scale).squeeze(-1)       # (B, h, N)
        mean_query_attention = scores.softmax(-1).unsqueeze(-2) @ v          # (B, h, 1, d)
        cc.set_schedule(student, 0.0, 0.0)                                   # separable branch only
        expected = t_attn.proj(_merge(mean_query_attention.expand(-1, -1, N, -1)))
        torch.testing.assert_close(attn(tokens), expected, atol=1e-5, rtol=1e-5)
    uncalibrated = cc.convert(teacher, kind="separable", gamma_init="one").blocks[0].attn
    C = t_attn.num_heads * t_attn.head_dim
    torch.testing.assert_close(uncalibrated.context_query.detach(), t_attn.qkv.bias[:C].detach())


def test_init_without_query_bias_is_uniform_context():
    m = SeparableAttention(_spec(bias=False), cc.CastlingConfig(kind="separable"))
    assert torch.equal(m.context_query, torch.zeros(DIM))


def test_new_parameters_are_shared_and_pretrained_modules_reused():
    spec = _spec(k_norm=True)
    m = SeparableAttention(spec, cc.CastlingConfig(kind="separable"))
    assert m.qkv is spec.qkv and m.proj is spec.proj and m.k_norm is spec.k_norm and m.q_norm is spec.q_norm
    inf = m.to_inference()
    assert inf.proj is m.proj and inf.k_norm is m.k_norm and inf.context_query is m.context_query
    assert all(p.ndim == 1 for p in (m.context_query, m.context_gain, m.relu_gain)), "no weight decay"


# -- configuration -------------------------------------------------------------------------------

def test_combine_sum_is_rejected_for_separable():
    with pytest.raises(cc.ConfigError, match="combine") as err:
        cc.CastlingConfig(kind="separable", combine="sum")
    assert "'sum'" in str(err.value) and "separable" in str(err.value) and "blend" in str(err.value)
    with pytest.raises(RecipeError, match="combine='blend'"):
        load_recipe("toy", ["castling.kind=separable", "castling.combine=sum"])
    model = FAMILIES[0].build()
    with pytest.raises(cc.ConfigError, match="combine"):
        cc.convert(model, kind="separable", combine="sum", inplace=True)
    assert not any(isinstance(m, SeparableAttention) for m in model.modules())


def test_kind_is_selectable_everywhere():
    model = FAMILIES[0].build()
    for student in (cc.convert(model, kind="separable"), cc.convert(model, attention="separable"),
                    cc.convert(model, {"kind": "separable"})):
        assert isinstance(student.blocks[0].attn, SeparableAttention)
        assert student.castling_config.kind == "separable"
    assert load_recipe("toy", ["castling.kind=separable"]).castling.to_config().kind == "separable"
    with pytest.raises(TypeError, match="disagree"):
        cc.convert(model, kind="linear_angular", attention="separable")


@pytest.mark.parametrize("cfg", [dict(dw="1d", dw_kernel=9), dict(dw="none")])
def test_dw_options_convert_and_finalize(cfg):
    family = FAMILIES[0]
    teacher = family.build()
    student = cc.convert(teacher, kind="separable", **cfg)
    x = torch.randn(2, 3, family.size, family.size)
    with torch.no_grad():
        torch.testing.assert_close(student(x), teacher(x), atol=1e-5, rtol=1e-5)
    cc.set_schedule(student, 0.5, 1.0)
    student.train()
    student(x).pow(2).mean().backward()
    assert all(p.grad is not None for p in student.blocks[0].attn.parameters())
    assert cc.finalize(student, force=True).castling_parity <= 1e-4


# -- costs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("k_norm", [False, True], ids=["folded", "k_norm"])
def test_inference_macs_are_linear_in_tokens(k_norm):
    inf = _module(k_norm).to_inference()
    B, C, h, d = 2, DIM, HEADS, HD
    N = PREFIX + GRID[0] * GRID[1]
    scores = N * C if k_norm else 0                                          # ⟨u, k_j⟩ when not folded
    expected = B * (N * DIM * inf.in_proj.out_features      # [values | logits or keys]
                    + scores + h * N * d                    # context logits, Σ_j s_j v_j
                    + GRID[0] * GRID[1] * C * 9             # 3×3 depthwise conv
                    + N * C * DIM)                          # output projection
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        inf(_x(B), grid=GRID)
    assert counter.get_total_flops() // 2 == expected


def test_inspect_reports_both_kinds():
    model = FAMILIES[0].build()
    la = cc.inspect(model, img_size=(64, 64))
    sep = cc.inspect(model, img_size=(64, 64), kind="separable")
    assert la.macs_before == sep.macs_before and not sep.error
    assert sep.macs_after < la.macs_after < la.macs_before
    assert sep.params_after < sep.params_before, "the query (and key) rows of qkv are dropped"


def test_gate_0_keeps_q_norm_in_the_graph():
    """At g = 0 the separable branch reads no queries; q_norm must still get a (zero) gradient,
    or DistributedDataParallel fails on an unused parameter."""
    family = next(f for f in FAMILIES if f.id == "timm-qknorm")
    student = cc.convert(family.build().train(), kind="separable")
    cc.set_schedule(student, 0.0, 0.0)
    student.forward_features(torch.randn(2, 3, family.size, family.size)).pow(2).mean().backward()
    q_norm = student.blocks[0].attn.q_norm
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in q_norm.parameters())
    assert all(p.grad is not None for p in student.blocks[0].attn.parameters())
