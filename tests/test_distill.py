"""Distillation: recipes, schedules, data, the Accelerate loop, resume, output directory."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import castle_convert as cc
from castle_convert.data import DataError, build_data
from castle_convert.distill.loop import ResumeError, distill
from castle_convert.distill.schedule import AnnealSchedule
from castle_convert.export.save import OutputExistsError
from castle_convert.recipes import AnnealSection, RecipeError, available, load_recipe
from castle_convert.run import format_table, run
from test_hostile import CHEAP_FIDELITY

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["epochs=2", "optim.batch_size=8", "optim.warmup_epochs=0.5", "castling.anneal.end_epoch=1", "transfer.steps=0",
            "save_every=2", "log_every=1", "eval_every=1", "data.workers=0", "data.augmentation=light",
            *CHEAP_FIDELITY]


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """3 classes of 32×32 RGB images with class-dependent colour: 24 train + 12 val per split."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.clip(rng.normal(colour, 40, size=(32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


TINY_ARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)


def tiny_teacher(num_classes: int = 3):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **{**TINY_ARGS, "num_classes": num_classes})


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A timm model folder (config.json + model.safetensors) as timm's save_for_hf writes it."""
    from timm.models._hub import save_for_hf
    path = tmp_path_factory.mktemp("teacher") / "tiny_vit"
    save_for_hf(tiny_teacher(), str(path), model_args=TINY_ARGS, safe_serialization=True)
    return path


# -- recipes -------------------------------------------------------------------------------------

def test_shipped_recipes_parse():
    assert {"quick", "quick-castling", "toy", "distill-10ep", "distill-30ep"} <= set(available())
    r30, r10, quick = load_recipe("distill-30ep"), load_recipe("distill-10ep"), load_recipe("quick")
    assert r30.epochs == 30 and 0 < r30.castling.anneal.end_epoch < r30.epochs, "a phase at gate 0 follows the anneal"
    assert {r.castling.kind for r in (r30, r10, quick)} == {"local_global"}        # the default form
    # the CPU recipes: stage 1 only, on natural images, at every size the model will run at
    assert (quick.epochs, r10.epochs) == (0, 0) and r10.transfer.steps > quick.transfer.steps > 0
    assert quick.data.mix_list()[-1] == quick.data.resolution and r10.data.mix_list() == quick.data.mix_list()
    assert load_recipe("quick-castling").castling.kind == "linear_angular"     # the Castling-ViT form's main job
    assert load_recipe("toy").model == "fmnist_vit"
    assert quick.model == "dinov2_small"


def test_recipes_ship_inside_the_package():
    """The package reads recipes from castle_convert/_recipes (a link to recipes/, declared as package
    data), so a wheel install carries them; the two views must be the same files."""
    import tomllib

    from castle_convert.recipes import RECIPES_DIR
    assert RECIPES_DIR.parent == Path(cc.__file__).parent
    assert sorted(p.name for p in RECIPES_DIR.glob("*.yaml")) == sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "_recipes/*.yaml" in data["castle_convert"]


def test_recipe_overrides_and_errors(tmp_path):
    r = load_recipe("toy", ["optim.lr=1e-4", "castling.dw=1d", "epochs=0.5", "castling.anneal.end_epoch=0.25"])
    assert (r.optim.lr, r.castling.dw, r.epochs) == (1e-4, "1d", 0.5)
    with pytest.raises(RecipeError, match=r"optim\.lrr.*valid keys under 'optim': lr"):
        load_recipe("toy", ["optim.lrr=1"])
    with pytest.raises(RecipeError, match=r"'optim\.batch_size' must be int"):
        load_recipe("toy", ["optim.batch_size=abc"])
    with pytest.raises(RecipeError, match="combine"):
        load_recipe("toy", ["castling.combine=avg"])
    with pytest.raises(RecipeError, match="no recipe 'nope'"):
        load_recipe("nope")
    custom = tmp_path / "mine.yaml"
    custom.write_text("base: quick\nepochs: 4\nmystery: 1\n")
    with pytest.raises(RecipeError, match="unknown recipe key 'mystery'"):
        load_recipe(str(custom))



def test_a_recipe_is_named_by_itself_never_by_its_base(tmp_path):
    """`base:` merges the parent's settings, not its name: the default output, report.json and the model card
    name the recipe that was asked for (distill-10ep was recorded as distill-30ep)."""
    from castle_convert.run import default_output
    assert load_recipe("distill-10ep").name == "distill-10ep"
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: quick\nepochs: 2\n")
    assert load_recipe(str(mine)).name == "mine"
    assert default_output("dinov2_small", load_recipe(str(mine))) == Path("runs/dinov2_small-mine")
    named = tmp_path / "other.yaml"
    named.write_text(f"base: {mine}\nname: longer\n")
    assert load_recipe(str(named)).name == "longer"
    assert load_recipe(str(named), ["name=x"]).name == "x"


def test_lr_schedule_is_transformers_warmup_cosine():
    """One schedule for the loop, stage 1 and the built-in teacher (transformers' cosine_warmup_with_min_lr): the first
    warmup step already learns, the last step reaches min_lr, constant stays at lr after warmup."""
    from castle_convert.distill.schedule import lr_scheduler
    for total, warmup, rate, last in ((20, 4, 0.01, 0.01), (20, 4, 1.0, 1.0), (10, 0, 0.0, 0.0)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched, lrs = lr_scheduler(opt, total, warmup, rate), []
        for _ in range(total):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert lrs[0] == (1 / warmup if warmup else pytest.approx(1.0, abs=0.03)) and lrs[-1] == pytest.approx(last)
        assert max(lrs) == pytest.approx(1.0, abs=0.03)

def test_anneal_schedule_and_checkpoint_state():
    s = AnnealSchedule(AnnealSection(start_epoch=1, end_epoch=3, curve="linear", threshold=2.0))
    assert s.at(0.5) == (1.0, 0.0)
    assert s.at(2.0) == pytest.approx((0.5, 1.0))
    assert s.at(3.0) == (0.0, 2.0) and s.at(10) == (0.0, 2.0)
    s.update(2.5)
    t = AnnealSchedule(s.cfg)
    t.load_state_dict(s.state_dict())
    assert t.epoch == 2.5
    cosine = AnnealSchedule(AnnealSection(start_epoch=0, end_epoch=2, curve="cosine"))
    gates = [cosine.at(e)[0] for e in (0, 0.5, 1, 1.5, 2)]
    assert gates == sorted(gates, reverse=True) and gates[2] == pytest.approx(0.5)


# -- data ----------------------------------------------------------------------------------------

def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_and_grey_to_rgb(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    monkeypatch.setenv("CASTLE_FASHION_MNIST_DIR", str(tmp_path))
    from castle_convert import zoo
    from castle_convert.data import Materialized
    teacher = zoo.create("fmnist_vit")
    data = build_data("fashion-mnist", teacher, materialize=False)
    x, y = data.val[3]
    assert (len(data.train), len(data.val), data.num_classes) == (20, 10, 10)
    assert x.shape == (3, 28, 28) and torch.equal(x[0], x[1])
    raw = np.asarray(data.val.base[3][0], dtype=np.float32) / 255
    torch.testing.assert_close(x[0], torch.from_numpy((raw - 0.2860) / 0.3530), atol=1e-4, rtol=0)
    fast = build_data("fashion-mnist", teacher, augmentation="none")
    assert isinstance(fast.train, Materialized) and isinstance(fast.val, Materialized)
    assert torch.equal(fast.val[3][0], x) and fast.val[3][1] == y


def test_missing_fashion_mnist_says_how_to_get_it(monkeypatch, tmp_path):
    import castle_convert.data as data_mod
    monkeypatch.setenv("CASTLE_FASHION_MNIST_DIR", str(tmp_path))
    monkeypatch.setattr(data_mod, "FASHION_MNIST_DIRS", ())
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        data_mod.load_fashion_mnist()


def test_image_folder_errors(tmp_path, image_folder):
    with pytest.raises(DataError, match="val"):
        (tmp_path / "train" / "a").mkdir(parents=True)
        build_data(str(tmp_path), tiny_teacher())
    with pytest.raises(DataError, match="no such directory"):
        build_data(str(tmp_path / "nope"), tiny_teacher())
    data = build_data(str(image_folder), tiny_teacher())
    assert data.num_classes == 3 and data.train[0][0].shape == (3, 32, 32)


def test_class_count_mismatch_is_an_error_before_training(image_folder):
    teacher = tiny_teacher(num_classes=5)
    data = build_data(str(image_folder), teacher)
    with pytest.raises(DataError, match="3 classes but the teacher's head has 5"):
        distill(teacher, cc.convert(teacher), data, load_recipe("toy", TINY_RUN), progress=False)


# -- the loop ------------------------------------------------------------------------------------

def test_distill_end_to_end_with_attention_transfer(image_folder):
    teacher = tiny_teacher()
    data = build_data(str(image_folder), teacher)
    recipe = load_recipe("toy", TINY_RUN + ["distill.attn_transfer=0.5", "distill.alpha=0.8"])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = distill(teacher, cc.convert(teacher), data, recipe, progress=False)
    assert result.steps == 6 and result.epochs == pytest.approx(2.0)
    assert result.student_start_eval["top1"] == result.teacher_eval["top1"]
    assert result.student_start_eval["agree"] == 100.0, "teacher-equivalent start"
    assert abs(result.student_final_eval["top1"] - result.student_train_form_eval["top1"]) <= 0.1
    rows = [h for h in result.history if "loss" in h]
    assert {"kd", "ce", "attn_transfer", "gate", "mask_density", "lr", "img_per_s"} <= set(rows[0])
    assert rows[0]["gate"] > rows[-1]["gate"] == 0.0, "gate annealed to 0"
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items()), "teacher stays frozen"
    assert teacher.training, "teacher's mode restored"
    assert not any(getattr(m, "is_training_form", False) for m in result.student.modules())


def test_separable_kind_from_the_command_line(teacher_dir, image_folder, tmp_path):
    """`castle-convert MODEL --attention separable`: convert, distil (local transfer), finalize, write."""
    from click.testing import CliRunner

    from castle_convert.cli import main
    out = tmp_path / "sep"
    sets = [a for s in TINY_RUN + ["epochs=1", "castling.anneal.end_epoch=0.5"] for a in ("--set", s)]
    r = CliRunner().invoke(main, [str(teacher_dir), "--attention", "separable", "--recipe", "toy", "--data",
                                  str(image_folder), "--output", str(out), "--no-progress", *sets])
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert config["castling"]["kind"] == "separable" and config["castling"]["combine"] == "blend"
    assert report["student_start"]["agree"] == 100.0, "teacher-equivalent start"
    assert report["steps"] == 3 and 0 < report["macs"]["student"] < report["macs"]["teacher"]
    state = load_file(str(out / "model.safetensors"))
    assert any(k.endswith("in_proj.weight") for k in state) and not any(k.endswith("qkv.weight") for k in state)
    assert any(k.endswith("relu_gain") for k in state)


def test_public_distill_api_takes_names(image_folder):
    teacher = tiny_teacher()
    result = cc.distill(teacher, cc.convert(teacher), str(image_folder), recipe="toy",
                        overrides=TINY_RUN + ["epochs=1", "castling.anneal.end_epoch=0.5"], progress=False)
    assert result.steps == 3 and "top1" in result.student_final_eval


def test_distill_leaves_teacher_reusable(image_folder):
    """A second convert + distill of the same teacher gives the same student as the first."""
    teacher = tiny_teacher()
    data = build_data(str(image_folder), teacher)
    recipe = load_recipe("toy", TINY_RUN + ["epochs=1", "castling.anneal.end_epoch=0.5"])
    flags = [p.requires_grad for p in teacher.parameters()]
    first = distill(teacher, cc.convert(teacher), data, recipe, progress=False).student.state_dict()
    assert [p.requires_grad for p in teacher.parameters()] == flags, "teacher's requires_grad untouched"
    second = distill(teacher, cc.convert(teacher), data, recipe, progress=False).student.state_dict()
    assert all(torch.allclose(first[k], second[k], atol=1e-6) for k in first)


def test_headless_backbone_distils_on_features(image_folder):
    torch.manual_seed(0)
    teacher = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=28, patch_size=7, embed_dim=32, depth=2,
                                num_heads=2, num_classes=0)
    data = build_data(str(image_folder), teacher)
    result = distill(teacher, cc.convert(teacher), data, load_recipe("toy", TINY_RUN + ["epochs=1"]),
                     progress=False)
    assert result.student_start_eval["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert "cosine" in result.student_final_eval and "feature" in result.history[0]


def test_intermediate_targets_and_teacher_aux_anneal(image_folder):
    """distill.intermediate matches every converted layer's block output; with castling.aux=teacher the
    annealed branch is the teacher's own attention (gate 1 = teacher after stage 1)."""
    torch.manual_seed(0)
    teacher = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=28, patch_size=7, embed_dim=32, depth=2,
                                num_heads=2, num_classes=0)
    data = build_data(str(image_folder), teacher)
    recipe = load_recipe("toy", TINY_RUN + ["epochs=1", "distill.intermediate=1.0", "castling.aux=teacher",
                                            "transfer.steps=4", "transfer.batch_size=4", "transfer.reuse=2",
                                            "castling.anneal.end_epoch=0.5", "distill.local_transfer=0"])
    student = cc.convert(teacher, recipe.castling.to_config())
    result = distill(teacher, student, data, recipe, progress=False)
    rows = [h for h in result.history if "loss" in h]
    assert all(r["intermediate"] > 0 for r in rows) and rows[0]["gate"] > 0
    # stage 1 changed q/k/v, yet the student at the start of stage 2 (gate 1) is the teacher
    assert result.student_start_eval["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert not any(m._forward_hooks for m in teacher.modules()), "capture hooks removed"


def _run(model_dir, folder, out, extra=(), **kw):
    recipe = load_recipe("toy", TINY_RUN + list(extra))
    return run(str(model_dir), recipe, data_spec=str(folder), output=out, progress=False, **kw)


def test_run_writes_complete_output_and_refuses_overwrite(teacher_dir, image_folder, tmp_path):
    out = tmp_path / "out"
    default_block = ["fidelity.resolutions=224,448,518", "fidelity.latency=true"]     # the recipe's own block at its
    result = _run(teacher_dir, image_folder, out, default_block)                       # resolutions, 2 photos each
    files = sorted(p.name for p in out.iterdir())
    block = json.loads((out / "report.json").read_text())["fidelity"]
    assert block["data"] == "natural" and [r["resolution"] for r in block["rows"]] == [224, 448, 512]
    assert all(r["images"] == 2 and r["teacher_ms"] > 0 and r["student_ms"] > 0 for r in block["rows"]), block
    assert "fidelity.png" in files and "](fidelity.png)" in (out / "README.md").read_text()
    assert {"model.safetensors", "config.json", "recipe.yaml", "report.json", "logs"} <= set(files)
    assert {"README.md", "preprocessor_config.json", "modeling_castling.py"} <= set(files), "publishable"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (cc.load(out)(x) - result.distill.student.eval()(x)).abs().max() <= 1e-5
    assert json.loads((out / "config.json").read_text())["id2label"]["0"] == "class_0"
    report = json.loads((out / "report.json").read_text())
    assert {"teacher", "student", "student_train_form_g0", "params", "macs", "train_time_s", "versions"} <= set(report)
    assert report["macs"]["student"] > 0 and report["macs"]["teacher"] > 0 and report["macs"]["tokens"] == 17
    lat = report["latency"]
    assert lat["teacher"]["median_ms"] > 0 and lat["student"]["median_ms"] > 0 and lat["resolution"] == 32
    assert lat["ratio"] == pytest.approx(lat["student"]["median_ms"] / lat["teacher"]["median_ms"], abs=1e-3)
    assert "ms |" in (out / "README.md").read_text(), "the model card shows the measured latency"
    state = load_file(str(out / "model.safetensors"))
    assert any(k.endswith("gamma") for k in state) and not any("mask" in k for k in state)
    assert load_recipe(str(out / "recipe.yaml")).epochs == 2
    assert "student, finalized" in format_table(result.report)
    assert not out.with_name("out.run").exists(), "checkpoints removed after success"
    with pytest.raises(OutputExistsError, match="--overwrite"):
        _run(teacher_dir, image_folder, out)


def test_interrupted_run_resumes_to_identical_weights(teacher_dir, image_folder, tmp_path):
    full = _run(teacher_dir, image_folder, tmp_path / "full")

    def kill_at_4(step):
        if step == 4:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _run(teacher_dir, image_folder, out, on_step=kill_at_4)
    assert not out.exists(), "an interrupted run leaves no output that looks complete"
    assert (tmp_path / "resumed.run" / "checkpoint").is_dir()
    with pytest.raises(ResumeError, match="--resume"):
        _run(teacher_dir, image_folder, out)
    resumed = _run(teacher_dir, image_folder, out, resume=True)
    assert resumed.distill.steps == full.distill.steps
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert max(diffs.values()) <= 1e-6, {k: v for k, v in diffs.items() if v > 1e-6}


def test_resume_without_checkpoint_is_an_error(teacher_dir, image_folder, tmp_path):
    with pytest.raises(ResumeError, match="no checkpoint"):
        _run(teacher_dir, image_folder, tmp_path / "never", resume=True)


def test_two_process_accelerate_launch(teacher_dir, image_folder, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
           "-m", "castle_convert", str(teacher_dir), "--recipe", "toy",
           "--data", str(image_folder), "--output", str(out), "--no-progress",
           *[a for s in TINY_RUN + ["optim.batch_size=8"] for a in ("--set", s)]]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Grad strides do not match bucket view strides" not in proc.stderr, "DW weight layout vs DDP buckets"
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2
    assert report["teacher"]["n"] == 12, "every validation image counted once across processes"
    assert report["student_start"]["agree"] == 100.0
    assert 0.0 <= report["student"]["top1"] <= 100.0 and report["steps"] == 6


def test_hugging_face_teacher_distils(image_folder):
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    teacher = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                  intermediate_size=64, image_size=32, patch_size=8, num_labels=3))
    result = cc.distill(teacher, cc.convert(teacher), str(image_folder), recipe="toy",
                        overrides=TINY_RUN + ["epochs=1", "castling.anneal.end_epoch=0.5"], progress=False)
    assert result.student_start_eval["agree"] == 100.0 and result.steps == 3
    assert abs(result.student_final_eval["top1"] - result.student_train_form_eval["top1"]) <= 0.1
