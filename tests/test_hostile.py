"""Hostile input and faults: a table-driven corpus of bad inputs against every subcommand and the API.

Each CLI case asserts the exit code, that the error is one line (``Error: ...``, no traceback) naming
the problem, and that nothing complete-looking was written. Run-directory cases cover resume safety:
a planted pickle never runs, a changed recipe is refused, a tampered checkpoint is a one-line error.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

import castle_convert as cc
from castle_convert.cli import main

ROOT = Path(__file__).resolve().parents[1]
# the fidelity block, cheap: one size, two held-out photos, no latency (tests/test_fidelity.py: the whole block;
# test_distill.py: the recipe's own in a run)
CHEAP_FIDELITY = ["fidelity.resolutions=32", "fidelity.max_images=2", "fidelity.latency=false"]
TINY_RUN = ["epochs=2", "optim.batch_size=8", "optim.warmup_epochs=0.5", "castling.anneal.end_epoch=1",
            "transfer.steps=0", "save_every=2", "log_every=1", "eval_every=1", "data.workers=0",
            *CHEAP_FIDELITY]
TINY_ARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)


def _sets(items):
    return [a for s in items for a in ("--set", s)]


# -- fixtures ------------------------------------------------------------------------------------

def _folder(root: Path, n_train: int = 8, n_val: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.clip(rng.normal(colour, 40, size=(32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shared inputs: an image folder, a timm teacher folder and checkpoint, a published directory."""
    from timm.models._hub import save_for_hf
    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    teacher = timm.create_model("vit_tiny_patch16_224", **TINY_ARGS)
    save_for_hf(teacher, str(root / "teacher"), model_args=TINY_ARGS, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(root / "teacher.safetensors"))
    resnet = timm.create_model("test_resnet", num_classes=3)
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(root / "resnet.safetensors"))
    published = root / "published"
    cc.save_pretrained(cc.finalize(cc.convert(timm.create_model("test_vit")), force=True), published)
    from transformers import ViTConfig, ViTForImageClassification
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                    patch_size=8, num_labels=3)
    ViTForImageClassification(cfg).save_pretrained(root / "hf_vit")
    return {"root": root, "images": _folder(root / "images"), "teacher": root / "teacher",
            "ckpt": root / "teacher.safetensors", "resnet": root / "resnet.safetensors", "published": published,
            "hf_vit": root / "hf_vit"}


def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


# -- the corpus ----------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    args: Callable[[dict, Path], list[str]]       # (world, tmp) -> argv
    pattern: str                                   # regex the one-line error must match
    code: int = 1
    output: Optional[str] = None                   # an --output that must not look complete afterwards


def _distill(w, tmp, *extra, model=None, data=None, sets=(), output=None):
    return [str(model or w["teacher"]), "--recipe", "toy", "--data", str(data or w["images"]),
            "--output", str(output or tmp / "out"), "--no-progress", *_sets(TINY_RUN + list(sets)), *extra]


def _bad_yaml(tmp: Path) -> Path:
    p = tmp / "bad.yaml"
    p.write_text("epochs: 2\noptim:\n  lr: [1e-4\n")
    return p


def _cycle(tmp: Path) -> Path:
    p = tmp / "loop.yaml"
    p.write_text(f"base: {p}\nepochs: 1\n")
    return p


def _empty_class(w, tmp):
    d = _copy(w["images"], tmp / "imgs")
    for f in (d / "train" / "class_1").iterdir():
        f.unlink()
    return d


def _corrupt_image(w, tmp):
    d = _copy(w["images"], tmp / "imgs")
    (d / "train" / "class_0" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return d


def _corrupt_val_image(w, tmp):
    d = _copy(w["images"], tmp / "imgs")
    (d / "val" / "class_2" / "3.png").write_bytes(b"garbage")
    return d


def _no_val(w, tmp):
    import shutil
    d = _copy(w["images"], tmp / "imgs")
    shutil.rmtree(d / "val")
    return d


def _pub(w, tmp, edit: Callable[[Path], None]) -> Path:
    d = _copy(w["published"], tmp / "pub")
    edit(d)
    return d


def _edit_config(fn):
    def edit(d: Path):
        cfg = json.loads((d / "config.json").read_text())
        fn(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _truncate(d: Path, name: str = "model.safetensors"):
    data = (d / name).read_bytes()
    (d / name).write_bytes(data[: len(data) // 2])


def _hf_truncated(w, tmp):
    d = _copy(w["hf_vit"], tmp / "hf")
    _truncate(d)
    return d


def _hf_garbage(w, tmp):
    d = _copy(w["hf_vit"], tmp / "hf")
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    return d


def _timm_folder(tmp, arch, weights: Optional[bytes] = None):
    d = tmp / "timm_folder"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": 3}))
    if weights is not None:
        (d / "model.safetensors").write_bytes(weights)
    return d


def _under_file(tmp):
    (tmp / "afile").write_text("x")
    return tmp / "afile" / "out"


def _mismatch_ckpt(tmp):
    m = timm.create_model("test_vit")                     # 160 px, width 64: not deit_tiny's shapes
    p = tmp / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(p))
    return p


def _garbage_ckpt(tmp):
    p = tmp / "garbage.pth"
    p.write_bytes(b"this is not a checkpoint")
    return p


def _pickle_ckpt(tmp):
    """A torch pickle that would create a file if it were unpickled with weights_only=False."""
    marker = tmp / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    p = tmp / "evil.pth"
    torch.save({"state_dict": Evil()}, p)
    return p


CASES = [
    # -- model argument ------------------------------------------------------------------------
    Case("model-typo", lambda w, t: ["inspect", "deit_smal"], r"unknown model 'deit_smal'.*Did you mean: deit_small"),
    Case("model-no-attention-name", lambda w, t: _distill(w, t, model="resnet18"),
         r"resnet18.*no (supported )?attention", output="out"),
    Case("model-no-attention-inspect", lambda w, t: ["inspect", "test_resnet"], r"no supported attention"),
    Case("model-resnet-checkpoint", lambda w, t: _distill(w, t, "--arch", "test_resnet", model=w["resnet"]),
         r"no (supported )?attention", output="out"),
    Case("model-arch-mismatch", lambda w, t: _distill(w, t, "--arch", "deit_tiny", model=_mismatch_ckpt(t)),
         r"vit\.safetensors.*does not fit.*deit_tiny_patch16_224", output="out"),
    Case("model-pickle-checkpoint", lambda w, t: _distill(w, t, "--arch", "deit_tiny", model=_pickle_ckpt(t)),
         r"evil\.pth is a pickle holding Python objects.*never unpickles", output="out"),
    Case("model-checkpoint-no-arch", lambda w, t: _distill(w, t, model=w["ckpt"]), r"--arch", output="out"),
    Case("model-checkpoint-garbage", lambda w, t: _distill(w, t, "--arch", "deit_tiny", model=_garbage_ckpt(t)),
         r"cannot read checkpoint .*garbage\.pth", output="out"),
    Case("model-missing-path", lambda w, t: _distill(w, t, model=t / "nope.safetensors"), r"no such file",
         output="out"),
    Case("model-dir-without-config", lambda w, t: ["inspect", str(w["images"])], r"no config\.json"),
    Case("model-hf-dir-truncated-weights", lambda w, t: _distill(w, t, model=_hf_truncated(w, t)),
         r"model\.safetensors.*(truncated|damaged|cannot be read)", output="out"),
    Case("model-hf-dir-garbage-weights", lambda w, t: _distill(w, t, model=_hf_garbage(w, t)),
         r"model\.safetensors.*(truncated|damaged|cannot be read)"),
    Case("model-hf-config-garbage", lambda w, t: ["inspect", str(_pub(w, t, lambda d: (d / "config.json").write_text(
        "{not json")))], r"config\.json.*not valid JSON"),
    Case("model-timm-folder-unknown-arch", lambda w, t: ["inspect", str(_timm_folder(t, "nonexistent_arch"))],
         r"timm model folder .*Unknown model \(nonexistent_arch\)"),
    Case("model-timm-folder-garbage-weights", lambda w, t: _distill(w, t, model=_timm_folder(t, "test_vit", b"\0" * 10)),
         r"timm model folder .*SafetensorError", output="out"),
    # -- recipes -------------------------------------------------------------------------------
    Case("recipe-unknown-name", lambda w, t: _distill(w, t, "--recipe", "distill-99ep"), r"no recipe 'distill-99ep'",
         output="out"),
    Case("recipe-yaml-syntax", lambda w, t: _distill(w, t, "--recipe", str(_bad_yaml(t))),
         r"bad\.yaml is not valid YAML at line", output="out"),
    Case("recipe-base-cycle", lambda w, t: _distill(w, t, "--recipe", str(_cycle(t))), r"cycle", output="out"),
    Case("recipe-unknown-key", lambda w, t: _distill(w, t, sets=["optim.lrr=1"]), r"unknown recipe key 'optim\.lrr'",
         output="out"),
    Case("recipe-wrong-type", lambda w, t: _distill(w, t, sets=["epochs=two"]), r"'epochs' must be float", output="out"),
    Case("recipe-set-no-equals", lambda w, t: _distill(w, t, sets=["epochs"]), r"--set needs KEY=VALUE", output="out"),
    Case("recipe-set-bad-yaml", lambda w, t: _distill(w, t, sets=["optim.lr=[1"]), r"not a valid YAML", output="out"),
    Case("recipe-negative-cap", lambda w, t: _distill(w, t, sets=["data.max_train_samples=-30"]),
         r"max_train_samples=-30 is invalid", output="out"),
    Case("recipe-zero-cap", lambda w, t: _distill(w, t, sets=["data.max_eval_samples=0"]),
         r"max_eval_samples=0 is invalid", output="out"),
    Case("recipe-resolution-zero", lambda w, t: _distill(w, t, sets=["data.resolution=0"]),
         r"data\.resolution=0 is invalid", output="out"),
    Case("recipe-resolution-not-patch-multiple", lambda w, t: _distill(w, t, sets=["data.resolution=30"]),
         r"data\.resolution=30 px is not a multiple of the model's patch size \(8 px\)", output="out"),
    Case("recipe-workers-negative", lambda w, t: _distill(w, t, sets=["data.workers=-1"]), r"data\.workers=-1",
         output="out"),
    Case("recipe-epochs-inf", lambda w, t: _distill(w, t, sets=["epochs=.inf"]), r"epochs=inf.*finite", output="out"),
    Case("recipe-lr-nan", lambda w, t: _distill(w, t, sets=["optim.lr=.nan"]), r"optim\.lr=nan.*finite", output="out"),
    Case("recipe-lr-zero", lambda w, t: _distill(w, t, sets=["optim.lr=0"]), r"optim\.lr=0.*> 0", output="out"),
    Case("recipe-batch-not-divisible", lambda w, t: _distill(w, t, sets=["optim.grad_accum=3"]),
         r"multiple of optim\.grad_accum", output="out"),
    Case("recipe-alpha-range", lambda w, t: _distill(w, t, sets=["distill.alpha=2"]), r"alpha.*\[0, 1\]", output="out"),
    Case("recipe-anneal-order", lambda w, t: _distill(w, t, sets=["castling.anneal.end_epoch=5"]),
         r"end_epoch <= epochs", output="out"),
    Case("recipe-kind", lambda w, t: _distill(w, t, "--attention", "performer"), r"kind.*separable", output="out"),
    Case("recipe-keep-softmax", lambda w, t: _distill(w, t, sets=["castling.keep_softmax=auto:x"]),
         r"keep_softmax", output="out"),
    Case("recipe-dw-kernel", lambda w, t: _distill(w, t, sets=["castling.dw_kernel=4"]), r"dw_kernel", output="out"),
    Case("recipe-clip-negative", lambda w, t: _distill(w, t, sets=["optim.clip_grad=-1"]), r"clip_grad", output="out"),
    # -- data ----------------------------------------------------------------------------------
    Case("data-missing-dir", lambda w, t: _distill(w, t, data=t / "nowhere"), r"nowhere: no such directory",
         output="out"),
    Case("data-no-val", lambda w, t: _distill(w, t, data=_no_val(w, t)), r"val", output="out"),
    Case("data-empty-class", lambda w, t: _distill(w, t, data=_empty_class(w, t)), r"class_1.*(no images|empty)",
         output="out"),
    Case("data-corrupt-image", lambda w, t: _distill(w, t, data=_corrupt_image(w, t)),
         r"0\.png.*(cannot be read|not an image)", output="out"),
    Case("data-corrupt-val-image", lambda w, t: _distill(w, t, data=_corrupt_val_image(w, t)),
         r"3\.png.*(cannot be read|not an image)", output="out"),
    Case("data-hf-offline", lambda w, t: _distill(w, t, data="hf:nobody/nothing"), r"hf:nobody/nothing", output="out"),
    # -- output / resume -----------------------------------------------------------------------
    Case("output-under-file", lambda w, t: _distill(w, t, output=_under_file(t)), r"afile is a file, not a directory"),
    Case("output-dot", lambda w, t: _distill(w, t, output=t / ".."), r"--output '.*\.\.' names no new directory"),
    Case("resume-nothing", lambda w, t: _distill(w, t, "--resume"), r"no checkpoint to resume", output="out"),
    Case("resume-old-accelerate-format", lambda w, t: (_old_checkpoint(t), _distill(w, t, "--resume"))[1],
         r"older castle-convert in Accelerate's pickle format.*never unpickled", output="out"),
    Case("resume-state-garbage", lambda w, t: (_garbage_state(t), _distill(w, t, "--resume"))[1],
         r"state\.json is not valid JSON", output="out"),
    # -- published directories -----------------------------------------------------------------
    Case("pub-missing-dir", lambda w, t: ["export-onnx", str(t / "nope"), "-o", str(t / "m.onnx")],
         r"nope: no such directory"),
    Case("pub-truncated-weights", lambda w, t: ["export-onnx", str(_pub(w, t, _truncate)), "-o", str(t / "m.onnx")],
         r"model\.safetensors"),
    Case("pub-config-no-castling", lambda w, t: ["export-onnx", str(_pub(w, t, _edit_config(
        lambda c: c.pop("castling")))), "-o", str(t / "m.onnx")], r"no 'castling'/'source' section"),
    Case("pub-future-format", lambda w, t: ["export-onnx", str(_pub(w, t, _edit_config(
        lambda c: c.update(format_version=99)))), "-o", str(t / "m.onnx")], r"format_version 99.*upgrade"),
    Case("pub-checkpoint-path-in-config", lambda w, t: ["export-onnx", str(_pub(w, t, _edit_config(
        lambda c: c["source"]["model_args"].update(checkpoint_path=str(_pickle_ckpt(t)))))), "-o", str(t / "m.onnx")],
         r"checkpoint_path.*model\.safetensors only"),
    Case("pub-pickle-only", lambda w, t: ["export-onnx", str(_pub(w, t, lambda d: (
        (d / "model.safetensors").rename(d / "pytorch_model.bin")))), "-o", str(t / "m.onnx")],
         r"pickle file.*never unpickles"),
    Case("pub-wrong-shapes", lambda w, t: ["export-onnx", str(_pub(w, t, _edit_config(
        lambda c: c["source"]["model_args"].update(embed_dim=48)))), "-o", str(t / "m.onnx")],
         r"does not fit the architecture"),
    Case("push-bad-repo-id", lambda w, t: ["push", str(w["published"]), "--repo", "a/b/c", "--dry-run"], r"repo"),
    Case("push-offline", lambda w, t: ["push", str(_pub(w, t, lambda d: None)), "--repo", "me/x"],
         r"push failed: offline mode"),
    Case("push-not-a-dir", lambda w, t: ["push", str(w["ckpt"]), "--repo", "me/x", "--dry-run"], r"teacher\.safetensors"),
    # -- numerics and flags of every subcommand ------------------------------------------------
    Case("inspect-img-size-zero", lambda w, t: ["inspect", "test_vit", "--img-size", "0"], r"--img-size", code=2),
    Case("inspect-img-size-not-multiple", lambda w, t: ["inspect", "test_vit", "--img-size", "50"],
         r"50.*multiple of.*patch size", code=2),
    Case("inspect-keep-softmax-bad", lambda w, t: ["inspect", "test_vit", "--keep-softmax", "x"], r"keep-softmax",
         code=2),
    Case("inspect-keep-softmax-out-of-range", lambda w, t: ["inspect", "test_vit", "--keep-softmax", "99"], r"99"),
    Case("bench-resolution-zero", lambda w, t: ["bench", "test_vit", "--resolutions", "0"], r"positive integers",
         code=2),
    Case("bench-batch-zero", lambda w, t: ["bench", "test_vit", "--batch", "0"], r"positive integers", code=2),
    Case("bench-threads-zero", lambda w, t: ["bench", "test_vit", "--threads", "0", "--resolutions", "32"],
         r"--threads", code=2),
    Case("bench-repeats-zero", lambda w, t: ["bench", "test_vit", "--repeats", "0", "--resolutions", "32"],
         r"--repeats", code=2),
    Case("bench-budget-negative", lambda w, t: ["bench", "test_vit", "--time-budget", "-1", "--resolutions", "32"],
         r"--time-budget", code=2),
    Case("bench-resolution-not-patch-multiple", lambda w, t: ["bench", "test_vit", "--resolutions", "30"],
         r"resolution 30 px is not a positive multiple of the model's patch size \(16 px\)"),
    Case("bench-cuda-without-gpu", lambda w, t: ["bench", "test_vit", "--device", "cuda", "--resolutions", "32"],
         r"cuda", code=1),
    Case("onnx-batch-zero", lambda w, t: ["export-onnx", str(w["published"]), "-o", str(t / "m.onnx"), "--batch", "0"],
         r"--batch", code=2),
    Case("onnx-opset-low", lambda w, t: ["export-onnx", str(w["published"]), "-o", str(t / "m.onnx"), "--opset", "3"],
         r"--opset", code=2),
    Case("onnx-atol-negative", lambda w, t: ["export-onnx", str(w["published"]), "-o", str(t / "m.onnx"), "--atol",
                                             "-1"], r"--atol", code=2),
    Case("onnx-output-under-file", lambda w, t: ["export-onnx", str(w["published"]), "-o",
                                                 str(_under_file(t) / "m.onnx")], r"afile is a file", code=2),
    Case("onnx-not-castle-dir", lambda w, t: ["export-onnx", str(w["hf_vit"]), "-o", str(t / "m.onnx")],
         r"no 'castling'/'source' section"),
    Case("bench-json-under-file", lambda w, t: ["bench", "test_vit", "--resolutions", "32", "--json",
                                                str(_under_file(t) / "r.json")], r"--json.*afile is a file", code=2),
    Case("bench-plot-is-dir", lambda w, t: ["bench", "test_vit", "--resolutions", "32", "--plot", str(t)],
         r"--plot.*is a directory", code=2),
    Case("bench-published-tampered", lambda w, t: ["bench", str(_pub(w, t, _truncate)), "--resolutions", "32"],
         r"model\.safetensors"),
    Case("push-missing-dir", lambda w, t: ["push", str(t / "nope"), "--repo", "me/x", "--dry-run"], r"nope"),
    Case("diverging-lr", lambda w, t: _distill(w, t, sets=["optim.lr=1e30", "optim.clip_grad=null"]),
         r"training diverged at step \d+.*lower learning rate", output="out"),
]


def _old_checkpoint(tmp: Path) -> None:
    """An older castle-convert's checkpoint (Accelerate's save_state): a planted pickle among its files."""
    ckpt = tmp / "out.run" / "checkpoint"
    ckpt.mkdir(parents=True)
    marker = tmp / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save(Evil(), ckpt / "custom_checkpoint_0.pkl")
    torch.save({}, ckpt / "random_states_0.pkl")


def _garbage_state(tmp: Path) -> None:
    ckpt = tmp / "out.run" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{garbage")


def _error_line(output: str) -> str:
    """The one ``Error: ...`` line (progress and log lines may come before or after it on stdout)."""
    lines = [ln for ln in output.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1, output[-2000:]
    return lines[0]


def _assert_nothing_complete(path: Path) -> None:
    if path.exists():
        assert not (path / "model.safetensors").exists() and not (path / "config.json").exists(), \
            f"{path} looks complete after a failure"
    litter = [p.name for p in path.parent.glob(f".{path.name}.*")] if path.parent.exists() else []
    assert not litter, litter


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_bad_input_is_one_line(case: Case, world, tmp_path):
    assert_one_line_error(case, world, tmp_path)


def assert_one_line_error(case: Case, world, tmp_path) -> None:
    """Run ``case`` through the CLI: its exit code, one ``Error:`` line matching its pattern, no traceback,
    no pickle executed, nothing complete-looking at its --output."""
    args = case.args(world, tmp_path)
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), \
        f"uncaught {type(r.exception).__name__}: {r.exception}\n{r.output[-2000:]}"
    assert "Traceback" not in r.output, r.output[-2000:]
    assert r.exit_code == case.code, r.output[-2000:]
    line = _error_line(r.output)
    assert re.search(case.pattern, line), line
    assert not (tmp_path / "PWNED").exists(), "a pickle was executed"
    if case.output:
        _assert_nothing_complete(tmp_path / case.output)


def test_corpus_size():
    assert len(CASES) + len(API_CASES) >= 60


# -- Python API misuse ---------------------------------------------------------------------------

def _student():
    return cc.convert(timm.create_model("test_vit"))


API_CASES = [
    ("convert-a-string", lambda: cc.convert("deit_small"), TypeError, r"convert\(\) takes an nn\.Module.*load_model"),
    ("convert-none", lambda: cc.convert(None), TypeError, r"nn\.Module"),
    ("convert-bad-kind", lambda: cc.convert(timm.create_model("test_vit"), kind="performer"), cc.ConfigError, r"kind"),
    ("finalize-a-string", lambda: cc.finalize("model"), TypeError, r"nn\.Module"),
    ("set-schedule-gate-5", lambda: cc.set_schedule(_student(), gate=5), ValueError, r"gate=5.*\[0, 1\]"),
    ("set-schedule-gate-nan", lambda: cc.set_schedule(_student(), gate=math.nan), ValueError, r"gate=nan"),
    ("set-schedule-gate-negative", lambda: cc.set_schedule(_student(), gate=-0.1), ValueError, r"gate=-0\.1"),
    ("set-schedule-threshold-inf", lambda: cc.set_schedule(_student(), gate=0.5, threshold=math.inf), ValueError,
     r"threshold=inf"),
    ("set-schedule-unconverted", lambda: cc.set_schedule(timm.create_model("test_vit"), gate=0.5), cc.ConversionError,
     r"convert"),
    ("load-missing", lambda: cc.load("/nonexistent/dir"), cc.CheckpointError, r"no such directory"),
    ("save-unconverted", lambda: cc.save_pretrained(timm.create_model("test_vit"), "/tmp/never-written"),
     cc.ExportError, r"no castling attention"),
    ("save-training-form", lambda: cc.save_pretrained(_student(), "/tmp/never-written"), cc.ExportError,
     r"finalize"),
    ("inspect-a-string", lambda: cc.inspect("deit_small"), TypeError, r"nn\.Module"),
    ("inspect-img-size-zero", lambda: cc.inspect(timm.create_model("test_vit"), img_size=(0, 0)), ValueError,
     r"img_size=\(0, 0\)"),
    ("convert-keep-softmax-auto", lambda: cc.convert(timm.create_model("test_vit"), keep_softmax="auto:2"), ValueError,
     r"auto:K.*layer indices"),
    ("save-labels-count", lambda: cc.save_pretrained(cc.finalize(_student(), force=True), "/tmp/never-written", labels=["a"]),
     cc.ExportError, r"labels has 1 names.*1000 classes"),
    ("transfer-negative-steps", lambda: cc.attention_transfer(timm.create_model("test_vit"), _student(),
                                                              [torch.randn(1, 3, 160, 160)], steps=-1),
     ValueError, r"steps=-1"),
    ("config-bad-dw", lambda: cc.CastlingConfig(dw="3d"), cc.ConfigError, r"dw"),
    ("config-gate-range", lambda: cc.CastlingConfig(gate=2.0), cc.ConfigError, r"gate"),
    ("recipe-object-with-overrides", lambda: cc.distill(None, None, None, recipe=__import__(
        "castle_convert.recipes", fromlist=["Recipe"]).Recipe(), overrides=["epochs=1"]), ValueError, r"overrides"),
]


@pytest.mark.parametrize("name, call, error, pattern", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_misuse_is_a_clear_error(name, call, error, pattern):
    with pytest.raises(error, match=pattern) as err:
        call()
    assert len(str(err.value).splitlines()) == 1
    assert not Path("/tmp/never-written").exists()


# -- run directories: resume safety, kills, divergence ---------------------------------------------

def _run(w, out, sets=(), **kw):
    from castle_convert.recipes import load_recipe
    from castle_convert.run import run
    return run(str(kw.pop("model", w["teacher"])), load_recipe("toy", TINY_RUN + list(sets)),
               data_spec=str(w["images"]), output=out, progress=False, **kw)


def _kill_at(n):
    def hook(step):
        if step == n:
            raise KeyboardInterrupt
    return hook


def _interrupted(w, out, sets=()):
    with pytest.raises(KeyboardInterrupt):
        _run(w, out, sets, on_step=_kill_at(4))
    ckpt = out.with_name(out.name + ".run") / "checkpoint"
    assert (ckpt / "state.json").is_file() and not out.exists()
    return ckpt


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_never_unpickles_and_is_exact(world, tmp_path):
    """A pickle planted in the run directory (where Accelerate would unpickle it) never runs; the
    checkpoint itself holds no pickle; the resumed weights equal an uninterrupted run's."""
    from safetensors.torch import load_file
    full = tmp_path / "full"
    _run(world, full)
    out = tmp_path / "out"
    ckpt = _interrupted(world, out)
    assert not [p.name for p in ckpt.iterdir() if p.suffix in (".pkl", ".bin", ".pt", ".pth")]
    marker = tmp_path / "PWNED"
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "scheduler.bin"):
        torch.save(_Evil(marker), ckpt / name)
    _run(world, out, resume=True)
    assert not marker.exists(), "a planted pickle was executed on --resume"
    a, b = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.parametrize("change, keys", [
    (["optim.lr=5e-2"], "optim.lr"),
    (["optim.batch_size=4"], "optim.batch_size"),
    (["castling.dw=none"], "castling.dw"),
    (["epochs=1.5"], "epochs"),
    (["distill.temperature=3", "seed=7"], "distill.temperature.*seed"),
])
def test_resume_with_a_changed_recipe_is_refused_by_name(world, tmp_path, change, keys):
    from castle_convert.distill.checkpoint import ResumeError
    out = tmp_path / "out"
    _interrupted(world, out)
    with pytest.raises(ResumeError, match=rf"recipe differs.*{keys}.*--overwrite") as err:
        _run(world, out, change, resume=True)
    assert len(str(err.value).splitlines()) == 1 and not out.exists()
    # cadence-only keys may change; the run then finishes at the recorded step count
    result = _run(world, out, ["log_every=3", "eval_every=2"], resume=True)
    assert result.distill.steps == 6 and json.loads((out / "report.json").read_text())["epochs"] == 2.0


def test_resume_cli_reports_the_changed_key(world, tmp_path):
    out = tmp_path / "out"
    _interrupted(world, out)
    r = CliRunner().invoke(main, _distill(world, tmp_path, "--resume", sets=["optim.lr=5e-2"]))
    assert r.exit_code == 1 and re.search(r"optim\.lr: 0\.0\d+ in the run, 0\.05 now", _error_line(r.output))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncate-weights", "garbage-optimizer", "optimizer-shape", "rng", "step"])
def test_tampered_checkpoint_is_a_one_line_error(world, tmp_path, damage):
    from safetensors.torch import load_file
    from castle_convert.distill.checkpoint import ResumeError
    out = tmp_path / "out"
    ckpt = _interrupted(world, out)
    if damage == "truncate-weights":
        _truncate(ckpt, "student.safetensors")
    elif damage == "garbage-optimizer":
        (ckpt / "optimizer.safetensors").write_bytes(b"\x00" * 100)
    elif damage == "optimizer-shape":
        t = load_file(str(ckpt / "optimizer.safetensors"))
        key = next(k for k in t if k.endswith("exp_avg"))
        t[key] = torch.zeros(3, 3)
        save_file(t, str(ckpt / "optimizer.safetensors"))
    elif damage == "rng":
        (ckpt / "rng_0.json").write_text('{"python": [3, [1, 2], null]}')
    else:
        state = json.loads((ckpt / "state.json").read_text())
        state["step"] = -5
        (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(ResumeError, match=r"damaged or does not fit.*--overwrite") as err:
        _run(world, out, resume=True)
    assert len(str(err.value).splitlines()) == 1 and not out.exists()


def test_divergence_stops_with_the_step_and_keeps_the_checkpoint(world, tmp_path):
    from castle_convert.distill.losses import DivergenceError
    out = tmp_path / "out"

    loop = sys.modules["castle_convert.distill.loop"]
    poisoned = [False]

    def poison(step):                       # after the step-2 checkpoint, the next loss is NaN
        if step == 3:
            poisoned[0] = True

    original = loop._loss

    def nan_loss(*a, **k):
        loss, parts = original(*a, **k)
        return (loss * float("nan"), parts) if poisoned[0] else (loss, parts)

    loop._loss = nan_loss
    try:
        with pytest.raises(DivergenceError, match=r"diverged at step 4.*lower learning rate.*checkpoint.*kept") as e:
            _run(world, out, on_step=poison)
    finally:
        loop._loss = original
    assert len(str(e.value).splitlines()) == 1
    state = json.loads((tmp_path / "out.run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and not out.exists()


def test_kill_during_final_save_leaves_no_litter_for_the_next_run(world, tmp_path):
    """A SIGKILL during the final save leaves .out.tmp-PID-*; the next save removes it (and .out.old),
    but not a temp folder of a save still running in a live process."""
    out = tmp_path / "out"
    dead = tmp_path / ".out.tmp-999999-abcd"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / ".out.old").mkdir()
    live = tmp_path / f".out.tmp-{os.getppid()}-live"
    live.mkdir()
    _run(world, out)
    assert not dead.exists() and not (tmp_path / ".out.old").exists() and live.exists()
    cc.save_pretrained(cc.load(out), out, overwrite=True)                  # its own output: replaced
    assert (out / "model.safetensors").is_file() and not (tmp_path / ".out.old").exists()
    (tmp_path / "file_out").write_text("a file in the way")                # not castle-convert's: never replaced
    with pytest.raises(FileExistsError, match="file_out is a file"):
        cc.save_pretrained(cc.load(out), tmp_path / "file_out", overwrite=True)
    assert (tmp_path / "file_out").read_text() == "a file in the way"


def test_sigkill_then_resume_in_a_fresh_process(world, tmp_path):
    """A real kill (SIGKILL of the CLI after its first checkpoint) and --resume in a new process."""
    import signal
    import time
    out = tmp_path / "out"
    sets = [x for x in TINY_RUN if not x.startswith("epochs")] + ["epochs=30", "castling.anneal.end_epoch=1"]
    cmd = [sys.executable, "-m", "castle_convert", *_distill(world, tmp_path, sets=[])[:-len(_sets(TINY_RUN))],
           *_sets(sets)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "out.run" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists() and not out.exists()
    done = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "report.json").read_text())["steps"] == 90
    assert not out.with_name("out.run").exists()


# -- published output: resolution, card, registration, loading, push ------------------------------

def test_published_size_is_the_deployment_one_not_the_distilled_one(world, tmp_path):
    """Distilled at 16 px (cheap), published for the teacher's own 32 px: the processor, timm's input_size and the
    card say 32 (was: 16 — a dense head built for the teacher's grid silently got a smaller one); the distillation
    size is recorded."""
    from timm.models._hub import save_for_hf
    args = {**TINY_ARGS, "dynamic_img_size": True}
    torch.manual_seed(0)
    save_for_hf(timm.create_model("vit_tiny_patch16_224", **args), str(tmp_path / "dyn"), model_args=args,
                safe_serialization=True)
    out = tmp_path / "out"
    _run(world, out, ["data.resolution=16"], model=tmp_path / "dyn")
    proc = json.loads((out / "preprocessor_config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert proc.get("crop_size", proc["size"]) == {"height": 32, "width": 32}   # timm's eval crop, at 32 px
    assert config["distilled_resolution"] == 16 and config["input_size"] == [3, 32, 32]
    assert config["deploy_resolution"] == 32
    card = (out / "README.md").read_text()
    assert "produces 32×32 px images" in card and "distilled at 16 px" in card and "Another input size" in card
    from timm.data import resolve_data_config
    assert resolve_data_config(model=cc.load(out))["input_size"] == (3, 32, 32)


def test_card_claims_greyscale_only_when_known(world, tmp_path):
    from transformers import ViTForImageClassification
    model = ViTForImageClassification.from_pretrained(world["hf_vit"])
    assert model.config.image_size == 32
    out = cc.save_pretrained(cc.finalize(cc.convert(model), force=True), tmp_path / "hf_out")
    text = (out / "README.md").read_text()
    assert "mean (0.5, 0.5, 0.5)" in text and "greyscale" not in text


def test_timm_names_registered_whatever_the_import_order():
    code = ("import castle_convert, transformers, importlib.util; importlib.util.find_spec('timm'); import timm; "
            "m = timm.create_model('castle_test_vit'); print(type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and "VisionTransformer" in out.stdout, out.stderr[-2000:]


def test_checkpoint_path_in_weights_metadata_is_never_loaded(world, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": _Evil(marker)}, evil)
    d = _copy(world["published"], tmp_path / "pub")
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    inner = json.loads(meta["castle_convert"])
    inner["source"]["model_args"]["checkpoint_path"] = str(evil)
    meta["castle_convert"] = json.dumps(inner)
    save_file(load_file(str(d / "model.safetensors")), str(d / "model.safetensors"), metadata=meta)
    cfg = json.loads((d / "config.json").read_text())
    cfg["source"]["model_args"]["checkpoint_path"] = str(evil)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(cc.CheckpointError, match="checkpoint_path"):
        cc.load(d)
    with pytest.raises(cc.CheckpointError, match="checkpoint_path"):
        timm.create_model("castle_test_vit", pretrained=True, pretrained_cfg_overlay=dict(file=str(d / "model.safetensors")))
    with pytest.raises(cc.CheckpointError, match="checkpoint_path"):
        timm.create_model(f"local-dir:{d}", pretrained=True)
    assert not marker.exists()


def test_push_dry_run_skips_links_out_of_the_directory(world, tmp_path):
    from castle_convert.export.push import plan_push
    d = _copy(world["published"], tmp_path / "pub")
    (d / "passwd").symlink_to("/etc/passwd")
    (d / "inside.json").symlink_to(d / "config.json")
    plan = plan_push(d, "me/model")
    names = [n for n, _ in plan.files]
    assert "passwd" not in names and "inside.json" in names
    assert "skipped (not uploaded): passwd (a link to /etc/passwd, outside the directory)" in plan.format()
