"""`castle-convert export-onnx`: dynamic batch, onnxruntime parity, non-zero exit above tolerance."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import castle_convert as cc
from castle_convert.cli import main
from conftest import TINY_PATTERN
from families import FAMILIES

BY_ID = {f.id: f for f in FAMILIES}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for fid in CASES:
        base, _, kind = fid.partition(":")
        torch.manual_seed(0)
        keep = [1] if kind == "hybrid" else None               # a hybrid: the second layer stays softmax
        kind = "linear_angular" if kind in ("", "hybrid") else kind
        pattern = TINY_PATTERN if kind == "local_global" else {}      # explicit: built before the autouse fixture
        model = cc.finalize(cc.convert(BY_ID[base].build(), kind=kind, keep_softmax=keep, **pattern), force=True)
        out[fid] = cc.save_pretrained(model, root / fid.replace(":", "-"), verify=False)
    return out


CASES = ["timm-deit-distilled", "hf-dinov2-registers", "timm-qknorm:separable", "hf-vit:separable", "hf-dinov3",
         "hf-clip-vision", "hf-siglip-vision:separable", "hf-dinov3:hybrid", "timm-eva02", "timm-rope-mixed:separable",
         "timm-dinov3", "timm-rope-mixed:hybrid",
         "timm-vit:hybrid", "hf-dinov2-registers:hybrid", "hf-siglip2-naflex", "hf-siglip2-naflex:separable",
         "timm-naflexvit", "timm-naflexvit:hybrid",
         # the default kind (the tiny pattern of tests/conftest.py: halo 1, so overlapping windows, and top tokens)
         "timm-vit:local_global", "hf-dinov2-registers:local_global", "hf-dinov3:local_global",
         "hf-siglip2-naflex:local_global", "timm-naflexvit:local_global"]


@pytest.mark.parametrize("fid", CASES)
def test_export_onnx_dynamic_batch_parity(saved, tmp_path, fid):
    path = tmp_path / "model.onnx"
    r = CliRunner().invoke(main, ["export-onnx", str(saved[fid]), "--output", str(path), "--batch", "3",
                                  "--fixed-size"])          # the TorchScript-based exporter, no custom symbolic
    assert r.exit_code == 0, r.output
    diff = float(re.search(r"max abs difference (\S+)", r.output).group(1))
    assert diff <= 1e-4 and "ok" in r.output
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    print(fid, r.output)


def test_export_onnx_fails_above_tolerance(saved, tmp_path, monkeypatch):
    import onnxruntime as ort
    real_run = ort.InferenceSession.run

    def off_by_a_bit(self, *args, **kwargs):
        return [o + np.float32(1e-3) for o in real_run(self, *args, **kwargs)]

    monkeypatch.setattr(ort.InferenceSession, "run", off_by_a_bit)
    r = CliRunner().invoke(main, ["export-onnx", str(saved["timm-deit-distilled"]), "-o", str(tmp_path / "m.onnx"),
                                  "--fixed-size"])
    assert r.exit_code == 1
    assert "FAILED" in r.output and "Error: onnxruntime output differs from PyTorch: max abs difference 0.001" in r.output


def _dinov2(registers: bool, layers: int = 2):
    import transformers
    torch.manual_seed(0)
    kw = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, image_size=32, patch_size=8, mlp_ratio=2)
    if registers:
        return transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(num_register_tokens=2, **kw))
    return transformers.Dinov2Model(transformers.Dinov2Config(**kw)).eval()


def test_export_onnx_default_is_dynamic_where_it_verifies(saved, tmp_path):
    """The default takes any height/width where that verifies (transformers DINOv2 with local_global: the main job's
    source and kind), so the graph runs on what the directory's processor produces at another size — with exact
    softmax up to exact_tokens and the pattern above, as in PyTorch (was: the export failed on the pattern's
    ``%``; a graph holding only the example's form would be wrong at the other sizes); where the source fixes its
    resolution in the graph (DINOv2 with registers: antialiased interpolation), it falls back to the native size
    and says why."""
    import onnxruntime as ort
    from conftest import TINY_PATTERN
    student = cc.convert(_dinov2(False, layers=1), kind="local_global", **{**TINY_PATTERN, "exact_tokens": 20})
    d = cc.save_pretrained(cc.finalize(student, force=True), tmp_path / "dinov2", verify=False)
    r = CliRunner().invoke(main, ["export-onnx", str(d), "-o", str(tmp_path / "d.onnx"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "'height', 'width'" in r.output and "48x24" in r.output and "fixed" not in r.output
    session = ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"])
    loaded = cc.load(d)
    for hw in ((24, 24), (56, 40)):                    # 10 tokens: exact softmax; 36: the pattern
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            ref = loaded(x).last_hidden_state
        assert np.abs(session.run(None, {"pixel_values": x.numpy()})[0] - ref.numpy()).max() <= 1e-4, hw
    pattern_only = cc.load(d)
    for m in pattern_only.modules():
        if hasattr(m, "exact_tokens"):
            m.exact_tokens = 0
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():                              # the two forms differ at 10 tokens: the check can fail
        assert (pattern_only(x).last_hidden_state - loaded(x).last_hidden_state).abs().max() > 1e-3
    r = CliRunner().invoke(main, ["export-onnx", str(saved["hf-dinov2-registers"]), "-o", str(tmp_path / "r.onnx"),
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "height and width are fixed at 32x32: a dynamic size did not verify" in r.output
    assert len(r.output.strip().splitlines()) == 3 and "Traceback" not in r.output


@pytest.mark.parametrize("fid", ["timm-deit-distilled", "hf-clip-vision"])
def test_legacy_torch_onnx_export_of_a_loaded_model(saved, tmp_path, fid):
    """torch.onnx.export(..., dynamo=False), as many tools still call it, with no symbolic registered by castle-convert:
    the converted attention is plain matmul / mul / div / add (was: aten::addcdiv, which it has no symbolic for)."""
    import onnxruntime as ort
    from castle_convert.convert import primary_output
    model = cc.load(saved[fid])
    x = torch.randn(1, 3, 32, 32)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False, input_names=["pixel_values"])
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - primary_output(model(x)).numpy()).max() <= 1e-4
