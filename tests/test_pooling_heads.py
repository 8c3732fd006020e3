"""Attention-pooling heads (timm ``AttentionPoolLatent``: SigLIP's MAP head, PE's pool) stay softmax: the
backbone converts around them, ``inspect`` lists them, the inference form's only N-wide softmax is theirs."""

from __future__ import annotations

import pytest
import timm
import torch

import castle_convert as cc
from castle_convert.attention import CastlingModule
from families import TINY

CASES = ["vit_base_patch16_siglip_224", "vit_pe_core_tiny_patch16_384"]


@pytest.mark.parametrize("arch", CASES)
@pytest.mark.parametrize("kind", ["linear_angular", "separable"])
def test_backbone_converts_around_the_pooling_head(arch, kind):
    torch.manual_seed(0)
    teacher = timm.create_model(arch, **TINY, num_classes=10).eval()
    assert teacher.attn_pool is not None
    student = cc.convert(teacher, kind=kind)
    assert student.castling_converted == ["blocks.0.attn", "blocks.1.attn"]
    assert not any(isinstance(m, CastlingModule) for m in student.attn_pool.modules())
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert (teacher(x) - student(x)).abs().max() <= 1e-5
        cc.set_schedule(student, gate=0.0, threshold=0.0)
        lin = student(x)
        final = cc.finalize(student, force=True)
        assert (final(x) - lin).abs().max() <= 1e-4
        t, s = teacher.forward_features(x), student.forward_features(x)    # (B, N, C)
        assert not torch.equal(t, s), "gate 0 runs the linear branch (tiny random blocks barely use attention)"


def test_inspect_lists_the_pooling_head():
    torch.manual_seed(0)
    report = cc.inspect(timm.create_model(CASES[1], **TINY, num_classes=10), img_size=(128, 128))
    assert report.error is None and not report.rejected and len(report.converted) == 2
    assert [r["name"] for r in report.left_softmax] == ["attn_pool"]
    assert "attention pooling" in report.left_softmax[0]["reason"]
    assert "left as softmax: 1 attention modules" in report.format()
