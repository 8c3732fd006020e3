"""Hostile input and faults, third round (issue 18): the checkpoints, images and runs users really have.

Same assertions as ``test_hostile.py``: a CLI case exits with one ``Error: ...`` line naming the problem
(no traceback, nothing complete-looking written); a case that has a right answer checks the answer.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from castle_convert.data import DataError, load_image_folder
from test_hostile import Case, _copy, _distill, _pickle_ckpt, assert_one_line_error, world  # noqa: F401 - world is a fixture


# -- image folders (items 3, 12, 15) --------------------------------------------------------------

def _images(w, tmp) -> Path:
    return _copy(w["images"], tmp / "imgs")


def _grey(value, dtype, mode=None) -> Image.Image:
    return Image.fromarray(np.full((32, 32), value, dtype=dtype), mode=mode)


def test_16bit_and_float_images_are_scaled_not_clipped(world, tmp_path):
    d = _images(world, tmp_path)
    _grey(32768, np.uint16).save(d / "train" / "class_0" / "g16.png")           # mid-grey in 16 bits
    _grey(0.5, np.float32).save(d / "train" / "class_0" / "f32.tif")            # mid-grey as float
    _grey(40000, np.int32).save(d / "train" / "class_0" / "i32.tif")            # 16-bit values in an int image
    train, _, _ = load_image_folder(d)
    got = {Path(p).name: np.asarray(train[i][0]) for i, (p, _) in enumerate(train.samples)}
    assert got["g16.png"].shape == (32, 32, 3) and abs(int(got["g16.png"].mean()) - 128) <= 1   # was 255 (white)
    assert abs(int(got["f32.tif"].mean()) - 128) <= 1                                            # was 0 (black)
    assert abs(int(got["i32.tif"].mean()) - 156) <= 1


@pytest.mark.parametrize("name, image, pattern", [
    ("hdr.tif", lambda: _grey(3.5, np.float32), r"hdr\.tif is a float image with values in \[3\.5, 3\.5\]"),
    ("nan.tif", lambda: _grey(np.nan, np.float32), r"nan\.tif is a float image"),
    ("big.tif", lambda: _grey(1 << 20, np.int32), r"big\.tif is a 32-bit integer image"),
])
def test_images_of_unknown_scale_are_refused(world, tmp_path, name, image, pattern):
    d = _images(world, tmp_path)
    image().save(d / "train" / "class_1" / name)
    train, _, _ = load_image_folder(d)
    i = next(i for i, (p, _) in enumerate(train.samples) if p.endswith(name))
    with pytest.raises(DataError, match=pattern + r".*8-bit") as err:
        train[i]
    assert len(str(err.value).splitlines()) == 1


def test_exif_orientation_is_honoured(world, tmp_path):
    d = _images(world, tmp_path)
    img = Image.fromarray(np.zeros((16, 32, 3), dtype=np.uint8))               # stored 32 wide, 16 high
    exif = img.getexif()
    exif[0x0112] = 6                                                            # display rotated 90°: 16 wide
    img.save(d / "train" / "class_2" / "phone.jpg", exif=exif)
    train, _, _ = load_image_folder(d)
    i = next(i for i, (p, _) in enumerate(train.samples) if p.endswith("phone.jpg"))
    assert train[i][0].size == (16, 32)


def test_links_hidden_and_special_files_are_not_samples(world, tmp_path):
    """A link loop inside a class folder, links out of the tree and back into it, a FIFO named x.png, hidden
    folders: the 24 real images, each with its own label (torchvision's ImageFolder made 984 samples)."""
    d = _images(world, tmp_path)
    outside = _copy(world["images"] / "val", tmp_path / "elsewhere")
    train = d / "train"
    (train / "class_0" / "loop").symlink_to(train)                              # back into the tree: a loop
    (train / "class_1" / "outside").symlink_to(outside)                         # out of the tree
    (train / "class_2" / "dup.png").symlink_to(train / "class_0" / "0.png")      # a file back into the tree
    (train / "linked_class").symlink_to(outside / "class_0")                    # a class folder that is a link
    os.mkfifo(train / "class_0" / "x.png")                                      # reading it would hang
    hidden = train / ".ipynb_checkpoints"
    hidden.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(hidden / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(train / "class_1" / "._mac.png")
    with pytest.warns(UserWarning, match=r"5 entries of train/ not read.*symbolic links are not followed"):
        tr, va, classes = load_image_folder(d)
    assert classes == ["class_0", "class_1", "class_2"]
    assert len(tr) == 24 and len(va) == 12
    for path, label in tr.samples:
        assert Path(path).parent.name == classes[label] and Path(path).parent.parent == train
    assert tr[0][0].size == (32, 32)


def test_differing_class_folders_are_named(world, tmp_path):
    d = _images(world, tmp_path)
    (d / "train" / "class_2").rename(d / "train" / "class_two")
    with pytest.raises(DataError, match=r"only in train/: class_two; only in val/: class_2") as err:
        load_image_folder(d)
    assert len(str(err.value).splitlines()) == 1


def _fifo_only_class(w, tmp):
    d = _images(w, tmp)
    for f in (d / "train" / "class_1").iterdir():
        f.unlink()
    os.mkfifo(d / "train" / "class_1" / "x.png")
    return d


CASES = [
    Case("data-fifo-only-class", lambda w, t: _distill(w, t, data=_fifo_only_class(w, t)),
         r"class_1 has no images", output="out"),
    Case("data-classes-differ", lambda w, t: _distill(w, t, data=(lambda d: (
        (d / "val" / "class_0").rename(d / "val" / "cats"), d)[1])(_images(w, t))),
         r"different class folders \(only in train/: class_0; only in val/: cats\)", output="out"),
]


def _fashion_mnist(tmp: Path, cut: str) -> Path:
    """The four Fashion-MNIST files (tiny), with ``cut`` truncated to half its bytes."""
    import gzip
    import struct
    d = tmp / "fmnist"
    d.mkdir()
    for prefix, n in (("train", 20), ("t10k", 10)):
        for kind, array in (("images-idx3", np.zeros((n, 28, 28), np.uint8)), ("labels-idx1", np.arange(n) % 10)):
            raw = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
            with gzip.open(d / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(raw + array.astype(np.uint8).tobytes())
    data = (d / cut).read_bytes()
    (d / cut).write_bytes(data[: len(data) // 2])
    return d


@pytest.mark.parametrize("cut", ["train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"])
def test_truncated_fashion_mnist_names_the_file(world, tmp_path, monkeypatch, cut):
    monkeypatch.setenv("CASTLE_FASHION_MNIST_DIR", str(_fashion_mnist(tmp_path, cut)))
    assert_one_line_error(Case("fmnist-truncated", lambda w, t: _distill(w, t, data="fashion-mnist"),
                               rf"{cut} cannot be read .*truncated.*reinstall", output="out"), world, tmp_path)


def _sharded_hf(w, tmp) -> Path:
    from transformers import ViTForImageClassification
    d = tmp / "hf_sharded"
    ViTForImageClassification.from_pretrained(w["hf_vit"]).save_pretrained(d, max_shard_size="20KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 2
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    return d


CASES += [
    Case("model-hf-truncated-shard", lambda w, t: _distill(w, t, model=_sharded_hf(w, t)),
         r"model-00002-of-000\d\d\.safetensors cannot be read \(truncated", output="out"),
]


# -- a Hugging Face directory missing weights (item 4) --------------------------------------------

def _hf_missing_layer(w, tmp) -> Path:
    from safetensors.torch import load_file, save_file
    d = _copy(w["hf_vit"], tmp / "hf")
    state = load_file(str(d / "model.safetensors"))
    kept = {k: v for k, v in state.items() if ".0.attention." not in k and ".0.attn" not in k}
    assert len(kept) < len(state)
    save_file(kept, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


CASES += [
    Case("model-hf-missing-layer", lambda w, t: _distill(w, t, model=_hf_missing_layer(w, t)),
         r"hf lacks \d+ weights of ViTForImageClassification \(e\.g\. .*0\..*\): they would start random", output="out"),
]


# -- timm checkpoints: the head, wrapper prefixes, EMA copies, pickles (items 1, 13, 14) -----------

def _finetuned(num_classes=3, **kw):
    import timm
    torch.manual_seed(1)
    return timm.create_model("test_vit", num_classes=num_classes, **kw).eval()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_finetuned_checkpoint_keeps_its_head(tmp_path, capsys, suffix):
    """A 3-class fine-tune of test_vit (timm's default: 1000 classes): the teacher is the checkpoint itself,
    head included (timm's loader dropped a head whose class count differs from the pretrained config's)."""
    from safetensors.torch import save_file

    from castle_convert.models import load_model
    model = _finetuned(3)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"finetuned{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    teacher = load_model(str(path), arch="test_vit")
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(teacher(x), model(x))
    assert teacher.num_classes == 3 and "finetuned" in teacher.pretrained_cfg["file"]
    assert f"teacher: the weights of finetuned{suffix} (3 classes)" in capsys.readouterr().out
    headless = _finetuned(0)
    save_file({k: v.contiguous() for k, v in headless.state_dict().items()}, str(tmp_path / "backbone.safetensors"))
    assert load_model(str(tmp_path / "backbone.safetensors"), arch="test_vit").num_classes == 0
    registers = _finetuned(5, reg_tokens=2)                     # prefix tokens the architecture's default lacks
    save_file({k: v.contiguous() for k, v in registers.state_dict().items()}, str(tmp_path / "reg.safetensors"))
    loaded = load_model(str(tmp_path / "reg.safetensors"), arch="test_vit")
    with torch.no_grad():
        assert loaded.num_reg_tokens == 2 and torch.equal(loaded(x), registers(x))


def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


@pytest.mark.parametrize("layout, copy, says", [
    ("ddp", "model", "the weights of"),
    ("compiled", "model", "the weights of"),
    ("compiled-ddp", "model", "the weights of"),
    ("model_ema-only", "ema", "the EMA copy ('model_ema', the only copy in the file)"),
    ("state_dict_ema-only", "ema", "the EMA copy ('state_dict_ema', the only copy in the file)"),
    ("timm-train", "model", "the model copy ('state_dict'); its EMA copy ('state_dict_ema') is not used"),
    ("deit-style", "model", "the model copy ('model'); its EMA copy ('model_ema') is not used"),
])
def test_checkpoints_timm_loads_are_loaded_as_timm_does(tmp_path, capsys, layout, copy, says):
    """DDP ``module.`` / torch.compile ``_orig_mod.`` prefixes and EMA-only files load (they were refused with
    "pass the architecture it was trained as"); the run says which copy became the teacher."""
    import argparse

    from castle_convert.models import load_model
    model, ema = _finetuned(3), _finetuned(3)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.01)
    sd, ema_sd = model.state_dict(), _prefixed(ema.state_dict(), "module.")     # timm's ModelEmaV2 wraps .module
    checkpoint = {
        "ddp": _prefixed(sd, "module."),
        "compiled": _prefixed(sd, "_orig_mod."),
        "compiled-ddp": _prefixed(sd, "_orig_mod.module."),
        "model_ema-only": {"model_ema": ema_sd, "epoch": 3},
        "state_dict_ema-only": {"state_dict_ema": ema_sd},
        "timm-train": {"state_dict": _prefixed(sd, "module."), "state_dict_ema": ema_sd, "epoch": 9, "arch": "test_vit",
                       "args": argparse.Namespace(model="test_vit", lr=1e-3), "optimizer": {"state": {}}},
        "deit-style": {"model": sd, "model_ema": ema_sd},
    }[layout]
    torch.save(checkpoint, tmp_path / "ckpt.pth")
    teacher = load_model(str(tmp_path / "ckpt.pth"), arch="test_vit")
    expected = model if copy == "model" else ema
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(teacher(x), expected(x))
    assert f"teacher: {says}" in capsys.readouterr().out


def _pickled_folder(src: Path, dst: Path, nest: bool) -> Path:
    """A copy of the model folder ``src`` whose weights are a pytorch_model.bin pickle with a payload in it."""
    from safetensors.torch import load_file

    from test_hostile import _Evil
    d = _copy(src, dst)
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    evil = _Evil(dst.parent / "PWNED")
    torch.save({"state_dict": state, "extra": evil} if nest else {**state, "extra": evil}, d / "pytorch_model.bin")
    return d


_CONVERT = r"only if you trust the file \(unpickling runs any code in it\): python -c \"import torch.*st\.save_file\(.*'\)\"$"

CASES += [
    Case("model-pickle-checkpoint-full-advice", lambda w, t: _distill(w, t, "--arch", "deit_tiny",
                                                                      model=_pickle_ckpt(t)),
         r"evil\.pth is a pickle holding Python objects besides tensors \(posix\.system\).*never unpickles: "
         r"convert it to safetensors.*torch\.load\('.*evil\.pth', weights_only=False\).*evil\.safetensors'\)\"$",
         output="out"),
    Case("model-hf-dir-pickle", lambda w, t: _distill(w, t, model=_pickled_folder(w["hf_vit"], t / "hf", False)),
         r"pytorch_model\.bin is a pickle .*posix\.system.*" + _CONVERT, output="out"),
    Case("model-timm-folder-pickle", lambda w, t: _distill(w, t, model=_pickled_folder(w["teacher"], t / "timm", True)),
         r"pytorch_model\.bin is a pickle .*" + _CONVERT, output="out"),
    Case("model-checkpoint-head-does-not-fit", lambda w, t: _distill(w, t, "--arch", "test_vit", model=(
        lambda p: (torch.save({**_finetuned(3).state_dict(), "head.weight": torch.zeros(3, 7)}, p), p)[1])(t / "x.pth")),
         r"x\.pth does not fit --arch test_vit: 1 tensors with another shape \(e\.g\. head\.weight", output="out"),
]


# -- published directories naming files to load; minimum versions (item 10) ----------------------

def _timm_wrapper_dir(w, tmp, marker: Path, **model_args) -> Path:
    """A castle-convert directory whose config.json names transformers' TimmWrapperModel with loader arguments."""
    import json

    from test_hostile import _Evil
    evil = tmp / "evil.pth"
    torch.save({"state_dict": _Evil(marker)}, evil)
    d = _copy(w["published"], tmp / "pub")
    cfg = json.loads((d / "config.json").read_text())
    cfg["source"] = {"library": "transformers", "model_type": "timm_wrapper", "architectures": ["TimmWrapperModel"]}
    cfg.update(model_type="castling_vit", architecture="test_vit",
               model_args={k: (str(evil) if v == "EVIL" else v) for k, v in model_args.items()})
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("model_args, named", [            # (config.json's top level is the source's config)
    ({"checkpoint_path": "EVIL"}, r"(source\.config\.)?model_args\.checkpoint_path"),
    ({"pretrained_cfg_overlay": {"file": "EVIL"}}, r"(source\.config\.)?model_args\.pretrained_cfg_overlay"),
    ({"cache_dir": "/tmp/somewhere"}, r"(source\.config\.)?model_args\.cache_dir"),
])
def test_loader_arguments_of_any_source_class_are_refused(world, tmp_path, monkeypatch, model_args, named):
    import timm.models._factory as factory

    import castle_convert as cc
    calls = []
    monkeypatch.setattr(factory, "load_checkpoint", lambda *a, **k: calls.append(a))
    marker = tmp_path / "PWNED"
    d = _timm_wrapper_dir(world, tmp_path, marker, **model_args)
    with pytest.raises(cc.CheckpointError, match=named + r".*model\.safetensors only") as err:
        cc.load(d)
    assert len(str(err.value).splitlines()) == 1
    assert not calls and not marker.exists()


def test_remote_timm_names_in_a_source_are_refused(world, tmp_path):
    import json

    import castle_convert as cc
    d = _timm_wrapper_dir(world, tmp_path, tmp_path / "PWNED")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architecture"] = f"local-dir:{world['teacher']}"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(cc.CheckpointError, match=r"(source\.config\.)?architecture names weights"):
        cc.load(d)


def test_minimum_versions_have_safe_loading_defaults():
    """torch >= 2.6: torch.load defaults to weights_only=True (and the weights_only bypass CVE-2025-32434 is
    fixed); timm >= 1.0.26: its load_checkpoint / load_state_dict / hub loaders default to weights_only=True."""
    import re
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    pins = dict(re.findall(r'"(torch|timm)>=([\d.]+)"', text))
    version = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert version(pins["torch"]) >= (2, 6) and version(pins["timm"]) >= (1, 0, 26), pins


# -- recipes: base: reads YAML recipes only (item 11) -----------------------------------------------

SECRET = "root:$6$SECRETHASH:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"


def _recipe_with_base(tmp: Path, base) -> Path:
    p = tmp / "mine.yaml"
    p.write_text(f"base: {base}\nepochs: 2\n")
    return p


def _secret(tmp: Path, name: str = "shadow") -> Path:
    p = tmp / name
    p.write_text(SECRET)
    return p


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "pipe.yaml")
    return tmp / "pipe.yaml"


def _big(tmp: Path) -> Path:
    p = tmp / "big.yaml"
    p.write_text("epochs: 2\n" + "# padding\n" * 120_000)
    return p


CASES += [
    Case("recipe-base-secret-file", lambda w, t: _distill(w, t, "--recipe", str(_recipe_with_base(t, _secret(t)))),
         r"^Error: '.*shadow' \(base: of recipe .*mine\.yaml\) is not a YAML recipe: give a \.yaml/\.yml file"
         r"(?!.*SECRET)", output="out"),
    Case("recipe-base-dev-zero", lambda w, t: _distill(w, t, "--recipe", str(_recipe_with_base(t, "/dev/zero"))),
         r"'/dev/zero' \(base: of recipe .*\) is not a YAML recipe", output="out"),
    Case("recipe-base-fifo", lambda w, t: _distill(w, t, "--recipe", str(_recipe_with_base(t, _fifo(t)))),
         r"pipe\.yaml \(base: of recipe .*\) is not a regular file", output="out"),
    Case("recipe-base-huge", lambda w, t: _distill(w, t, "--recipe", str(_recipe_with_base(t, _big(t)))),
         r"big\.yaml \(base: .*\) is \d+ bytes, more than a recipe can be \(1048576 bytes\)", output="out"),
    Case("recipe-base-link-to-secret", lambda w, t: _distill(w, t, "--recipe", str(_recipe_with_base(t, (
        lambda link: (link.symlink_to(_secret(t)), link)[1])(t / "innocent.yaml")))),
         r"innocent\.yaml' \(base: .*\) is not a YAML recipe(?!.*SECRET)", output="out"),
    Case("recipe-path-secret-file", lambda w, t: _distill(w, t, "--recipe", str(_secret(t, "passwd"))),
         r"'.*passwd' is not a YAML recipe(?!.*SECRET)", output="out"),
]


def test_recipe_bases_that_are_recipes_still_work(tmp_path):
    from castle_convert.recipes import load_recipe
    shipped = _recipe_with_base(tmp_path, "toy")
    assert load_recipe(str(shipped)).epochs == 2
    parent = tmp_path / "parent.yml"
    parent.write_text("base: toy\noptim:\n  lr: 0.004\n")
    child = _recipe_with_base(tmp_path, parent)
    r = load_recipe(str(child))
    assert r.epochs == 2 and r.optim.lr == 0.004


# -- an unwritable cache is named before a built-in is trained or extracted (item 7) ----------------

def _refuse_work(monkeypatch):
    """Training fmnist_vit reads Fashion-MNIST first; extracting dinov2_small calls extract(): both fail loudly."""
    import castle_convert.data as data
    import castle_convert.dinov2_weights as dw

    def refuse(*a, **k):
        raise AssertionError("a built-in was being made before the cache was checked")
    monkeypatch.setattr(data, "load_fashion_mnist", refuse)
    monkeypatch.setattr(dw, "extract", refuse)


@pytest.mark.parametrize("builtin", ["fmnist_vit", "dinov2_small"])
def test_unwritable_cache_is_named_before_work(world, tmp_path, monkeypatch, builtin):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("CASTLE_CACHE", str(tmp_path / "afile" / "cache"))
    _refuse_work(monkeypatch)
    assert_one_line_error(Case("cache-unwritable", lambda w, t: _distill(w, t, model=builtin, data="fashion-mnist"),
                               rf"built-in {builtin} .*CASTLE_CACHE, .*afile/cache, is not writable.*set CASTLE_CACHE",
                               output="out"), world, tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_cache_is_named_before_work(world, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    monkeypatch.setenv("CASTLE_CACHE", str(cache))
    _refuse_work(monkeypatch)
    assert_one_line_error(Case("cache-read-only", lambda w, t: _distill(w, t, model="fmnist_vit", data="fashion-mnist"),
                               r"CASTLE_CACHE, .*cache, is not writable \(Permission denied\)", output="out"),
                          world, tmp_path)


# -- --overwrite replaces only castle-convert's own output (item 8) ---------------------------------

def _runs_folder(tmp: Path) -> Path:
    """A folder of other runs and notes (what --output runs --overwrite deleted)."""
    runs = tmp / "runs"
    (runs / "other_run").mkdir(parents=True)
    (runs / "other_run" / "config.json").write_text('{"castling": {}, "source": {}}')
    (runs / "notes.txt").write_text("keep me")
    return runs


CASES += [
    Case("output-overwrite-foreign-dir", lambda w, t: _distill(w, t, "--overwrite", output=_runs_folder(t)),
         r"output .*runs is a directory castle-convert did not write.*--overwrite replaces only a castle-convert "
         r"output directory"),
    Case("output-overwrite-file", lambda w, t: _distill(w, t, "--overwrite", output=(
        lambda f: (f.write_text("notes"), f)[1])(t / "notes.txt")), r"notes\.txt is a file: --overwrite replaces only"),
    Case("output-overwrite-link", lambda w, t: _distill(w, t, "--overwrite", output=(
        lambda link: (link.symlink_to(w["published"]), link)[1])(t / "link")), r"link is a symbolic link"),
]


def test_overwrite_keeps_other_files_and_replaces_own_output(world, tmp_path):
    import castle_convert as cc
    from castle_convert.export.save import OutputExistsError
    runs = _runs_folder(tmp_path)
    model = cc.load(world["published"])
    with pytest.raises(OutputExistsError, match="did not write") as err:
        cc.save_pretrained(model, runs, overwrite=True)
    assert len(str(err.value).splitlines()) == 1
    assert (runs / "notes.txt").read_text() == "keep me" and (runs / "other_run").is_dir()
    own = cc.save_pretrained(model, runs / "mine")
    (own / "extra.txt").write_text("written inside castle-convert's own output")
    with pytest.warns(UserWarning, match=r"kept the 1 it did not write: extra\.txt"):
        cc.save_pretrained(model, own, overwrite=True)                 # recognised as its own: replaced
    assert (own / "model.safetensors").is_file() and (own / "extra.txt").is_file()   # the user's file: kept (issue 26)


# -- one run per output; a full disk (item 9) ------------------------------------------------------

def test_second_run_on_the_same_output_names_the_process_holding_it(world, tmp_path):
    """Another process holds the output's lock: the run stops at once naming its PID; once that process is gone
    (killed: its lock file stays behind) the run takes the lock over and finishes, leaving no lock file."""
    import signal
    import subprocess
    import sys
    import time

    from click.testing import CliRunner

    from castle_convert.cli import main
    from test_hostile import _error_line, _run
    lock = tmp_path / ".out.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('held', flush=True)\n"
        "time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = CliRunner().invoke(main, [str(a) for a in _distill(world, tmp_path)])
        assert r.exit_code == 1 and "Traceback" not in r.output
        assert re.search(rf"output .*out is being written by another castle-convert process \(PID {holder.pid}, lock "
                         r".*\.out\.lock\): wait for it to finish, or choose another --output", _error_line(r.output))
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.run").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock.exists()                                             # left behind by the killed holder
    _run(world, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file() and not lock.exists()


def test_save_pretrained_of_a_busy_output_is_refused(world, tmp_path):
    import castle_convert as cc
    from castle_convert.export.save import OutputBusyError, output_lock
    model = cc.load(world["published"])
    with output_lock(tmp_path / "pub"):                              # re-entrant in the holding process
        cc.save_pretrained(model, tmp_path / "pub")
    assert not (tmp_path / ".pub.lock").exists()
    import fcntl
    fd = os.open(tmp_path / ".pub2.lock", os.O_RDWR | os.O_CREAT)   # another holder (its own open file)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"4242")
    try:
        with pytest.raises(OutputBusyError, match=r"PID 4242") as err:
            cc.save_pretrained(model, tmp_path / "pub2")
        assert len(str(err.value).splitlines()) == 1 and not (tmp_path / "pub2").exists()
    finally:
        os.close(fd)


def _disk_full_when(predicate):
    """A safetensors save_file that fails with ENOSPC for the files ``predicate`` picks."""
    import errno

    import safetensors.torch as st
    real = st.save_file

    def save_file(tensors, filename, metadata=None):
        if predicate(str(filename)):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, metadata=metadata)
    return save_file


def test_disk_full_at_a_training_checkpoint_keeps_the_last_one(world, tmp_path, monkeypatch):
    import json

    import safetensors.torch as st

    from castle_convert.distill.checkpoint import CheckpointWriteError
    from test_hostile import _run
    full = [False]
    monkeypatch.setattr(st, "save_file", _disk_full_when(lambda f: full[0] and "checkpoint.tmp" in f))

    def fill_disk(step):
        full[0] = full[0] or step == 3
    out = tmp_path / "out"
    with pytest.raises(CheckpointWriteError, match=r"cannot write the checkpoint .*checkpoint\.tmp: No space left on "
                       r"device .*run again with --resume; the previous checkpoint \(step 2\) is intact") as err:
        _run(world, out, on_step=fill_disk)
    assert len(str(err.value).splitlines()) == 1
    ckpt = tmp_path / "out.run" / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    assert not ckpt.with_name("checkpoint.tmp").exists() and not out.exists()
    monkeypatch.undo()
    assert _run(world, out, resume=True).distill.steps == 6


def test_disk_full_at_the_final_save_is_one_line_and_keeps_the_checkpoint(world, tmp_path, monkeypatch):
    import json

    import safetensors.torch as st

    from castle_convert.export.save import ExportError
    from test_hostile import _run
    monkeypatch.setattr(st, "save_file", _disk_full_when(lambda f: "/.out.tmp-" in f))
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"cannot write .*out: No space left on device .*nothing was written.*the "
                       r"run's last checkpoint is kept in .*out\.run: continue with --resume") as err:
        _run(world, out)
    assert len(str(err.value).splitlines()) == 1
    assert json.loads((tmp_path / "out.run" / "checkpoint" / "state.json").read_text())["step"] == 4
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    monkeypatch.undo()
    _run(world, out, resume=True)
    assert (out / "model.safetensors").is_file()


# -- resume after stage 1, during stage 1, between a checkpoint's renames (item 6) ------------------

STAGE1 = ["transfer.steps=3", "transfer.batch_size=4", "distill.attn_transfer=0"]


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(out / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    """``uninterrupted(sets)``: the final weights of an uninterrupted run with those recipe changes (run once per
    module, shared by the resume tests)."""
    from test_hostile import _run
    cache: dict = {}

    def weights(sets=()) -> dict:
        if tuple(sets) not in cache:
            out = tmp_path_factory.mktemp("uninterrupted") / "full"
            _run(world, out, list(sets))
            cache[tuple(sets)] = _weights(out)
        return cache[tuple(sets)]
    return weights


def test_resume_after_stage1_is_bit_identical(world, tmp_path, monkeypatch, uninterrupted):
    """Killed after stage 1, before the first stage-2 checkpoint: the resumed run loads stage 1 (weights and RNG
    states) and ends with exactly the uninterrupted run's weights (it differed by up to 0.007)."""
    import sys

    from test_hostile import _kill_at, _run
    loop = sys.modules["castle_convert.distill.loop"]
    real, rng_after_stage1 = loop.run_stage1, []

    def recording(*a, **k):
        out = real(*a, **k)
        rng_after_stage1.append(torch.get_rng_state())
        return out
    monkeypatch.setattr(loop, "run_stage1", recording)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _run(world, out, STAGE1, on_step=_kill_at(1))
    work = tmp_path / "out.run"
    assert (work / "stage1" / "stage1.json").is_file() and not (work / "checkpoint").exists()
    assert (work / "stage1" / "rng_0.json").is_file()
    _run(world, out, STAGE1, resume=True)
    assert torch.equal(rng_after_stage1[0], rng_after_stage1[1])   # stage 2 starts from the same RNG state
    assert _max_diff(uninterrupted(STAGE1), _weights(out)) == 0.0


def test_kill_during_stage1_then_resume_redoes_it(world, tmp_path, capsys, uninterrupted):
    import sys

    from test_hostile import _run
    transfer = sys.modules["castle_convert.distill.transfer"]
    real = transfer.attention_transfer

    def killed(*a, **k):
        raise KeyboardInterrupt
    transfer.attention_transfer = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            _run(world, tmp_path / "out", STAGE1)
    finally:
        transfer.attention_transfer = real
    capsys.readouterr()
    _run(world, tmp_path / "out", STAGE1, resume=True)               # was: "no checkpoint to resume"
    assert "stage 1 did not finish before the interruption: redoing it" in capsys.readouterr().out
    assert _max_diff(uninterrupted(STAGE1), _weights(tmp_path / "out")) == 0.0


def _killed_between_renames(w, tmp) -> Path:
    """An interrupted run whose last checkpoint save stopped between its two renames: checkpoint/ gone (moved to
    checkpoint.old), the complete newer checkpoint.tmp not yet in place."""
    from test_hostile import _interrupted
    out = tmp / "out"
    ckpt = _interrupted(w, out)
    ckpt.rename(ckpt.with_name("checkpoint.tmp"))
    return out


def test_complete_checkpoint_tmp_is_resumed_and_never_deleted_silently(world, tmp_path, capsys, uninterrupted):
    from castle_convert.distill.checkpoint import ResumeError
    from test_hostile import _run
    out = _killed_between_renames(world, tmp_path)
    tmp = tmp_path / "out.run" / "checkpoint.tmp"
    with pytest.raises(ResumeError, match=r"an interrupted run left a checkpoint in .*out\.run: pass --resume"):
        _run(world, out)                                              # a plain rerun: refused, nothing deleted
    assert (tmp / "state.json").is_file()
    capsys.readouterr()
    result = _run(world, out, resume=True)
    assert "resumed from" in capsys.readouterr().out and result.distill.steps == 6
    assert _max_diff(uninterrupted(), _weights(out)) == 0.0


# -- bf16 / fp16: mixed precision runs and half-precision models (item 5) ---------------------------

def test_bf16_mixed_precision_run_finishes_and_resumes_exactly(world, tmp_path):
    """mixed_precision: bf16 (distill-10ep/30ep's default) on CPU: the run finishes (finalize's parity check
    failed at the very end: the unwrapped student kept Accelerate's autocast wrapper and fp32's tolerance), the
    finalized student carries no wrapper, and a killed run resumes to the same weights."""
    import castle_convert as cc
    from test_hostile import _interrupted, _run
    bf16 = ["mixed_precision=bf16"]
    full = _run(world, tmp_path / "full", bf16)
    student = full.distill.student
    assert "forward" not in student.__dict__ and "_original_forward" not in student.__dict__
    assert next(student.parameters()).dtype == torch.float32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(cc.load(tmp_path / "full")(x), student(x), atol=1e-5)
    out = tmp_path / "out"
    _interrupted(world, out, bf16)
    _run(world, out, bf16, resume=True)
    assert _max_diff(_weights(tmp_path / "full"), _weights(out)) <= 1e-6


def test_finalize_under_autocast_compares_in_that_precision():
    import timm

    import castle_convert as cc
    torch.manual_seed(0)
    student = cc.convert(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                                           num_heads=2, num_classes=3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        final = cc.finalize(student, force=True)
    assert 0 < final.castling_parity <= 5e-2 * 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["linear_angular", "separable"])
@pytest.mark.parametrize("fid", ["timm-vit", "hf-vit"])
def test_half_precision_models_convert_train_and_finalize(dtype, kind, fid):
    """A .half() / bf16 source (HF torch_dtype): the depthwise conv, γ and every new parameter are made in the
    source's dtype and device, so the first gate-0 forward works (it failed: fp32 conv next to half weights)."""
    import castle_convert as cc
    from castle_convert.convert import training_forms
    from families import FAMILIES
    family = next(f for f in FAMILIES if f.id == fid)
    model = family.build().to(dtype)
    student = cc.convert(model, kind=kind)
    for _, m in training_forms(student):
        assert {p.dtype for p in m.added_parameters()} == {dtype}
    cc.set_schedule(student, 0.0)
    x = torch.randn(2, 3, family.size, family.size, dtype=dtype)
    out = family(student, x)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    final = cc.finalize(student, force=True)
    assert final.castling_parity <= 5e-2


def test_distill_of_a_bf16_timm_teacher(world):
    """cc.distill of a bf16 timm model (timm does not cast fp32 pixels itself): calibration, stage 1 and stage 2
    feed it bf16 images."""
    import timm

    import castle_convert as cc
    from castle_convert.data import build_data
    from castle_convert.recipes import load_recipe
    from test_hostile import TINY_ARGS, TINY_RUN
    torch.manual_seed(0)
    teacher = timm.create_model("vit_tiny_patch16_224", **TINY_ARGS).eval().to(torch.bfloat16)
    data = build_data(str(world["images"]), teacher, augmentation="none")
    student = cc.convert(teacher, calibration_inputs=torch.stack([data.train[i][0] for i in range(8)]))
    result = cc.distill(teacher, student, data, recipe=load_recipe("toy", TINY_RUN + STAGE1), progress=False)
    assert next(result.student.parameters()).dtype == torch.bfloat16 and result.steps == 6


# -- the CLI corpus of this round (CASES, collected above) -------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_bad_input_is_one_line(case: Case, world, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_one_line_error(case, world, tmp_path)
