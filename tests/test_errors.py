"""Bad input gets a clear error, raised before anything is modified."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import castle_convert as cc
from castle_convert.attention import CastlingModule
from castle_convert.models import ModelLoadError, load_model
from families import FAMILIES

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before, classes):
    assert not any(isinstance(m, CastlingModule) for m in model.modules())
    assert [type(m) for m in model.modules()] == classes
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_model_without_attention_names_model_and_supported_classes():
    model = timm.create_model("test_resnet")
    with pytest.raises(cc.ConversionError, match=r"ResNet.*no supported attention.*timm\.layers\.attention\.Attention"):
        cc.convert(model)


@pytest.mark.parametrize("name, kwargs, what", [
    ("test_vit_relpos", {}, "relative position bias"),
    ("vit_5b_patch16_sapiens2", dict(TINY, num_heads=4, num_kv_heads=[2]), "grouped-query attention"),
    ("cait_xxs24_224", TINY, "talking-heads"),
    ("beit_base_patch16_224", TINY, "relative position bias"),
])
@pytest.mark.parametrize("inplace", [False, True])
def test_unsupported_variant_names_module_and_modifies_nothing(name, kwargs, what, inplace):
    model = timm.create_model(name, **kwargs)
    before, classes = _state(model), [type(m) for m in model.modules()]
    with pytest.raises(cc.ConversionError, match=r"blocks\.0\.attn") as err:
        cc.convert(model, inplace=inplace)
    assert what in str(err.value) and "Nothing was modified" in str(err.value)
    _assert_untouched(model, before, classes)


def test_hf_unsupported_model_type():
    from transformers import SwinConfig, SwinModel
    model = SwinModel(SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1], num_heads=[2],
                                 window_size=4))
    with pytest.raises(cc.ConversionError, match="relative position bias"):
        cc.convert(model)


def test_already_converted_and_finalize_misuse():
    family = FAMILIES[0]
    student = cc.convert(family.build())
    with pytest.raises(cc.ConversionError, match="already converted"):
        cc.convert(student)
    final = cc.finalize(student, force=True)
    with pytest.raises(cc.ConversionError, match="already converted"):
        cc.convert(final)
    with pytest.raises(cc.ConversionError, match="already finalized"):
        cc.finalize(final)
    with pytest.raises(cc.ConversionError, match="call convert"):
        cc.finalize(family.build())


def test_failed_parity_raises_and_keeps_model(monkeypatch):
    from castle_convert.attention import LinearAngularAttention
    student = cc.convert(FAMILIES[0].build())
    original = LinearAngularAttention.to_inference

    def broken(self):
        inf = original(self)
        inf.eps = 0.5                                           # a wrong normalisation
        return inf

    monkeypatch.setattr(LinearAngularAttention, "to_inference", broken)
    with pytest.raises(cc.FinalizeError, match="parity"):
        cc.finalize(student, inplace=True, force=True)
    assert all(type(b.attn) is LinearAngularAttention for b in student.blocks), "inplace swap was undone"


def test_filter_fn_converts_only_selected_modules():
    model = FAMILIES[0].build()
    student = cc.convert(model, filter_fn=lambda name, m: name.startswith("blocks.0."))
    assert isinstance(student.blocks[0].attn, CastlingModule)
    assert not isinstance(student.blocks[1].attn, CastlingModule)


@pytest.mark.parametrize("field, value, words", [
    ("combine", "avg", "blend"), ("dw", "3d", "2d"), ("dw_kernel", 4, "odd"), ("gate", 2.0, "[0, 1]"),
    ("kind", "performer", "linear_angular"), ("threshold", -1, ">= 0"),
])
def test_config_errors_name_field_value_and_fix(field, value, words):
    with pytest.raises(cc.ConfigError, match=field) as err:
        cc.CastlingConfig(**{field: value})
    assert repr(value) in str(err.value) and words in str(err.value)


def test_config_unknown_key_lists_valid_keys():
    with pytest.raises(cc.ConfigError, match="dw_kernal") as err:
        cc.CastlingConfig.from_dict({"dw_kernal": 3})
    assert "dw_kernel" in str(err.value)


def test_unknown_model_name_lists_close_matches():
    with pytest.raises(ModelLoadError, match="deit_small"):
        load_model("deit_smal", pretrained=False)


def test_checkpoint_without_arch_and_missing_path(tmp_path):
    ckpt = tmp_path / "model.pth"
    torch.save(nn.Linear(2, 2).state_dict(), ckpt)
    with pytest.raises(ModelLoadError, match="--arch"):
        load_model(str(ckpt))
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(str(tmp_path / "missing.safetensors"))


def test_attention_masks_are_refused():
    final = cc.finalize(cc.convert(FAMILIES[0].build()), force=True)
    x = torch.randn(1, 17, 64)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        final.blocks[0].attn(x, attn_mask=torch.zeros(17, 17))
