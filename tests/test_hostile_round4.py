"""Hostile input and faults, fourth round (issue 26): the natural-image cache, ``eval``, published directories as
untrusted input, padded batches, locks and ``--overwrite``, recipes as input.

Same assertions as ``test_hostile.py``: a CLI case exits with one ``Error: ...`` line naming the problem
(no traceback, nothing complete-looking written); a case that has a right answer checks the answer.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from test_natural import wallpapers  # noqa: F401 - fixture
from test_hostile import Case, _copy, _distill, _error_line, assert_one_line_error, world  # noqa: F401 - fixture


# -- recipes are input (item 8) --------------------------------------------------------------------

def _laughs(levels: int = 9) -> str:
    """A ~1 KB "billion laughs" YAML: 10 ** levels strings through nested aliases."""
    text = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, levels):
        prev, cur = chr(96 + i), chr(97 + i)
        text += f"{cur}: &{cur} [{', '.join(['*' + prev] * 10)}]\n"
    return text


def _recipe(tmp: Path, text: str, name: str = "mine.yaml") -> Path:
    p = tmp / name
    p.write_text(text)
    return p


CASES = [
    Case("recipe-billion-laughs", lambda w, t: _distill(w, t, "--recipe", str(_recipe(
        t, _laughs() + f"epochs: *{chr(96 + 9)}\n"))),
         r"mine\.yaml expands to more than 10000 values \(YAML anchors and aliases", output="out"),
    Case("recipe-billion-laughs-in-keep-softmax", lambda w, t: _distill(w, t, "--recipe", str(_recipe(
        t, _laughs(5) + "castling:\n  keep_softmax: *e\n"))), r"expands to more than 10000 values", output="out"),
    Case("recipe-laughs-through-set", lambda w, t: _distill(w, t, sets=["epochs=&a [1, *a]"]),
         r"--set epochs=\.\.\. expands to more than 10000 values", output="out"),
    Case("recipe-duplicate-section", lambda w, t: _distill(w, t, "--recipe", str(_recipe(
        t, "base: toy\noptim:\n  lr: 0.001\nepochs: 2\noptim:\n  batch_size: 8\n"))),
         r"mine\.yaml gives the key 'optim' twice in one mapping \(lines 2 and 5\).*merge them", output="out"),
    Case("recipe-duplicate-key-in-set", lambda w, t: _distill(w, t, sets=["optim={lr: 1, lr: 2}"]),
         r"--set optim=\.\.\. gives the key 'lr' twice", output="out"),
    Case("recipe-too-deep", lambda w, t: _distill(w, t, "--recipe", str(_recipe(
        t, "epochs: " + "[" * 3000 + "]" * 3000 + "\n"))), r"nests lists or mappings too deeply", output="out"),
    Case("recipe-name-escapes-runs", lambda w, t: _distill(w, t, "--recipe", str(_recipe(
        t, "base: toy\nname: ../../elsewhere\n"))), r"recipe name '\.\./\.\./elsewhere' is invalid", output="out"),
    Case("recipe-long-value-is-cut", lambda w, t: _distill(w, t, sets=["epochs=[" + ", ".join(["9"] * 5000) + "]"]),
         r"'epochs' must be float, got \[9, 9, .{0,80}\.\.\. \(list\)$", output="out"),
]


def test_recipe_anchors_within_bounds_still_work(tmp_path):
    from castle_convert.recipes import load_recipe
    r = load_recipe(str(_recipe(tmp_path, "base: toy\noptim: &o {lr: 0.002}\ntransfer: {lr: 0.002}\n"
                                          "castling: {keep_softmax: [0, 1]}\n")))
    assert r.optim.lr == 0.002 and r.transfer.lr == 0.002 and r.castling.keep_softmax == "0,1"


def test_recipe_laughs_are_refused_fast_and_small(tmp_path):
    """The whole check is bounded: 10 ** 9 strings are refused after visiting 10 001 nodes."""
    import time
    import tracemalloc

    from castle_convert.recipes import RecipeError, load_recipe
    p = _recipe(tmp_path, _laughs() + "epochs: *i\n")
    assert p.stat().st_size < 1024
    tracemalloc.start()
    t0 = time.time()
    with pytest.raises(RecipeError, match="expands to more than"):
        load_recipe(str(p))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.time() - t0 < 2.0 and peak < 20 * 2 ** 20


# -- a classifier distilled on unlabelled natural images finishes (item 1) ------------------------------

FAST = ["fidelity.data=none", "data.max_train_samples=8", "data.max_eval_samples=4"]


@pytest.mark.parametrize("teacher", ["timm-folder", "hf-classifier"])
def test_classifier_distilled_on_natural_images_is_written(world, wallpapers, tmp_path, teacher):
    """A fine-tuned 3-class timm folder and a transformers ViTForImageClassification, distilled on the built-in
    unlabelled images: the run finishes and writes the model with the model's own class names (it trained to the
    end, then failed: "labels has 0 names but the model's head has 3 classes", and nothing was written)."""
    model = world["teacher"] if teacher == "timm-folder" else world["hf_vit"]
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = _natural(world, out, model)
    config = json.loads((out / "config.json").read_text())
    assert (out / "model.safetensors").is_file() and len(config["id2label"]) == 3
    assert result.report["dataset"] == "natural"


def _natural(w, out: Path, model: Path):
    from castle_convert.recipes import load_recipe
    from castle_convert.run import run
    from test_hostile import TINY_RUN
    return run(str(model), load_recipe("toy", TINY_RUN + FAST), data_spec="natural", output=out, progress=False)


def test_what_the_end_needs_is_checked_before_training(world, tmp_path, monkeypatch):
    """A problem the final save would meet (here: class names that do not fit the head) stops the run before any
    training step."""
    import castle_convert.run as run_module
    from castle_convert.export.save import ExportError
    from test_hostile import _run

    def no_training(*a, **k):
        raise AssertionError("training started before the end's checks")
    monkeypatch.setattr(run_module, "distill", no_training)
    real = run_module.check_savable
    monkeypatch.setattr(run_module, "check_savable", lambda m, p, **k: real(m, p, **{**k, "labels": ["a", "b"]}))
    with pytest.raises(ExportError, match=r"labels has 2 names but the model's head has 3 classes"):
        _run(world, tmp_path / "out", FAST)
    assert not (tmp_path / "out").exists()


# -- eval identifies the teacher unambiguously (item 2) -------------------------------------------------

def _tiny_timm(seed: int):
    import timm

    from test_hostile import TINY_ARGS
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", **TINY_ARGS).eval()


def _timm_folder(model, folder: Path) -> Path:
    from timm.models._hub import save_for_hf

    from test_hostile import TINY_ARGS
    save_for_hf(model, str(folder), model_args=TINY_ARGS, safe_serialization=True)
    return folder


@pytest.fixture
def converted_from_folder(tmp_path):
    """An output directory converted from the local timm folder ``here/teacher``, recorded as the main job records
    it; ``elsewhere/teacher``: another model of the same name."""
    import castle_convert as cc
    from castle_convert.models import load_model, teacher_record
    teacher_dir = _timm_folder(_tiny_timm(0), tmp_path / "here" / "teacher")
    teacher = load_model(str(teacher_dir))
    record = teacher_record(str(teacher_dir), None, teacher)
    out = tmp_path / "out"
    cc.save_pretrained(cc.finalize(cc.convert(teacher), force=True), out, source={"model": "teacher",
                                                                                  "teacher": record})
    _timm_folder(_tiny_timm(1), tmp_path / "elsewhere" / "teacher")
    return out, record


def _eval(out: Path, *extra: str) -> list[str]:
    return ["eval", str(out), "--data", "natural", "--resolutions", "32", "--max-images", "2", "--no-latency",
            "--no-progress", *extra]


def test_recorded_teacher_is_unambiguous(world, tmp_path):
    from castle_convert.models import load_model, teacher_record
    teacher = load_model(str(world["teacher"]))
    rec = teacher_record(str(world["teacher"]), None, teacher)
    assert rec["kind"] == "path" and rec["name"] == "teacher" and rec["fingerprint"].startswith("sha256:")
    assert str(tmp_path) not in json.dumps(rec)                               # no local path is published
    assert teacher_record("fmnist_vit", None, teacher)["kind"] == "builtin"
    assert teacher_record("test_vit", None, teacher)["kind"] == "timm"
    other = load_model(str(_timm_folder(_tiny_timm(1), tmp_path / "other")))
    assert teacher_record(str(tmp_path / "other"), None, other)["fingerprint"] != rec["fingerprint"]


@pytest.mark.parametrize("where, pattern", [
    ("elsewhere", r"teacher is not the teacher .*out was converted from: its weights' fingerprint is sha256:.*, the "
                  r"recorded one sha256:.*pass that model with --teacher"),
    ("nowhere", r"out was converted from a local model, 'teacher', which is not in the current folder: pass "
                r"--teacher MODEL"),
])
def test_eval_refuses_another_model_of_the_same_name(converted_from_folder, wallpapers, tmp_path, monkeypatch,
                                                     where, pattern):
    """Run from a folder holding another model named like the teacher: refused in one line (it was silently
    compared against that model); from the teacher's own folder it runs."""
    from click.testing import CliRunner

    from castle_convert.cli import main
    out, _ = converted_from_folder
    (tmp_path / "nowhere").mkdir()
    monkeypatch.chdir(tmp_path / where)
    r = CliRunner().invoke(main, _eval(out))
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert re.search(pattern, _error_line(r.output)), r.output
    monkeypatch.chdir(tmp_path / "here")
    ok = CliRunner().invoke(main, _eval(out))
    assert ok.exit_code == 0 and "patch cos" in ok.output, ok.output


def test_eval_checks_an_explicit_teacher_too(converted_from_folder, wallpapers, tmp_path):
    from click.testing import CliRunner

    from castle_convert.cli import main
    out, _ = converted_from_folder
    r = CliRunner().invoke(main, _eval(out, "--teacher", str(tmp_path / "elsewhere" / "teacher")))
    assert r.exit_code == 1 and re.search(r"is not the teacher .* was converted from", _error_line(r.output))
    ok = CliRunner().invoke(main, _eval(out, "--teacher", str(tmp_path / "here" / "teacher")))
    assert ok.exit_code == 0, ok.output


def test_eval_loads_a_recorded_timm_name_never_a_folder_of_that_name(world, wallpapers, tmp_path, monkeypatch):
    """A teacher recorded as the timm name test_vit is loaded from timm even where ./test_vit is another model."""
    import castle_convert as cc
    import castle_convert.models as models
    from click.testing import CliRunner

    from castle_convert.cli import main
    teacher = _tiny_timm(0)
    out = tmp_path / "out"
    cc.save_pretrained(cc.finalize(cc.convert(teacher), force=True), out, source={
        "model": "test_vit", "teacher": {"kind": "timm", "name": "test_vit", "fingerprint": "sha256:0"}})
    _timm_folder(_tiny_timm(1), tmp_path / "test_vit")
    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr(models, "load_timm_name", lambda name, pretrained=True, **k: asked.append(name) or teacher)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail(f"loaded {a} as a path"))
    r = CliRunner().invoke(main, _eval(out))
    assert r.exit_code == 0 and asked == ["test_vit"], r.output


# -- eval makes only what is asked, refuses what does not fit (item 3) -------------------------------------

def test_eval_makes_only_the_views_asked_for_one_at_a_time(wallpapers, monkeypatch):
    from castle_convert import fidelity, natural
    loads = []
    real = natural._load
    monkeypatch.setattr(natural, "_load", lambda src: loads.append(src.name) or real(src))
    views = natural.iter_held_out_views(64, max_images=2)
    first = next(views)
    assert first.shape == (64, 64, 3) and len(loads) == 1                  # the first view before the second photo
    assert len(list(views)) == 1 and len(loads) == 2
    loads.clear()
    assert len(natural.held_out_views(32)) == 30 and len(loads) == 6          # every photo decoded once
    teacher = _tiny_timm(0)
    sizes = [len(x) for x, _ in fidelity.eval_batches("natural", teacher, 32, max_images=5, batch_size=2)]
    assert sizes == [2, 2, 1]


def _converted_pair():
    import castle_convert as cc
    teacher = _tiny_timm(0)
    return teacher, cc.finalize(cc.convert(teacher), force=True)


def test_eval_refuses_a_size_the_machine_cannot_hold_before_work(world, wallpapers, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import castle_convert as cc
    from castle_convert import fidelity
    from castle_convert.cli import main
    teacher, student = _converted_pair()
    out = cc.save_pretrained(student, tmp_path / "out")
    monkeypatch.setattr(fidelity, "available_memory", lambda device="cpu": 2 * 2 ** 30)
    monkeypatch.setattr(fidelity, "eval_batches", lambda *a, **k: pytest.fail("images were made"))
    r = CliRunner().invoke(main, ["eval", str(out), "--teacher", str(world["teacher"]), "--resolutions", "32,16384",
                                  "--max-images", "1", "--no-progress"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    line = _error_line(r.output)
    assert re.search(r"resolution 16384 px needs about [\d.]+ GiB for one image, more than the 2\.0 GiB of memory "
                     r"available on cpu: use at most \d+ px \(or free memory\)", line), line
    fits = int(re.search(r"at most (\d+) px", line).group(1))
    assert fits % 8 == 0 and fidelity.bytes_per_image(teacher, fits) <= 0.8 * 2 * 2 ** 30 \
        < fidelity.bytes_per_image(teacher, fits + 8)


def test_eval_batch_shrinks_to_what_fits(wallpapers, monkeypatch):
    from castle_convert import fidelity
    teacher, student = _converted_pair()
    one = fidelity.bytes_per_image(teacher, 64)
    monkeypatch.setattr(fidelity, "available_memory", lambda device="cpu": int(2.6 * one / 0.8))
    seen = []
    real = fidelity.compare_batches

    def recording(t, s, batches, bar=None):
        return real(t, s, (seen.append(len(x)) or (x, y) for x, y in batches), bar=bar)
    monkeypatch.setattr(fidelity, "compare_batches", recording)
    r = fidelity.measure(teacher, student, "natural", [64], max_images=5, latency=False, progress=False)
    assert r.rows[0].images == 5 and max(seen) == 2 and sum(seen) == 5


def test_eager_attention_counts_its_attention_matrix():
    from castle_convert import fidelity
    teacher = _tiny_timm(0)
    fused = fidelity.bytes_per_image(teacher, 256)
    for m in teacher.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    n = (256 // 8) ** 2 + 1
    assert fidelity.bytes_per_image(teacher, 256) - fused == 2 * 2 * n * n * 4     # 2 heads, scores + softmax


def test_recipe_resolution_the_machine_cannot_hold_is_refused_before_the_probe(world, tmp_path, monkeypatch):
    """data.resolution=65536: one probe image alone is 51 GB; refused in one line naming the largest that fits."""
    from castle_convert import fidelity
    monkeypatch.setattr(fidelity, "available_memory", lambda device="cpu": 2 * 2 ** 30)
    assert_one_line_error(Case("recipe-resolution-too-large", lambda w, t: _distill(w, t, sets=[
        "data.resolution=65536"]), r"recipe 'toy': data\.resolution 65536 px needs about [\d.]+ GiB for one image, "
                                   r"more than the 2\.0 GiB of memory available on cpu: use at most --set "
                                   r"data\.resolution=\d+ \(or free memory\)", output="out"), world, tmp_path)


# -- published files hold no local paths (item 10) -------------------------------------------------------

def test_published_files_hold_no_local_paths(world, tmp_path):
    """The model and data given as absolute paths (and the fidelity block on the run's own validation split):
    report.json, recipe.yaml, config.json, README.md and the weights' metadata name them by their last component
    only (report.json held the absolute paths, and push uploads it)."""
    from safetensors import safe_open

    from test_hostile import _run
    out = tmp_path / "out"
    _run(world, out, ["data.max_train_samples=8", "fidelity.data=val", "fidelity.resolutions=32",
                      "fidelity.max_images=2", "fidelity.latency=false"])
    root = str(world["root"])
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "teacher" and report["dataset"] == "images" and report["fidelity"]["data"] == "images"
    for name in ("report.json", "recipe.yaml", "config.json", "README.md"):
        text = (out / name).read_text()
        assert root not in text and str(tmp_path) not in text, name
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert root not in json.dumps(f.metadata())


def test_public_recipe_cuts_local_paths(tmp_path):
    import yaml

    from castle_convert.recipes import load_recipe
    from castle_convert.run import public_name, public_recipe
    r = load_recipe("toy", [f"transfer.load_from={tmp_path}/old.run/stage1", f"model={tmp_path}/teacher",
                            f"data.name={tmp_path}/imagenet"])
    published = yaml.safe_load(public_recipe(r))
    assert published["transfer"]["load_from"] == "stage1" and published["model"] == "teacher"
    assert published["data"]["name"] == "imagenet" and str(tmp_path) not in public_recipe(r)
    assert [public_name(x) for x in ("deit_small", "natural", "hf:owner/set", "fashion-mnist", "~/data/x")] == \
        ["deit_small", "natural", "hf:owner/set", "fashion-mnist", "x"]


# -- the output lock never writes through a link (item 6) -----------------------------------------------

def _victim(tmp: Path) -> Path:
    v = tmp / "precious.txt"
    v.write_text("precious")
    return v


def _lock_is(kind: str):
    def make(w, t):
        lock, victim = t / ".out.lock", _victim(t)
        if kind == "symlink":
            lock.symlink_to(victim)
        elif kind == "dangling":
            lock.symlink_to(t / "not-yet")
        elif kind == "hardlink":
            os.link(victim, lock)
        else:
            lock.mkdir()
        return _distill(w, t)
    return make


CASES += [
    Case("lock-symlink", _lock_is("symlink"), r"the output lock .*\.out\.lock is a symbolic link: castle-convert never "
         r"writes through it; remove it"),
    Case("lock-dangling-symlink", _lock_is("dangling"), r"\.out\.lock is a symbolic link"),
    Case("lock-hardlink", _lock_is("hardlink"), r"\.out\.lock is a hard link \(2 names of one file\)"),
    Case("lock-directory", _lock_is("directory"), r"\.out\.lock cannot be opened \(Is a directory\)"),
]


@pytest.mark.parametrize("kind", ["symlink", "dangling", "hardlink"])
def test_lock_link_is_never_written_through(world, tmp_path, kind):
    """The lock's PID was written through a link at the lock path, over the file it pointed to."""
    import castle_convert as cc
    from castle_convert.export.save import OutputExistsError
    _lock_is(kind)(world, tmp_path)
    with pytest.raises(OutputExistsError, match="never writes through it") as err:
        cc.save_pretrained(cc.load(world["published"]), tmp_path / "out")
    assert len(str(err.value).splitlines()) == 1
    assert (tmp_path / "precious.txt").read_text() == "precious" and not (tmp_path / "not-yet").exists()
    assert not (tmp_path / "out").exists()


def test_links_in_the_logs_are_copied_as_links(world, tmp_path):
    import castle_convert as cc
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "events").write_text("x")
    (logs / "shadow").symlink_to(_victim(tmp_path))
    out = cc.save_pretrained(cc.load(world["published"]), tmp_path / "out", extra_files={"logs": logs})
    assert (out / "logs" / "shadow").is_symlink() and (out / "logs" / "events").read_text() == "x"


# -- --overwrite replaces only what castle-convert wrote (item 7) -----------------------------------------

def test_overwrite_keeps_and_names_the_files_castle_convert_did_not_write(world, tmp_path):
    """notes, an evaluation folder, a link: kept as they were (and named); castle-convert's own files replaced,
    those the new save does not write (report.json here) removed (were: every file deleted)."""
    import castle_convert as cc
    model = cc.load(world["published"])
    out = cc.save_pretrained(model, tmp_path / "out", report={"note": "first"})
    (out / "notes.txt").write_text("my notes")
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text('{"top1": 80}')
    (out / "link").symlink_to(_victim(tmp_path))
    (out / ".hidden").write_text("h")
    before = (out / "model.safetensors").stat().st_ino
    with pytest.warns(UserWarning, match=r"replaced castle-convert's files and kept the 4 it did not write: \.hidden, "
                                         r"eval, link, notes\.txt"):
        cc.save_pretrained(model, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "my notes" and (out / ".hidden").read_text() == "h"
    assert json.loads((out / "eval" / "results.json").read_text()) == {"top1": 80}
    assert (out / "link").is_symlink() and (out / "link").read_text() == "precious"
    assert (out / "model.safetensors").stat().st_ino != before and not (out / "report.json").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_overwrite_failing_keeps_the_previous_output_whole(world, tmp_path, monkeypatch):
    import castle_convert as cc
    import castle_convert.export.save as save
    from castle_convert.export.save import ExportError
    model = cc.load(world["published"])
    out = cc.save_pretrained(model, tmp_path / "out")
    (out / "notes.txt").write_text("my notes")
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(save, "_link_or_copy", full)
    with pytest.raises(ExportError, match="No space left on device"):
        cc.save_pretrained(model, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "my notes" and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".out.*"))


# -- padded batches: a mask and grids that disagree are refused (item 5) ---------------------------------

def _siglip2_padded():
    from test_naflex import _siglip2_batch
    return _siglip2_batch()[1]


def _disagree(how: str, batch):
    pixels, mask, shapes = (t.clone() for t in batch)
    if how == "grid-smaller":              # the DW term silently skipped real patches
        shapes[0, 1] -= 1
    elif how == "grid-larger":             # it read padding as patches
        shapes[1, 0] += 1
    elif how == "mask-all-ones":
        mask = torch.ones_like(mask)
    elif how == "mask-gap":                # as many real patches as the grid, not the first ones
        n = int(mask[1].sum())
        mask[1] = 0
        mask[1, 1:n + 1] = 1
    else:                                  # a grid of zero rows
        shapes[2, 0] = 0
    return pixels, mask, shapes


@pytest.mark.parametrize("how", ["grid-smaller", "grid-larger", "mask-all-ones", "mask-gap", "grid-zero"])
@pytest.mark.parametrize("route", ["convert", "finalized", "cc.load", "remote code"])
def test_siglip2_mask_and_grids_that_disagree_are_refused(tmp_path, how, route):
    """spatial_shapes that disagree with pixel_attention_mask: a one-line error on every route (was: an output),
    as timm naflexvit's patch_coord / patch_valid already were; the batch as the processor gives it still runs."""
    import castle_convert as cc
    from castle_convert.export.load import read_safetensors
    from castle_convert.export.save import hub_model
    from test_naflex import SIGLIP2
    model = cc.convert(SIGLIP2.build())
    if route != "convert":
        model = cc.finalize(model, force=True)
    if route in ("cc.load", "remote code"):
        out = cc.save_pretrained(model, tmp_path / "out")
        model = cc.load(out) if route == "cc.load" else hub_model(
            json.loads((out / "config.json").read_text()), read_safetensors(out / "model.safetensors")[0])
    model.eval()
    batch = _siglip2_padded()
    with torch.no_grad():
        model(*batch)
        with pytest.raises(ValueError, match=r"SigLIP2 with castling attention: image \d of this batch has "
                                             r"spatial_shapes \d+x\d+ \(\d+ patches\) but its pixel_attention_mask "
                                             r"marks \d+ of \d+ positions real.*as the image processor gives them") as e:
            model(*_disagree(how, batch))
    assert len(str(e.value).splitlines()) == 1


# -- a published config.json is untrusted input, on every route (item 4) ---------------------------------

@pytest.fixture(scope="module")
def tiny_published(tmp_path_factory):
    """A published timm-source directory (remote code included) of a tiny 2-block ViT (about 130 KB of weights)."""
    import castle_convert as cc
    d = tmp_path_factory.mktemp("tiny") / "pub"
    cc.save_pretrained(cc.finalize(cc.convert(_tiny_timm(0)), force=True), d)
    return d


def _edited(src: Path, dst: Path, edit) -> Path:
    d = _copy(src, dst)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _set(path: str, value):
    def edit(cfg):
        node = cfg
        *parents, key = path.split(".")
        for p in parents:
            node = node[p]
        node[key] = value
    return edit


def _edit_metadata(d: Path, edit) -> None:
    """The same edit of the config copy in the weights' metadata (what the timm route reads)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    inner = json.loads(meta["castle_convert"])
    edit(inner)
    meta["castle_convert"] = json.dumps(inner)
    save_file(load_file(str(d / "model.safetensors")), str(d / "model.safetensors"), metadata=meta)


BAD_CONFIGS = [
    ("castling.eps", float("nan"), r"castling\.eps=nan is invalid: use a small positive number"),
    ("castling.eps", -1e-6, r"castling\.eps=-1e-06 is invalid"),
    ("castling.dw_kernel", -3, r"castling\.dw_kernel=-3 is invalid: use a positive odd integer"),
    ("castling.dw_kernel", 4, r"castling\.dw_kernel=4 is invalid"),
    ("castling.ref_tokens", -5, r"castling\.ref_tokens=-5 is invalid"),
    ("castling.combine", "product", r"castling\.combine='product' is invalid: choose one of"),
    ("source.model_args.depth", -1, r"source\.model_args\.depth=-1 is invalid: use an integer >= 1"),
    ("source.model_args.depth", 10 ** 6, r"source\.model_args\.depth=1000000 is invalid: it is larger than the weights "
                                        r"file's tensor count \(\d+\)"),
    ("source.model_args.embed_dim", 10 ** 9, r"embed_dim=1000000000 is invalid: it is larger than the weights file's "
                                            r"element count"),
    ("source.model_args.num_heads", "2", r"num_heads='2' is invalid: use an integer >= 1"),
    ("source.model_args.img_size", [32, -32], r"img_size=\[32, -32\] is invalid"),
    ("source.model_args.mlp_ratio", float("inf"), r"mlp_ratio=inf is invalid"),
    ("converted_modules", ["blocks.0.attn", "blocks.0.attn"], r"converted_modules is invalid: a module path is listed "
                                                              r"twice"),
    ("source.architecture", "HF-HUB:someone/evil", r"source\.architecture names weights to load or fetch"),
    ("source.architecture", "Local-Dir:/tmp/x", r"source\.architecture names weights to load or fetch"),
    ("source.architecture", "hf_hub:someone/evil", r"source\.architecture names weights to load or fetch"),
    ("source.architecture", "timm/vit_tiny_patch16_224", r"source\.architecture names weights to load or fetch"),
]


@pytest.mark.parametrize("field, value, pattern", BAD_CONFIGS, ids=[f"{f}={v!r}"[:48] for f, v, _ in BAD_CONFIGS])
@pytest.mark.parametrize("route", ["cc.load", "timm", "remote code"])
def test_invalid_published_config_is_refused_on_every_route(tiny_published, tmp_path, monkeypatch, route, field, value,
                                                            pattern):
    """NaN epsilon, negative or huge counts, names that read other files: refused in one line by the one validation
    (castling_checks.py) before anything is built — on castle-convert's routes and in the remote code (which accepted
    them and built a model)."""
    import timm

    import castle_convert as cc
    load_module = importlib.import_module("castle_convert.export.load")   # (the package exports load())
    d = _edited(tiny_published, tmp_path / "pub", _set(field, value))
    _edit_metadata(d, _set(field, value))
    built = []
    real = load_module.build_converted
    monkeypatch.setattr(load_module, "build_converted",
                        lambda c, device="cpu": built.append(device) or real(c, device=device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=pattern) as err:
            if route == "cc.load":
                cc.load(d)
            elif route == "timm":
                timm.create_model(f"local-dir:{d}", pretrained=True)
            else:
                from transformers import AutoModelForImageClassification
                AutoModelForImageClassification.from_pretrained(d, trust_remote_code=True)
    assert len(str(err.value).splitlines()) == 1 and not built


@pytest.mark.parametrize("route", ["cc.load", "timm"])
def test_sizes_are_compared_with_the_weights_before_anything_is_allocated(tiny_published, tmp_path, monkeypatch, route):
    """A width within the file's bounds but not the file's (embed_dim 2048 for a width-32 file): the architecture is
    built on the meta device only, compared with the file's shapes, and refused (was: built for real, 0.8 GB here,
    gigabytes for larger edits, before the shapes were compared)."""
    import timm

    import castle_convert as cc
    load_module = importlib.import_module("castle_convert.export.load")   # (the package exports load())
    d = _edited(tiny_published, tmp_path / "pub", _set("source.model_args.embed_dim", 2048))
    _edit_metadata(d, _set("source.model_args.embed_dim", 2048))
    built = []
    real = load_module.build_converted
    monkeypatch.setattr(load_module, "build_converted",
                        lambda c, device="cpu": built.append(device) or real(c, device=device))
    with pytest.raises(cc.CheckpointError, match=r"model\.safetensors does not fit the architecture in its config: "
                                                 r"\d+ with another shape \(e\.g\. .*\(1, 1, 32\) in the file, "
                                                 r"\(1, 1, 2048\) in the model\)") as err:
        cc.load(d) if route == "cc.load" else timm.create_model(f"local-dir:{d}", pretrained=True)
    assert built == ["meta"] and len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("depth, says", [(1, r"fit nothing in the model \(e\.g\. blocks\.1\."),
                                         (3, r"of the model's weights are not in it \(e\.g\. blocks\.2\.")])
def test_remote_code_refuses_weights_that_leave_layers_random(tiny_published, tmp_path, depth, says):
    """timm_vit.depth edited: transformers only warned and loaded 1 of 2 blocks, or a third block at random."""
    from transformers import AutoModelForImageClassification
    d = _edited(tiny_published, tmp_path / "pub", _set("timm_vit.depth", depth))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"the weights do not fit the architecture config\.json describes: .*" + says):
            AutoModelForImageClassification.from_pretrained(d, trust_remote_code=True)


@pytest.mark.parametrize("case", [
    Case("pub-config-nan-eps", lambda w, t: ["export-onnx", str(_edited(w["published"], t / "pub", _set(
        "castling.eps", float("nan")))), "-o", str(t / "m.onnx")], r"config\.json: castling\.eps=nan is invalid"),
    Case("pub-config-huge-depth", lambda w, t: ["bench", str(_edited(w["published"], t / "pub", _set(
        "source.model_args.depth", 10 ** 7))), "--resolutions", "32"], r"depth=10000000 is invalid"),
    Case("pub-config-inspect-huge-width", lambda w, t: ["inspect", str(_edited(w["published"], t / "pub", _set(
        "source.model_args.embed_dim", 10 ** 9)))], r"embed_dim=1000000000 is invalid"),
    Case("pub-push-invalid-config", lambda w, t: ["push", str(_edited(w["published"], t / "pub", _set(
        "castling.dw", "3d"))), "--repo", "me/x", "--dry-run"], r"castling\.dw='3d' is invalid"),
], ids=lambda c: c.id)
def test_invalid_published_config_through_the_cli_is_one_line(world, tmp_path, case):
    assert_one_line_error(case, world, tmp_path)


def _huge_config(d: Path) -> None:
    with open(d / "config.json", "r+b") as f:                       # a sparse 40 MB file: nothing is really written
        f.truncate(40 << 20)


@pytest.mark.parametrize("case", [
    Case("pub-processor-garbage", lambda w, t: ["export-onnx", str(_garbage_processor(w, t)), "-o", str(t / "m.onnx")],
         r"preprocessor_config\.json is not valid JSON"),
    Case("pub-config-huge", lambda w, t: ["export-onnx", str((lambda d: (_huge_config(d), d)[1])(
        _copy(w["published"], t / "pub"))), "-o", str(t / "m.onnx")],
         r"config\.json is 41943040 bytes, more than a castle-convert JSON file can be"),
    Case("pub-report-wrong-types", lambda w, t: ["push", str((lambda d: ((d / "report.json").write_text(
        '{"teacher": [1], "params": [2], "macs": 3, "epochs": "x"}'), d)[1])(_copy(w["published"], t / "pub"))),
        "--repo", "me/x", "--dry-run"], r"(report\.json|model card of .*pub cannot be rendered)"),
], ids=lambda c: c.id)
def test_published_json_files_are_untrusted_too(world, tmp_path, case):
    assert_one_line_error(case, world, tmp_path)


def _garbage_processor(w, t) -> Path:
    """A transformers-source directory (its preprocessor_config.json is read at load) with a garbage processor file."""
    import castle_convert as cc
    from transformers import ViTForImageClassification
    d = cc.save_pretrained(cc.finalize(cc.convert(ViTForImageClassification.from_pretrained(w["hf_vit"])), force=True),
                           t / "pub")
    (d / "preprocessor_config.json").write_text("{garbage")
    return d


def test_every_castling_field_has_a_rule():
    """A new CastlingConfig field needs its rule in castling_checks.CASTLING_FIELDS (the remote code's copy too)."""
    from castle_convert.config import CastlingConfig
    from castle_convert.export.hub.castling_checks import CASTLING_FIELDS
    missing = sorted(set(CastlingConfig.field_names()) - set(CASTLING_FIELDS))
    assert not missing, f"add a rule for {missing} to castle_convert/export/hub/castling_checks.py CASTLING_FIELDS"
    for name, value in CastlingConfig().to_dict().items():               # the defaults pass their own rules
        assert CASTLING_FIELDS[name](value, None) is None, name


def test_published_checks_are_one_stdlib_file_shared_by_every_route(tiny_published):
    import ast

    from castle_convert.export.hub import castling_checks
    from castle_convert.export.save import HUB_FILES
    src = Path(castling_checks.__file__)
    assert HUB_FILES["castling_checks.py"] == src
    assert (tiny_published / "castling_checks.py").read_bytes() == src.read_bytes()        # verbatim
    imported = {a.name.split(".")[0] for n in ast.walk(ast.parse(src.read_text())) if isinstance(n, ast.Import)
                for a in n.names} | {n.module.split(".")[0] for n in ast.walk(ast.parse(src.read_text()))
                                     if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"json", "math", "os", "typing"}, imported
    layers = (tiny_published / "castling_layers.py").read_text()
    assert "from .castling_checks import" in layers and "check_config(" in layers


def test_valid_published_directories_still_load_everywhere(tiny_published):
    import timm
    from transformers import AutoModelForImageClassification

    import castle_convert as cc
    x = torch.randn(2, 3, 32, 32)
    ref = cc.load(tiny_published)
    with torch.no_grad():
        for model in (timm.create_model(f"local-dir:{tiny_published}", pretrained=True).eval(),
                      AutoModelForImageClassification.from_pretrained(tiny_published, trust_remote_code=True).eval()):
            out = model(x)
            assert torch.equal(getattr(out, "logits", out), ref(x))


# -- the natural-image cache (item 9) -----------------------------------------------------------------

def _cache_file(root: Path) -> Path:
    files = sorted((root / "cache" / "natural").glob("train-*.npy"))
    assert len(files) == 1, files
    return files[0]


def _truncate_half(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[-7] ^= 0xFF
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, says", [
    ("truncated", r"ValueError"),
    ("empty", r"(ValueError|EOFError|OSError)"),
    ("garbage", r"ValueError"),
    ("wrong-shape", r"shape \(5, 8, 8, 3\), not uint8 \(12, 32, 32, 3\)"),
    ("float", r"float32 array"),
    ("one-byte-changed", r"checksum does not match"),
    ("no-checksum", r"checksum file is missing"),
    ("a-link", r"not a regular file"),
])
def test_damaged_cache_is_made_again(wallpapers, capsys, tmp_path, damage, says):
    """Every damaged cache file is detected when read and made again (was: a traceback on every later run, or
    silent training on the wrong images)."""
    from castle_convert import natural
    first = np.array(natural.training_images(n=12, size=32, seed=2, progress=False))
    f = _cache_file(wallpapers)
    if damage == "truncated":
        _truncate_half(f)
    elif damage == "empty":
        f.write_bytes(b"")
    elif damage == "garbage":
        f.write_bytes(os.urandom(4096))
    elif damage == "wrong-shape":
        np.save(f, np.zeros((5, 8, 8, 3), np.uint8))
    elif damage == "float":
        np.save(f, np.zeros((12, 32, 32, 3), np.float32))
    elif damage == "one-byte-changed":
        _flip_byte(f)
    elif damage == "no-checksum":
        f.with_suffix(".sha1").unlink()
    else:
        other = tmp_path / "elsewhere.npy"
        f.rename(other)
        f.symlink_to(other)
    capsys.readouterr()
    again = natural.training_images(n=12, size=32, seed=2, progress=True)
    out = capsys.readouterr().out
    assert re.search(rf"the cache file {re.escape(f.name)} is damaged \(.*{says}.*\): making it again", out), out
    assert np.array_equal(np.asarray(again), first) and not f.is_symlink()
    assert natural._read_cache(f, (12, 32, 32, 3))[1] is None        # sound again


@pytest.mark.parametrize("fault", ["disk-full", "killed"])
def test_failed_cache_write_leaves_no_temporary_file(wallpapers, monkeypatch, fault):
    import errno

    from castle_convert import natural
    real = np.save

    def failing_save(f, arr, *a, **k):
        real(f, arr[: len(arr) // 2], *a, **k)                       # half written, then the fault
        if fault == "disk-full":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "save", failing_save)
    if fault == "disk-full":
        with pytest.raises(natural.NaturalDataError, match=r"cannot write the natural-image cache .*\.npy \(No space "
                                                           r"left on device\): free space there or set CASTLE_CACHE") as e:
            natural.training_images(n=12, size=32, progress=False)
        assert len(str(e.value).splitlines()) == 1
    else:
        with pytest.raises(KeyboardInterrupt):
            natural.training_images(n=12, size=32, progress=False)
    assert list((wallpapers / "cache" / "natural").iterdir()) == []


def test_temporary_files_of_killed_writes_are_removed(wallpapers):
    """A write killed by SIGKILL leaves its temporary file: the next use removes it (not one of a live process)."""
    from castle_convert import natural
    folder = wallpapers / "cache" / "natural"
    folder.mkdir(parents=True)
    dead = folder / ".train-999999-abc.npy"
    dead.write_bytes(b"x" * 1000)
    live = folder / f".train-{os.getppid()}-live.npy"
    live.write_bytes(b"x")
    natural.training_images(n=12, size=32, progress=False)
    assert not dead.exists() and live.exists()


def test_natural_images_that_do_not_fit_are_refused_before_work(wallpapers, monkeypatch):
    from castle_convert import natural, runtime
    monkeypatch.setattr(natural, "_make_training_images", lambda *a, **k: pytest.fail("images were made"))
    monkeypatch.setattr(runtime, "available_memory", lambda device="cpu": 2 ** 30)
    with pytest.raises(natural.NaturalDataError, match=r"100000 natural training images at 224 px need 14\.0 GiB of "
                                                       r"memory, more than the 1\.0 GiB available: use at most --set "
                                                       r"data\.max_train_samples=5706$"):
        natural.training_images(n=100_000, size=224, progress=False)
    monkeypatch.setattr(runtime, "available_memory", lambda device="cpu": 2 ** 50)
    with pytest.raises(natural.NaturalDataError, match=r"need [\d.]+ GiB in the cache .* GiB free: free space there"):
        natural.training_images(n=10 ** 9, size=224, progress=False)


def _natural_run(w, t):
    return _distill(w, t, data="natural", sets=["data.max_train_samples=8"])


def _cache_is(kind):
    def make(w, t):
        target = t / "cachedir"
        if kind == "file":
            target.write_text("x")
        elif kind == "dangling":
            target.symlink_to(t / "nowhere")
        elif kind == "read-only":
            target.mkdir()
            target.chmod(0o555)
        return _natural_run(w, t)
    return make


@pytest.mark.parametrize("case", [
    Case("natural-no-packages", lambda w, t: _natural_run(w, t),
         r"--data natural needs the Debian wallpaper packages .*apt-get install -y mate-backgrounds", output="out"),
    Case("natural-cache-is-a-file", _cache_is("file"),
         r"cannot write the natural-image cache .*cachedir/natural \(.*cachedir is a file, not a directory\): set "
         r"CASTLE_CACHE", output="out"),
    Case("natural-cache-dangling-link", _cache_is("dangling"),
         r"cannot write the natural-image cache .*\(.*cachedir is a symbolic link to nothing\)", output="out"),
    pytest.param(Case("natural-cache-read-only", _cache_is("read-only"),
                      r"cannot write the natural-image cache .*\(Permission denied\): set CASTLE_CACHE", output="out"),
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")),
], ids=lambda c: c.id)
def test_natural_data_problems_are_one_line(world, tmp_path, monkeypatch, request, case):
    """Missing packages and unwritable caches: one line (was: the good message inside a traceback)."""
    from castle_convert import natural
    if case.id == "natural-no-packages":
        monkeypatch.setattr(natural, "ROOTS", (str(tmp_path / "nothing"),))
    else:
        request.getfixturevalue("wallpapers")
        monkeypatch.setenv("CASTLE_CACHE", str(tmp_path / "cachedir"))
    try:
        assert_one_line_error(case, world, tmp_path)
    finally:
        (tmp_path / "cachedir").chmod(0o755) if (tmp_path / "cachedir").is_dir() else None


# -- the CLI corpus of this round (CASES, collected above and below) ---------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_bad_input_is_one_line(case: Case, world, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_one_line_error(case, world, tmp_path)
