"""A converted model wherever a timm / transformers / PEFT / Accelerate user takes it: every route
either works or stops with a one-line error saying what to do instead (issue 10)."""

from __future__ import annotations

import copy

import pytest
import torch

import castle_convert as cc
from families import FAMILIES

BY_ID = {f.id: f for f in FAMILIES}


def _linear_params(model):
    """The parameters only the linear branch uses (γ / separable gains, DW): zero gradient at gate 1."""
    return {n: p for n, p in model.named_parameters()
            if n.endswith(("gamma", "dw.conv.weight", "context_gain", "relu_gain", "context_query"))}


# -- 2. training outside cc.distill ----------------------------------------------------------------

def test_gate_one_trains_nothing_and_finalize_refuses():
    f = FAMILIES[0]
    student = cc.convert(f.build()).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    for _ in range(3):                                   # a user's loop, no schedule: gate stays 1
        student(torch.randn(2, 3, 32, 32)).pow(2).mean().backward()
        assert all(p.grad is None or p.grad.abs().max() == 0 for p in _linear_params(student).values())
        opt.step()
        opt.zero_grad()
    with pytest.raises(cc.NotAnnealedError, match="never trained at gate 0.*GateSchedule.*CastlingTrainerCallback"
                                                  ".*force=True"):
        cc.finalize(student)
    assert cc.finalize(student, force=True) is not None             # the escape hatch


@pytest.mark.parametrize("kind", ["linear_angular", "separable"])
def test_optimizer_without_the_students_parameters_is_caught(kind):
    """A loop that anneals correctly but whose optimizer holds the teacher's parameters (built before
    cc.convert, which copies): the student ran at gate 0 yet learned nothing — finalize refuses."""
    teacher = FAMILIES[0].build()
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    student = cc.convert(teacher, kind=kind).train()
    schedule = cc.GateSchedule(student, total_steps=4, end=0.5)
    for _ in range(4):
        student(torch.randn(2, 3, 32, 32)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
    assert schedule.gate == 0.0
    with pytest.raises(cc.NotAnnealedError, match="none of their parameters.*changed since convert\\(\\).*optimizer does not hold"):
        cc.finalize(student)
    import timm.utils.model
    with pytest.raises(cc.NotAnnealedError, match="never updated"):
        timm.utils.model.reparameterize_model(copy.deepcopy(student))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)           # the fix the message names
    student(torch.randn(2, 3, 32, 32)).pow(2).mean().backward()
    opt.step()
    assert cc.finalize(student).castling_parity <= 1e-4


@pytest.mark.parametrize("kind", ["linear_angular", "separable"])
def test_gate_schedule_plain_loop(kind):
    student = cc.convert(FAMILIES[0].build(), kind=kind).train()
    before = {n: p.detach().clone() for n, p in _linear_params(student).items()}
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    schedule = cc.GateSchedule(student, total_steps=10, end=0.5)
    assert schedule.gate == 1.0
    gates = []
    for _ in range(10):
        student(torch.randn(2, 3, 32, 32)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        gates.append(schedule.step()[0])
    assert gates[0] < 1.0 and gates[-1] == 0.0 and gates == sorted(gates, reverse=True)
    assert any((p - before[n]).abs().max() > 0 for n, p in _linear_params(student).items())
    assert cc.finalize(student).castling_parity <= 1e-4
    state = schedule.state_dict()
    again = cc.GateSchedule(student, total_steps=10, end=0.5)
    again.load_state_dict(state)
    assert again.gate == 0.0


def test_attention_transfer_alone_counts_as_training_at_gate_zero():
    teacher = FAMILIES[0].build()
    student = cc.convert(teacher)
    cc.attention_transfer(teacher, student, [torch.randn(4, 3, 32, 32) for _ in range(2)], steps=2, progress=False)
    assert cc.finalize(student).castling_parity <= 1e-4          # stage 1 trains each layer at gate 0


def test_gate_schedule_timm_style_and_errors():
    student = cc.convert(FAMILIES[0].build())
    s = cc.GateSchedule(student, total_epochs=4, updates_per_epoch=5, end=0.5)
    assert s.step_update(5)[0] == pytest.approx(0.5)     # epoch 1 of the 2-epoch anneal, cosine: half way
    assert s.step(2)[0] == 0.0
    forms = [m for m in student.modules() if isinstance(m, cc.attention.CastlingTrainingForm)]
    assert all(m.aux_gate == 0.0 for m in forms)
    with pytest.raises(ValueError, match="exactly one of total_steps"):
        cc.GateSchedule(student)
    with pytest.raises(ValueError, match="end < 1"):
        cc.GateSchedule(student, total_steps=10, end=1.0)
    with pytest.raises(ValueError, match="updates_per_epoch"):
        cc.GateSchedule(student, total_epochs=2).step_update(3)


def test_trainer_callback_anneals_under_hf_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    f = BY_ID["hf-vit"]
    data = [{"pixel_values": torch.randn(3, 32, 32), "labels": i % 10} for i in range(16)]

    def run(callbacks):
        student = cc.convert(f.build())
        args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=6, per_device_train_batch_size=4,
                                 learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                                 logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
        Trainer(model=student, args=args, train_dataset=data, callbacks=callbacks).train()
        return student

    plain = run([])
    with pytest.raises(cc.NotAnnealedError):
        cc.finalize(plain)
    cb = cc.CastlingTrainerCallback(end=0.5)
    before = {n: p.detach().clone() for n, p in _linear_params(cc.convert(f.build())).items()}
    student = run([cb])
    assert cb.gate == 0.0
    assert any((p.detach().cpu() - before[n]).abs().max() > 0 for n, p in _linear_params(student).items())
    assert cc.finalize(student).castling_parity <= 1e-4


# -- 1. transformers' own save_pretrained / push_to_hub ---------------------------------------------

def _annealed(model, kind="linear_angular", **kw):
    """A converted model trained (one optimizer step) at gate 0, so finalize accepts it."""
    student = cc.convert(model, kind=kind, **kw)
    cc.set_schedule(student, 0.0, 0.0)
    from castle_convert.adapters import example_inputs, forward
    from castle_convert.convert import primary_output
    opt = torch.optim.SGD(student.parameters(), lr=1e-3)
    primary_output(forward(student, example_inputs(student))).float().pow(2).mean().backward()
    opt.step()
    student.zero_grad(set_to_none=True)
    return student


def test_hf_save_pretrained_training_form_refused(tmp_path):
    student = cc.convert(BY_ID["hf-vit"].build())
    for m in (student, student.vit):
        with pytest.raises(cc.ExportError, match=r"training form.*cc.save_pretrained\(cc.finalize\(model\), DIR\)"):
            m.save_pretrained(tmp_path / "x")
        with pytest.raises(cc.ExportError, match="training form"):
            m.push_to_hub("me/x")
    assert not (tmp_path / "x").exists()


def test_trainer_checkpoints_of_the_training_form_resume_and_do_not_load_as_a_vit(tmp_path):
    from transformers import AutoModelForImageClassification, Trainer, TrainingArguments

    f = BY_ID["hf-vit"]
    data = [{"pixel_values": torch.randn(3, 32, 32), "labels": i % 10} for i in range(16)]

    def trainer(student, steps):
        args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=4,
                                 learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="steps", save_steps=3,
                                 logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
        return Trainer(model=student, args=args, train_dataset=data, callbacks=[cc.CastlingTrainerCallback(end=0.5)])

    trainer(cc.convert(f.build()), 3).train()                   # Trainer's default: checkpoints by steps
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert (ckpt / "model.safetensors").is_file() and not (ckpt / "config.json").exists()
    with pytest.raises((OSError, ValueError)):                   # no config.json: never a plain ViT, random attention
        AutoModelForImageClassification.from_pretrained(ckpt)
    resumed = cc.convert(f.build())
    trainer(resumed, 6).train(resume_from_checkpoint=str(ckpt))
    assert cc.finalize(resumed).castling_parity <= 1e-4


def test_hf_save_pretrained_inference_form_writes_castle_directory(tmp_path):
    from transformers import AutoModelForImageClassification

    final = cc.finalize(_annealed(BY_ID["hf-vit"].build())).eval()
    # (not "d": transformers caches remote-code classes by the directory's name within a process)
    final.save_pretrained(tmp_path / "hf_d", safe_serialization=True)     # transformers' own call
    import json
    config = json.loads((tmp_path / "hf_d" / "config.json").read_text())
    assert config["model_type"] == "castling_vit" and "castling" in config
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = final(x).logits
        hub = AutoModelForImageClassification.from_pretrained(tmp_path / "hf_d", trust_remote_code=True).eval()
        assert (hub(x).logits - ref).abs().max() <= 1e-5
        assert (cc.load(tmp_path / "hf_d")(x).logits - ref).abs().max() <= 1e-5
    from castle_convert.export.save import OutputExistsError
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        final.save_pretrained(tmp_path / "hf_d")                            # never clobbers a directory silently
    with pytest.raises(cc.ExportError, match="push_to_hub"):
        final.save_pretrained(tmp_path / "e", push_to_hub=True)


def test_hf_push_to_hub_uploads_the_castle_directory(monkeypatch):
    from castle_convert.export import push as push_mod

    final = cc.finalize(_annealed(BY_ID["hf-vit"].build()))
    seen = {}

    def fake_push(directory, repo_id, **kw):
        seen.update(files=sorted(p.name for p in directory.iterdir()), repo=repo_id)
        return "ok"

    monkeypatch.setattr(push_mod, "push", fake_push)
    assert final.push_to_hub("me/castle-vit") == "ok"
    assert seen["repo"] == "me/castle-vit"
    assert {"config.json", "model.safetensors", "modeling_castling.py", "README.md"} <= set(seen["files"])


# -- 3. output_attentions / attn_implementation --------------------------------------------------

@pytest.mark.parametrize("form", ["training", "inference"])
def test_output_attentions_and_attn_implementation_refused(form):
    student = cc.convert(BY_ID["hf-vit"].build())
    model = student if form == "training" else cc.finalize(student, force=True)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(NotImplementedError, match="output_attentions=True.*N×N"):
        model(x, output_attentions=True)
    assert model(x).attentions is None
    with pytest.raises(NotImplementedError, match="attn_implementation"):
        model.set_attn_implementation("eager")


# -- 4. timm metadata; 11. checkpoint_path=; 6. features_only ----------------------------------------

def _timm_dir(tmp_path, kind="linear_angular", name="d", **kw):
    final = cc.finalize(_annealed(FAMILIES[0].build(), kind=kind, **kw)).eval()
    return final, cc.save_pretrained(final, tmp_path / name)


def test_timm_pretrained_cfg_after_load_names_castle_and_save_for_hf_reloads(tmp_path):
    import timm
    from timm.models import save_for_hf

    assert FAMILIES[0].build().pretrained_cfg.get("hf_hub_id")         # the softmax weights' id, before
    final, d = _timm_dir(tmp_path, kind="separable")
    model = cc.load(d)
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == "castle_test_vit"
    assert not any(cfg.get(k) for k in ("hf_hub_id", "url", "tag", "file"))
    save_for_hf(model, str(tmp_path / "hf"), safe_serialization=True)
    again = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (again(x) - final(x)).abs().max() <= 1e-5
    # the timm route's own models carry the same metadata
    routed = timm.create_model("castle_test_vit", pretrained=True, pretrained_cfg_overlay=dict(file=str(d)))
    assert routed.pretrained_cfg["architecture"] == "castle_test_vit" and not routed.pretrained_cfg.get("hf_hub_id")



@pytest.mark.parametrize("fid", ["timm-vit", "hf-dinov2-registers"])
def test_save_for_hf_round_trip_for_every_source(tmp_path, fid):
    """timm's save_for_hf of a castle_* model reloads with local-dir:, for a timm source and for a transformers one
    (the main job's kind: the timm equivalent carries its directory's config; was "model.safetensors is missing" /
    "no 'castle_convert' metadata"); timm's default (a pickle) is refused in one line naming safe_serialization."""
    import timm
    from timm.models import save_for_hf

    final = cc.finalize(_annealed(BY_ID[fid].build()))
    d = cc.save_pretrained(final, tmp_path / "d")
    model = timm.create_model(f"local-dir:{d}", pretrained=True).eval()
    save_for_hf(model, str(tmp_path / "hf"), safe_serialization=True)
    again = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (again.forward_features(x) - model.forward_features(x)).abs().max() == 0
    assert again.pretrained_cfg["architecture"] == model.pretrained_cfg["architecture"]
    save_for_hf(model, str(tmp_path / "pickled"))                  # timm's default: pytorch_model.bin
    with pytest.raises(cc.CheckpointError, match=r"holds pytorch_model\.bin, a pickle, .*save_for_hf\(model, DIR, "
                                                 r"safe_serialization=True\)") as e:
        timm.create_model(f"local-dir:{tmp_path / 'pickled'}", pretrained=True)
    assert "\n" not in str(e.value)

def test_save_for_hf_without_castle_config_is_a_clear_error(tmp_path):
    import timm
    from safetensors.torch import save_file

    final, d = _timm_dir(tmp_path)
    save_file(final.state_dict(), str(tmp_path / "bare.safetensors"))    # weights with no castle-convert config
    with pytest.raises(cc.CheckpointError, match=r"no 'castle_convert' metadata.*cc.save_pretrained\(model, DIR\)"):
        timm.create_model("castle_test_vit", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "bare.safetensors")))


@pytest.mark.parametrize("kind", ["separable", "linear_angular"])
def test_timm_checkpoint_path_reads_the_files_config(tmp_path, kind):
    import timm

    final, d = _timm_dir(tmp_path, kind=kind, keep_softmax=[1], dw_kernel=5)
    model = timm.create_model("castle_test_vit", checkpoint_path=str(d / "model.safetensors")).eval()
    assert model.castling_config.kind == kind and model.castling_config.dw_kernel == 5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - final(x)).abs().max() <= 1e-5


def test_timm_features_only_route_and_save(tmp_path):
    import timm

    final, d = _timm_dir(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = final.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for name, extra in ((f"local-dir:{d}", {}), ("castle_test_vit", dict(pretrained_cfg_overlay=dict(file=str(d))))):
        feats = timm.create_model(name, pretrained=True, features_only=True, out_indices=(0, 1), **extra).eval()
        with torch.no_grad():
            out = feats(x)
        assert len(out) == 2 and all((a - b).abs().max() <= 1e-5 for a, b in zip(out, ref))
    fresh = timm.create_model("castle_test_vit", features_only=True, out_indices=(1,), img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2)                       # no weights: random
    assert len(fresh(x)) == 1 and type(fresh).__name__ == "FeatureGetterNet"
    cc.save_pretrained(feats, tmp_path / "feats")                        # the features model itself
    back = cc.load(tmp_path / "feats")
    with torch.no_grad():
        assert all((a - b).abs().max() <= 1e-5 for a, b in zip(back(x), ref))


# -- 9. filter_fn order ----------------------------------------------------------------------------

def test_filter_fn_takes_module_fqn_like_torchao_and_the_old_order():
    from timm.layers.attention import Attention

    model = FAMILIES[0].build()
    seen = []

    def torchao_style(module, fqn):
        seen.append((type(module).__name__, fqn))
        return isinstance(module, Attention) and fqn.startswith("blocks.0.")

    def typed(n: str, m) -> bool:           # old (name, module) order, recognised by the annotation
        return n.startswith("blocks.0.")

    for fn in (torchao_style, lambda module, fqn: fqn.startswith("blocks.0."),
               lambda name, m: name.startswith("blocks.0."), typed):
        assert cc.convert(model, filter_fn=fn).castling_converted == ["blocks.0.attn"]
        assert [c["name"] for c in cc.inspect(model, filter_fn=fn).converted] == ["blocks.0.attn"]
    assert seen and all(cls == "Attention" and isinstance(fqn, str) for cls, fqn in seen)


# -- 10. cc.load("owner/repo") ----------------------------------------------------------------------

def test_load_resolves_a_hub_repo_id_from_the_cache(tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    final, d = _timm_dir(tmp_path)
    cache = tmp_path / "hub-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--me--castle-vit" / "snapshots" / commit
    shutil.copytree(d, snap)
    (cache / "models--me--castle-vit" / "refs").mkdir()
    (cache / "models--me--castle-vit" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = cc.load("me/castle-vit")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - final(x)).abs().max() <= 1e-5
    with pytest.raises(cc.CheckpointError, match="me/missing.*could not be fetched.*local Hugging Face cache"):
        cc.load("me/missing")
    with pytest.raises(cc.CheckpointError, match="no such directory"):
        cc.load(tmp_path / "nope")


# -- 8. PEFT names -------------------------------------------------------------------------------

def test_lora_targets_map_original_names_and_unmerged_save_refused(tmp_path):
    peft = pytest.importorskip("peft")

    teacher = BY_ID["hf-vit"].build()
    student = cc.convert(teacher)
    assert cc.lora_targets(student, ["query", "value"]) == ["qkv"]
    assert cc.lora_targets(student, ["q_proj", "v_proj", "o_proj"]) == ["qkv", "proj"]
    assert "proj" in cc.lora_targets(student, ["dense"])         # attention output.dense → proj
    with pytest.raises(ValueError, match="no Linear named 'nope'"):
        cc.lora_targets(student, ["nope"])
    lora = peft.get_peft_model(student, peft.LoraConfig(r=2, target_modules=cc.lora_targets(student, ["query", "value"]),
                                                        init_lora_weights=False))
    assert any("qkv.lora_A" in n for n, _ in lora.named_parameters())
    cc.set_schedule(lora, 0.0, 0.0)
    lora(pixel_values=torch.randn(2, 3, 32, 32)).logits.pow(2).mean().backward()
    with pytest.raises(cc.ExportError, match="merge_and_unload"):
        cc.save_pretrained(lora, tmp_path / "a")
    merged = lora.merge_and_unload()
    final = cc.finalize(merged)
    with pytest.raises(cc.ExportError, match="merge_and_unload"):           # LoRA layers inside, not merged
        cc.save_pretrained(peft.get_peft_model(copy.deepcopy(final), peft.LoraConfig(r=2, target_modules=["proj"])).base_model.model,
                           tmp_path / "b")
    cc.save_pretrained(final, tmp_path / "c")
    # the separable inference form renames qkv to in_proj: the same call finds it
    sep = cc.finalize(_annealed(BY_ID["hf-vit"].build(), kind="separable"))
    assert cc.lora_targets(sep, ["q_proj", "v_proj"]) == ["in_proj"]


# -- 5. timm's reparameterize_model ------------------------------------------------------------------

@pytest.mark.parametrize("fid", ["timm-vit", "hf-vit"])
def test_reparameterize_model_finalizes_like_finalize(fid):
    from timm.utils.model import reparameterize_model

    from castle_convert.convert import castling_modules

    f = BY_ID[fid]
    with pytest.raises(cc.NotAnnealedError, match="GateSchedule"):
        reparameterize_model(cc.convert(f.build()))
    student = _annealed(f.build())
    fused = reparameterize_model(student).eval()
    assert all(not m.is_training_form for _, m in castling_modules(fused))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = f(cc.finalize(student).eval(), x)
        got = f(fused, x)
    from castle_convert.convert import primary_output
    assert (primary_output(got) - primary_output(ref)).abs().max() <= 1e-6


# -- 13. model card and config.json -------------------------------------------------------------------

def test_card_library_and_config_without_training_keys_or_duplicates(tmp_path):
    import json

    from huggingface_hub import ModelCard

    _, timm_dir = _timm_dir(tmp_path, name="t")
    assert ModelCard.load(timm_dir / "README.md").data.library_name == "timm"
    hf_final = cc.finalize(_annealed(BY_ID["hf-vit"].build())).eval()
    hf_dir = cc.save_pretrained(hf_final, tmp_path / "h")
    assert ModelCard.load(hf_dir / "README.md").data.library_name == "transformers"
    for d in (timm_dir, hf_dir):
        config = json.loads((d / "config.json").read_text())
        assert not {"gate", "threshold", "gamma_init"} & set(config["castling"])
    config = json.loads((hf_dir / "config.json").read_text())
    assert "config" not in config["source"] and config["hidden_size"] == 32      # geometry once, at the top
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf_final(x).logits
        assert (cc.load(hf_dir)(x).logits - ref).abs().max() <= 1e-5
    # a directory written before (training keys, source.config repeated) still loads
    old = dict(config, castling={**config["castling"], "gate": 1.0, "threshold": 0.0, "gamma_init": "calibrate"})
    old["source"] = {**config["source"], "config": {k: v for k, v in config.items() if k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size", "patch_size",
        "num_labels", "id2label", "label2id", "qkv_bias")} | {"model_type": "vit"}}
    (hf_dir / "config.json").write_text(json.dumps(old))
    with torch.no_grad():
        assert (cc.load(hf_dir)(x).logits - ref).abs().max() <= 1e-5


# -- 7. timm-source checkpoints through transformers remote code ---------------------------------------

@pytest.mark.parametrize("fid", ["timm-vit", "timm-eva02", "timm-naflexvit"])
def test_timm_checkpoint_through_remote_code_hidden_states_checkpointing_embeddings(fid, tmp_path):
    from transformers import AutoModelForImageClassification

    final = cc.finalize(_annealed(BY_ID[fid].build())).eval()
    # one directory name per family: transformers keys the remote-code module by directory name and code hash, and
    # a process maps that module's config class to the first model class it loaded with it
    d = cc.save_pretrained(final, tmp_path / fid)
    hub = AutoModelForImageClassification.from_pretrained(d, trust_remote_code=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = hub(x, output_hidden_states=True)
        assert len(out.hidden_states) == len(final.blocks) + 1
        assert (hub.norm(out.hidden_states[-1]) - final.forward_features(x)).abs().max() <= 1e-5
        assert (out.logits - final(x)).abs().max() <= 1e-5
    assert hub.get_input_embeddings() is getattr(hub, "patch_embed", None) or hub.embeds    # naflexvit: embeds
    with pytest.raises(ValueError, match="output_attentions"):
        hub(x, output_attentions=True)

    def grads(model):
        model.zero_grad()
        model(x).logits.pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    hub.train()
    plain = grads(hub)
    hub.gradient_checkpointing_enable()
    assert hub.is_gradient_checkpointing
    calls = []
    handle = hub.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    ckpt = grads(hub)
    handle.remove()
    assert len(calls) == 2                      # the block ran again in backward: checkpointed
    assert plain.keys() == ckpt.keys() and all(torch.allclose(plain[k], ckpt[k], atol=1e-6) for k in plain)


# -- 12. engines beyond DDP ------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["FSDP", "DEEPSPEED"])
def test_distill_refuses_sharded_engines_in_one_line(engine):
    from accelerate.utils import DistributedType
    from torch.utils.data import TensorDataset

    from castle_convert.data import DataBundle
    from castle_convert.distill.loop import EngineUnsupported, distill
    from castle_convert.recipes import load_recipe

    class Sharded:                                # what an Accelerator launched with that plugin reports
        distributed_type = getattr(DistributedType, engine)

    teacher = FAMILIES[0].build()
    ds = TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 10)
    data = DataBundle(name="t", train=ds, val=ds, num_classes=10, classes=[str(i) for i in range(10)])
    with pytest.raises(EngineUnsupported, match=f"does not run under {engine}.*--multi_gpu.*GateSchedule") as e:
        distill(teacher, cc.convert(teacher), data, load_recipe("toy", ["transfer.steps=0"]), accelerator=Sharded(),
                progress=False)
    assert "\n" not in str(e.value) and isinstance(e.value, cc.ConfigError)      # the CLI prints it in one line


def test_hf_remote_code_refuses_output_attentions(tmp_path):
    from transformers import AutoModelForImageClassification

    final = cc.finalize(_annealed(BY_ID["hf-vit"].build()))
    d = cc.save_pretrained(final, tmp_path / "hf_h")
    hub = AutoModelForImageClassification.from_pretrained(d, trust_remote_code=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="output_attentions"):
        hub(x, output_attentions=True)
    assert len(hub(x, output_hidden_states=True).hidden_states) == 3
