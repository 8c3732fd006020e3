"""The fidelity block (castle_convert/fidelity.py), `castle-convert eval`, and the teacher-frozen auxiliary branch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

import castle_convert as cc
from castle_convert import fidelity
from castle_convert.cli import main
from castle_convert.config import ConfigError
from castle_convert.convert import set_schedule, training_forms


def _folder(tmp_path, n=6, size=40):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / "data" / split / cls
            d.mkdir(parents=True)
            for i in range(n // 2):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return tmp_path / "data"


def _perturb_attention(student, scale=0.2):
    torch.manual_seed(1)
    with torch.no_grad():
        for _, m in training_forms(student):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * scale)


def _timm(**kw):
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=8, **kw).eval()


def test_identical_student_scores_one_and_a_changed_one_less(tmp_path):
    data = _folder(tmp_path)
    teacher = _timm(num_classes=2, dynamic_img_size=True)
    same = cc.convert(teacher)                            # gate 1: the teacher's attention
    r = fidelity.measure(teacher, same, str(data), [32, 64], latency=False, progress=False)
    assert [row.resolution for row in r.rows] == [32, 64]
    for row in r.rows:
        assert row.images == 6 and row.patch_cosine == pytest.approx(1.0, abs=1e-5)
        assert row.cls_cosine == pytest.approx(1.0, abs=1e-5) and row.agree == 100.0
        assert row.top1_teacher == row.top1_student                  # labelled folder: accuracy of both
    changed = cc.convert(teacher)
    _perturb_attention(changed)
    set_schedule(changed, 0.0)
    r2 = fidelity.measure(teacher, changed, str(data), [32], latency=False, progress=False)
    assert r2.rows[0].patch_cosine < 0.999 and r2.rows[0].cls_cosine < 0.999
    assert "patch cos" in r2.format() and json.loads(json.dumps(r2.to_dict()))["rows"][0]["resolution"] == 32


def test_latency_and_macs_beside_fidelity(tmp_path):
    data = _folder(tmp_path)
    teacher = _timm(num_classes=0)                                    # fixed-size model: copies are resized
    student = cc.finalize(cc.convert(teacher), force=True)
    r = fidelity.measure(teacher, student, str(data), [32, 64], latency_budget_s=0.5, progress=False)
    for row in r.rows:
        assert row.teacher_ms > 0 and row.student_ms > 0 and row.latency_ratio > 0
        assert 0 < row.macs_ratio < 2 and row.agree is None
    assert teacher.patch_embed.img_size == (32, 32)                   # the models themselves are untouched
    no_latency = fidelity.measure(teacher, student, str(data), [32, 64], latency=False, progress=False)
    for row, timed in zip(no_latency.rows, r.rows):                  # MACs without timing: the same counts
        assert row.teacher_ms is None and row.macs_ratio == pytest.approx(timed.macs_ratio)


def test_hf_model_tokens_and_cls():
    import transformers
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                    patch_size=8, mlp_ratio=2)
    teacher = transformers.Dinov2Model(cfg).eval()
    student = cc.convert(teacher)
    _perturb_attention(student)
    set_schedule(student, 0.0)
    x = torch.randn(3, 3, 48, 48)
    out = fidelity.compare(teacher, student, x)
    assert out["images"] == 3 and 0 < out["patch_cosine"] < 1 and 0 < out["cls_cosine"] < 1
    assert "agree" not in out


def test_macs_only_leaves_a_transformers_model_where_it_was(tmp_path):
    """``latency=False`` counts MACs on shape-only copies: a transformers model (no fixed input size, so not copied
    per resolution) stays on its device and keeps its weights for the next resolution (it went to "meta")."""
    import transformers
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                    patch_size=8, mlp_ratio=2)
    teacher = transformers.Dinov2Model(cfg).eval()
    student = cc.finalize(cc.convert(teacher), force=True)
    r = fidelity.measure(teacher, student, str(_folder(tmp_path)), [32, 48], latency=False, progress=False)
    assert [row.resolution for row in r.rows] == [32, 48] and all(0 < row.macs_ratio < 2 for row in r.rows)
    assert {p.device.type for p in (*teacher.parameters(), *student.parameters())} == {"cpu"}


def test_off_grid_resolution_is_an_error_and_on_grid_rounds():
    teacher = _timm(num_classes=0, dynamic_img_size=True)
    with pytest.raises(ValueError, match="patch size \\(8 px\\).*use e.g. 48"):
        fidelity.measure(teacher, cc.convert(teacher), "natural", [50], latency=False, progress=False)
    assert fidelity.on_grid(teacher, [224, 448, 518, 516]) == [224, 448, 512]


def test_eval_command_on_an_output_directory(tmp_path):
    data = _folder(tmp_path)
    teacher = _timm(num_classes=2, dynamic_img_size=True)
    student = cc.convert(teacher)
    _perturb_attention(student, 0.05)
    set_schedule(student, 0.0)
    out = tmp_path / "out"
    cc.save_pretrained(cc.finalize(student, force=True), out)
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "test_vit", "num_classes": 2, "model_args": {
        "img_size": 32, "patch_size": 8, "dynamic_img_size": True}, "pretrained_cfg": {"input_size": [3, 32, 32]}}))
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(folder / "model.safetensors"))
    runner = CliRunner()
    r = runner.invoke(main, ["eval", str(out), "--teacher", str(folder), "--data", str(data), "--resolutions",
                             "32,64", "--no-latency", "--json", str(tmp_path / "f.json"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "patch cos" in r.output
    rows = json.loads((tmp_path / "f.json").read_text())["rows"]
    assert [row["resolution"] for row in rows] == [32, 64] and all(0 < row["cls_cosine"] < 1 for row in rows), rows
    bad = runner.invoke(main, ["eval", str(out), "--teacher", str(folder), "--resolutions", "32,x"])
    assert bad.exit_code != 0 and "--resolutions" in bad.output
    off = runner.invoke(main, ["eval", str(out), "--resolutions", "32,33"])     # no --teacher: checked before it
    assert off.exit_code == 2 and "Traceback" not in off.output
    assert "33 px is not a multiple of the model's patch size (8 px): use e.g. --resolutions 32,32" in off.output
    # the default: 12 images per resolution (the main job's block), a bar counting images, a picture
    png = tmp_path / "f.png"
    r = runner.invoke(main, ["eval", str(out), "--teacher", str(folder), "--data", str(data), "--resolutions", "32",
                             "--no-latency", "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert "fidelity: 100%" in r.output and "6/6" in r.output and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "default: 12" in runner.invoke(main, ["eval", "--help"]).output.replace("\n", " ").replace("  ", " ")
    from castle_convert.recipes import FidelitySection
    assert FidelitySection().max_images == fidelity.DEFAULT_MAX_IMAGES == 12


def test_pictures_of_a_report(tmp_path):
    """fidelity.png (cosines and latency against resolution) and stage1.png (per-layer error before / after) from
    a report's blocks; the model card shows the pictures a directory holds."""
    from castle_convert import plots
    from castle_convert.export.card import render_card
    block = {"data": "natural", "device": "cpu", "threads": 2, "rows": [
        {"resolution": r, "images": 12, "patch_cosine": c, "cls_cosine": c + 0.02, "macs_ratio": m, "teacher_ms": t,
         "student_ms": t * m, "teacher_iqr_ms": 2.0, "student_iqr_ms": 1.0}
        for r, c, m, t in ((224, 0.79, 0.93, 120.0), (448, 0.75, 0.72, 580.0), (518, 0.74, 0.65, 817.0))]}
    stage1 = {"errors_before": {"blocks.0.attn": 0.4, "blocks.1.attn": 0.5}, "errors": {"blocks.0.attn": 0.1,
                                                                                      "blocks.1.attn": 0.2}}
    for path in (plots.fidelity_plot(block, str(tmp_path / "f.png")), plots.stage1_plot(stage1, str(tmp_path / "s.png"))):
        assert Path(path).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(plots.PlotError, match="no stage-1 errors"):
        plots.stage1_plot({}, str(tmp_path / "none.png"))
    config = {"source": {"library": "timm", "architecture": "test_vit"}, "castling": {"kind": "linear_angular"},
              "converted_modules": ["blocks.0.attn"], "castle_headless": True}
    card = render_card(config, {"fidelity": block, "stage1": stage1}, pictures=("fidelity.png", "stage1.png"))
    assert "](fidelity.png)" in card and "](stage1.png)" in card
    assert "](fidelity.png)" not in render_card(config, {"fidelity": block})


@pytest.mark.parametrize("kind", ["linear_angular", "separable"])
def test_teacher_aux_branch_is_the_teacher_at_gate_one_after_any_change(kind):
    teacher = _timm(num_classes=0, dynamic_img_size=True, qk_norm=True)
    student = cc.convert(teacher, kind=kind, aux="teacher")
    _perturb_attention(student)                                       # stage 1 / training moved q, k, v, proj
    x = torch.randn(2, 3, 32, 48)
    set_schedule(student, 1.0, 0.0)
    with torch.no_grad():
        assert torch.equal(student(x), teacher(x))                   # gate 1 = the teacher, exactly
    own = cc.convert(teacher, kind=kind)                              # aux: student (the default)
    _perturb_attention(own)
    with torch.no_grad():
        assert (own(x) - teacher(x)).abs().max() > 1e-3
    set_schedule(student, 0.5, 1.0)                                   # half way, masked: trains through both
    student(x).sum().backward()
    assert all(p.grad is not None for _, m in training_forms(student) for p in m.added_parameters())
    assert not any("teacher" in k for k in student.state_dict())      # training-only, not saved
    set_schedule(student, 0.0)
    student(x).sum().backward()
    final = cc.finalize(student)
    assert not any("teacher" in n for n, _ in final.named_buffers())


def test_teacher_aux_needs_blend():
    with pytest.raises(ConfigError, match="aux='teacher'.*combine='blend'"):
        cc.CastlingConfig(aux="teacher", combine="sum")
    with pytest.raises(ConfigError, match="aux='x'"):
        cc.CastlingConfig(aux="x")
