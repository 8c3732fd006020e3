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
        model = cc.finalize(cc.convert(BY_ID[base].build(), kind=kind, keep_softmax=keep), force=True)
        out[fid] = cc.save_pretrained(model, root / fid.replace(":", "-"), verify=False)
    return out


CASES = ["timm-deit-distilled", "hf-dinov2-registers", "timm-qknorm:separable", "hf-vit:separable", "hf-dinov3",
         "hf-clip-vision", "hf-siglip-vision:separable", "hf-dinov3:hybrid", "timm-eva02", "timm-rope-mixed:separable",
         "timm-dinov3", "timm-rope-mixed:hybrid",
         "timm-vit:hybrid", "hf-dinov2-registers:hybrid", "hf-siglip2-naflex", "hf-siglip2-naflex:separable",
         "timm-naflexvit", "timm-naflexvit:hybrid"]


@pytest.mark.parametrize("fid", CASES)
def test_export_onnx_dynamic_batch_parity(saved, tmp_path, fid):
    path = tmp_path / "model.onnx"
    r = CliRunner().invoke(main, ["export-onnx", str(saved[fid]), "--output", str(path), "--batch", "3"])
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
    r = CliRunner().invoke(main, ["export-onnx", str(saved["timm-deit-distilled"]), "-o", str(tmp_path / "m.onnx")])
    assert r.exit_code == 1
    assert "FAILED" in r.output and "Error: onnxruntime output differs from PyTorch: max abs difference 0.001" in r.output
