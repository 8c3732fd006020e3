"""Vision towers inside dual encoders (CLIPModel, SiglipModel): the tower converts, the text tower and
SigLIP's attention-pooling head stay softmax and inspect lists them; the call's RoPE reaches DINOv3's layers."""

from __future__ import annotations

import pytest
import torch
import transformers

import castle_convert as cc
from castle_convert.attention import CastlingModule, CastlingTrainingForm


def _dual(name: str, **vision):
    torch.manual_seed(0)
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    vis = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=8, **vision)
    cfg_cls = getattr(transformers, f"{name}Config")
    cfg = cfg_cls(text_config=text, vision_config=vis, projection_dim=16) if name == "CLIP" else \
        cfg_cls(text_config=text, vision_config=vis)
    return getattr(transformers, f"{name}Model")(cfg).eval()


@pytest.mark.parametrize("name", ["CLIP", "Siglip"])
@pytest.mark.parametrize("kind", ["linear_angular", "separable"])
def test_dual_encoder_vision_tower_converts_text_stays(name, kind):
    teacher = _dual(name)
    student = cc.convert(teacher, kind=kind)
    converted = student.castling_converted
    assert converted == ["vision_model.encoder.layers.0.self_attn", "vision_model.encoder.layers.1.self_attn"]
    assert not any(isinstance(m, CastlingModule) for m in student.text_model.modules()), "text tower untouched"
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        a = teacher.get_image_features(pixel_values=x, interpolate_pos_encoding=True)
        b = student.get_image_features(pixel_values=x, interpolate_pos_encoding=True)
    for key in ("last_hidden_state", "pooler_output"):
        assert (getattr(a, key) - getattr(b, key)).abs().max() <= 1e-5, key
    cc.set_schedule(student, gate=0.0, threshold=0.0)
    with torch.no_grad():
        lin = student.get_image_features(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
    assert (lin - a.last_hidden_state).abs().max() > 1e-3, "gate 0 runs the linear branch"
    final = cc.finalize(student, force=True)
    with torch.no_grad():
        c = final.get_image_features(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
    assert (c - lin).abs().max() <= 1e-4


def test_inspect_lists_what_stays_softmax():
    report = cc.inspect(_dual("Siglip"), img_size=(128, 128))           # 256 tokens: linear pays off
    assert report.error is None and len(report.converted) == 2 and not report.rejected
    reasons = {r["name"]: r["reason"] for r in report.left_softmax}
    assert set(reasons) == {"text_model", "vision_model.head"}, reasons
    assert "attention pooling" in reasons["vision_model.head"] and "text" in reasons["text_model"]
    text = report.format()
    assert "left as softmax: 2 attention modules" in text and "vision_model.head" in text
    assert report.macs_after < report.macs_before


def test_dinov3_layers_get_the_calls_rope():
    """Without the RoPE the linear branch would differ: check the converted layer uses the call's rotation."""
    torch.manual_seed(0)
    cfg = transformers.DINOv3ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, image_size=32, patch_size=8, num_register_tokens=1)
    student = cc.convert(transformers.DINOv3ViTModel(cfg).eval())
    cc.set_schedule(student, gate=0.0, threshold=0.0)
    seen = []
    form = next(m for m in student.modules() if isinstance(m, CastlingTrainingForm))
    form.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs.get("rope")), with_kwargs=True)
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        out = student(x).last_hidden_state
    assert seen[0] is not None and seen[0].shape == (4 * 5, 2 * 16)            # (M, 2d) = [sin | cos]
    hidden = torch.randn(1, 1 + 1 + 20, 32)
    with torch.no_grad():
        with_rope = form(hidden, grid=(4, 5), rope=seen[0])
        without = form(hidden, grid=(4, 5))
    assert (with_rope - without).abs().max() > 1e-4
    assert (with_rope[:, :2] - without[:, :2]).abs().max() > 0, "prefix tokens see rotated keys"
    assert torch.isfinite(out).all()
