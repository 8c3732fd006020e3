"""`castle-convert inspect` on every kind of MODEL argument, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import timm
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from castle_convert.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return CliRunner().invoke(main, list(args))


def test_inspect_timm_name_reports_macs():
    r = _run("inspect", "test_vit", "--img-size", "64")
    assert r.exit_code == 0, r.output
    assert "converted:  6 attention modules" in r.output and "MACs" in r.output


def test_inspect_alias_json_macs_shrink_at_high_resolution():
    small = json.loads(_run("inspect", "deit_tiny", "--json").output)
    large = json.loads(_run("inspect", "deit_tiny", "--img-size", "1024", "--json").output)
    assert small["tokens"] == 197 and large["tokens"] == 4097
    assert len(small["converted"]) == 12
    assert large["macs_after"] / large["macs_before"] < 0.5 < small["macs_after"] / small["macs_before"]


def test_inspect_kind_separable():
    la = json.loads(_run("inspect", "deit_tiny", "--img-size", "512", "--json").output)
    r = _run("inspect", "deit_tiny", "--img-size", "512", "--kind", "separable", "--json")
    assert r.exit_code == 0, r.output
    sep = json.loads(r.output)
    assert sep["macs_before"] == la["macs_before"] and sep["macs_after"] < la["macs_after"]
    r = _run("inspect", "deit_tiny", "--kind", "performer")
    assert r.exit_code != 0 and "separable" in r.output


def test_inspect_checkpoint_file_with_arch(tmp_path):
    model = timm.create_model("test_vit", num_classes=7)
    ckpt = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    r = _run("inspect", str(ckpt), "--arch", "test_vit")
    assert r.exit_code == 0, r.output
    assert "6 attention modules" in r.output
    r = _run("inspect", str(ckpt))
    assert r.exit_code != 0 and "--arch" in r.output


def test_inspect_hf_directory(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8, num_labels=4)
    ViTForImageClassification(cfg).save_pretrained(tmp_path)
    r = _run("inspect", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert "3 attention modules" in r.output and "transformers adapter" in r.output


def test_inspect_errors_are_one_line_messages():
    r = _run("inspect", "deit_smal")
    assert r.exit_code != 0 and "Did you mean: deit_small" in r.output and "Traceback" not in r.output
    r = _run("inspect", "test_resnet")
    assert r.exit_code == 1 and "no supported attention" in r.output


def test_convert_py_script_is_the_cli():
    out = subprocess.run([sys.executable, str(ROOT / "convert.py"), "inspect", "test_vit", "--json"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert len(json.loads(out)["converted"]) == 6


def test_inspect_never_touches_weights(monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert _run("inspect", "test_vit").exit_code == 0


def test_bare_command_prints_help_and_runs_nothing():
    r = _run()
    assert r.exit_code == 0 and "Commands:" in r.output and "Nothing was run" in r.output
    assert "castle-convert --recipe quick" in r.output


def test_mistyped_command_is_named_not_read_as_a_model():
    r = _run("evaluate", "runs/x")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "no such command 'evaluate': did you mean 'eval'?" in r.output
    r = _run("inspekt", "test_vit")
    assert r.exit_code == 2 and "did you mean 'inspect'?" in r.output
    r = _run("deit_smal", "--recipe", "nope")              # a model name (close to no command) still goes to distill
    assert r.exit_code != 0 and "no such command" not in r.output


def test_inspect_a_finished_output_shows_the_converted_model(tmp_path):
    """inspect OUTPUT (was: "already converted … call finalize()"): kind, converted and kept layers, token-mixing MACs
    per layer, and where to measure it."""
    import castle_convert as cc
    torch.manual_seed(0)
    model = cc.finalize(cc.convert(timm.create_model("test_vit", img_size=32, patch_size=8), keep_softmax=[1]),
                        force=True)
    out = cc.save_pretrained(model, tmp_path / "out", verify=False)
    r = _run("inspect", str(out))
    assert r.exit_code == 0, r.output
    assert "blocks.0.attn" in r.output and "linear_angular" in r.output and "softmax (kept)" in r.output
    assert "5 of 6 attentions converted" in r.output and f"castle-convert eval {out}" in r.output
    data = json.loads(_run("inspect", str(out), "--json").output)
    assert data["kind"] == "linear_angular" and [k["name"] for k in data["kept"]] == ["blocks.1.attn"]
