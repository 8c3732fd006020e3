"""Padded batches of differently sized images (NaFlex) through whole models: transformers SigLIP2 and timm
naflexvit. The converted attentions get each call's key-padding mask and each image's own grid from the
model's forward; every image of a padded batch must get the output it gets alone, at conversion (equal to the
teacher) and after training (non-zero DW, gate 0), in the inference form and through the saved directory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import castle_convert as cc
from castle_convert.adapters import hf_siglip2
from castle_convert.convert import primary_output

from families import FAMILIES

SIGLIP2 = next(f for f in FAMILIES if f.id == "hf-siglip2-naflex")
KINDS = ["linear_angular", "separable"]
# (rows, cols) of the images in one padded batch: non-square, different token counts
SIZES = [(4, 3), (2, 4), (3, 3)]


def _trained(model, seed: int = 0):
    """Non-trivial converted parameters (DW conv, γ, separable gains), as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".dw." in name or "gamma" in name or "gain" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "gamma" in name else 0.0))
    return model


def _siglip2_batch(seed: int = 0):
    """Each image's own inputs, and the padded batch of them all (patches, mask, grids)."""
    g = torch.Generator().manual_seed(seed)
    p = SIGLIP2.patch
    alone = [hf_siglip2.patchify(torch.randn(1, 3, r * p, c * p, generator=g), p) for r, c in SIZES]
    n = max(a[0].shape[1] for a in alone)
    pixels = torch.cat([F.pad(a[0], (0, 0, 0, n - a[0].shape[1])) for a in alone])      # (B, N, P·P·C)
    mask = torch.cat([F.pad(a[1], (0, n - a[1].shape[1])) for a in alone])               # (B, N)
    shapes = torch.cat([a[2] for a in alone])                                             # (B, 2)
    return alone, (pixels, mask, shapes)


@torch.no_grad()
def _padded_vs_alone(model, alone, batch) -> tuple[float, float]:
    """(max |Δ| between each image in the padded batch and alone — tokens and pooled, the same with the
    padding mask withheld from the converted attentions: how much padding leaks in without it). A mask that
    disagrees with the grids is refused at the model's input (test_hostile_round4), so it is withheld below it."""
    out = model(*batch)
    unmasked = model(*batch, token_mask=torch.ones_like(batch[1]).bool(), grid_sizes=batch[2])
    diff = leak = 0.0
    for i, a in enumerate(alone):
        ref = model(*a)
        n = a[0].shape[1]
        diff = max(diff, (out.last_hidden_state[i, :n] - ref.last_hidden_state[0]).abs().max().item(),
                   (out.pooler_output[i] - ref.pooler_output[0]).abs().max().item())
        leak = max(leak, (unmasked.last_hidden_state[i, :n] - ref.last_hidden_state[0]).abs().max().item())
    return diff, leak


@pytest.mark.parametrize("kind", KINDS)
def test_siglip2_padded_batch_starts_equal_to_the_teacher(kind):
    teacher = SIGLIP2.build()
    student = cc.convert(teacher, kind=kind).eval()
    alone, batch = _siglip2_batch()
    with torch.no_grad():
        t, s = teacher(*batch), student(*batch)
    real = batch[1].bool()
    assert (t.last_hidden_state - s.last_hidden_state)[real].abs().max() <= 1e-5
    assert (t.pooler_output - s.pooler_output).abs().max() <= 1e-5
    assert _padded_vs_alone(student, alone, batch)[0] <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", ["training", "inference"])
def test_siglip2_each_image_of_a_padded_batch_gets_its_alone_output(kind, form):
    student = _trained(cc.convert(SIGLIP2.build(), kind=kind))
    cc.set_schedule(student, gate=0.0, threshold=0.0)
    model = (student if form == "training" else cc.finalize(student, force=True)).eval()
    alone, batch = _siglip2_batch()
    diff, leak = _padded_vs_alone(model, alone, batch)
    assert diff <= 1e-5
    assert leak > 1e-3               # without the mask the padding leaks in: the check can fail


def test_siglip2_padded_batch_through_the_saved_directory(tmp_path):
    """cc.load and the transformers remote code (the package's copy) give the padded batch's outputs too."""
    from castle_convert.export.load import read_safetensors
    from castle_convert.export.save import hub_model
    import json

    final = cc.finalize(_trained(cc.convert(SIGLIP2.build())), force=True).eval()
    cc.save_pretrained(final, tmp_path / "out")
    alone, batch = _siglip2_batch(seed=1)
    state, _ = read_safetensors(tmp_path / "out" / "model.safetensors")
    hub = hub_model(json.loads((tmp_path / "out" / "config.json").read_text()), state)
    with torch.no_grad():
        ref = final(*batch).last_hidden_state
        for model in (cc.load(tmp_path / "out"), hub):
            assert (model(*batch).last_hidden_state - ref).abs().max() <= 1e-5
    assert _padded_vs_alone(hub, alone, batch)[0] <= 1e-5


def _as_naflex_dict(batch) -> dict:
    """A SigLIP2 padded batch as timm's NaFlex dict: the same patches, ``patch_coord`` (B, N, 2) row-major over each
    image's grid (padding at (0, 0), as timm's collator pads), ``patch_valid`` = ``pixel_attention_mask``."""
    pixels, mask, shapes = batch
    B, N = mask.shape
    pos = torch.arange(N).unsqueeze(0)                                                   # (1, N)
    cols = shapes[:, 1:2]                                                                # (B, 1)
    coord = torch.stack([pos // cols, pos % cols], dim=-1) * mask.unsqueeze(-1)          # (B, N, 2)
    return dict(patches=pixels, patch_coord=coord, patch_valid=mask.bool())


@pytest.mark.parametrize("kind,keep", [("linear_angular", None), ("separable", None), ("linear_angular", [1])],
                         ids=["linear_angular", "separable", "hybrid"])
def test_siglip2_padded_batch_through_timm(tmp_path, kind, keep):
    """A SigLIP2 directory through timm (local-dir: → naflexvit_base_patch16_siglip): a padded NaFlex dict batch gives
    cc.load's padded SigLIP2 batch — real tokens and the MAP head's pooled output — and each image its alone
    output."""
    import timm
    student = _trained(cc.convert(SIGLIP2.build(), kind=kind, keep_softmax=keep))
    cc.set_schedule(student, gate=0.0, threshold=0.0)
    cc.save_pretrained(cc.finalize(student, force=True).eval(), tmp_path / "out")
    model = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    assert type(model).__name__ == "GridNaFlexVit"
    alone, batch = _siglip2_batch(seed=4)
    nf = _as_naflex_dict(batch)
    real = batch[1].bool()
    with torch.no_grad():
        ref = cc.load(tmp_path / "out")(*batch)
        assert (model.forward_features(**nf)["patches"] - ref.last_hidden_state)[real].abs().max() <= 1e-5
        assert (model(nf) - ref.pooler_output).abs().max() <= 1e-5
    diff, leak = _naflexvit_padded_vs_alone(model, [_as_naflex_dict(a) for a in alone], nf)
    assert diff <= 1e-5 and leak > 1e-3


def test_siglip2_export_with_a_dynamic_patch_count():
    """torch.export of the patch route with a dynamic batch and patch count: one graph for padded batches of
    any length (the original exports the same way)."""
    final = cc.finalize(_trained(cc.convert(SIGLIP2.build())), force=True).eval()
    alone, batch = _siglip2_batch()
    Dim = torch.export.Dim
    b, n = Dim("b", min=2, max=8), Dim("n", min=4, max=64)
    exported = torch.export.export(final, batch, dynamic_shapes=({0: b, 1: n}, {0: b, 1: n}, {0: b}))
    _, other = _siglip2_batch(seed=2)
    for inputs in (batch, tuple(t[:2] for t in other), tuple(F.pad(t, (0, 0, 0, 5)) if t.dim() == 3 else
                                                            F.pad(t, (0, 5)) if t.shape[-1] != 2 else t
                                                            for t in other)):
        with torch.no_grad():
            got, ref = exported.module()(*inputs), final(*inputs)
        real = inputs[1].bool()
        assert (got.last_hidden_state - ref.last_hidden_state)[real].abs().max() <= 1e-5


def test_siglip2_dual_encoder_converts_its_vision_tower_only():
    import transformers
    torch.manual_seed(0)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8, intermediate_size=64,
                  num_patches=16)
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    model = transformers.Siglip2Model(transformers.Siglip2Config(vision_config=vision, text_config=text)).eval()
    report = cc.inspect(model)
    assert [c["name"] for c in report.converted] == [f"vision_model.encoder.layers.{i}.self_attn" for i in (0, 1)]
    assert {r["name"] for r in report.left_softmax} == {"vision_model.head", "text_model"}
    student = cc.convert(model)
    x = torch.randn(2, 3, 32, 24)
    from castle_convert import adapters
    with torch.no_grad():
        assert (primary_output(adapters.forward(student, x)) - primary_output(adapters.forward(model, x))
                ).abs().max() <= 1e-5


# -- timm naflexvit: NaFlex dict batches (patches, patch_coord, patch_valid), as timm's collator builds them ----

NAFLEXVIT = next(f for f in FAMILIES if f.id == "timm-naflexvit")


def _naflexvit_batch(seed: int = 0, patch: int = 8):
    """Each image's own NaFlex dict, and the padded batch of them all."""
    from timm.data.naflex_transforms import patchify_image
    g = torch.Generator().manual_seed(seed)
    alone = []
    for r, c in SIZES:
        patches, coord, valid = patchify_image(torch.randn(3, r * patch, c * patch, generator=g), (patch, patch))
        alone.append(dict(patches=patches[None], patch_coord=coord[None], patch_valid=valid[None]))
    n = max(a["patches"].shape[1] for a in alone)
    batch = {k: torch.cat([F.pad(a[k], (0, 0, 0, n - a[k].shape[1]) if a[k].dim() == 3 else (0, n - a[k].shape[1]))
                           for a in alone]) for k in ("patches", "patch_coord", "patch_valid")}
    return alone, batch


@torch.no_grad()
def _naflexvit_padded_vs_alone(model, alone, batch) -> tuple[float, float]:
    """(max |Δ| of each image's logits and tokens in the padded batch vs alone, the same with the padding mask
    withheld from the converted attentions: the leak without it)."""
    def logits(inputs):              # timm's model(x), or the remote code's .logits
        out = model(inputs)
        return getattr(out, "logits", out)

    def tokens(inputs):              # timm's forward_features(...)["patches"], or the remote code's first output
        feats = model.forward_features(inputs["patches"], inputs["patch_coord"], inputs["patch_valid"])
        return feats["patches"] if isinstance(feats, dict) else feats[0]

    out, feats = logits(batch), tokens(batch)
    castle_call = type(model)._castle_call

    def no_mask(self, *args):                    # every token, padding too, taken as a real one
        grid, mask, sizes = castle_call(self, *args)
        return grid, torch.ones_like(mask), sizes

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(model), "_castle_call", no_mask)
        leaky = tokens(batch)
    P = model.num_prefix_tokens
    diff = leak = 0.0
    for i, a in enumerate(alone):
        n = P + a["patches"].shape[1]
        ref = tokens(a)
        diff = max(diff, (out[i] - logits(a)[0]).abs().max().item(), (feats[i, :n] - ref[0]).abs().max().item())
        leak = max(leak, (leaky[i, :n] - ref[0]).abs().max().item())
    return diff, leak


@pytest.mark.parametrize("kind", KINDS)
def test_naflexvit_padded_batch_starts_equal_to_the_teacher(kind):
    teacher = NAFLEXVIT.build()
    student = cc.convert(teacher, kind=kind).eval()
    alone, batch = _naflexvit_batch()
    with torch.no_grad():
        assert (teacher(batch) - student(batch)).abs().max() <= 1e-5
    assert _naflexvit_padded_vs_alone(student, alone, batch)[0] <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", ["training", "inference", "hybrid"])
def test_naflexvit_each_image_of_a_padded_batch_gets_its_alone_output(kind, form):
    """Converted layers take the padding mask and grids; a layer a hybrid keeps softmax takes timm's own mask."""
    student = _trained(cc.convert(NAFLEXVIT.build(), kind=kind, keep_softmax=[1] if form == "hybrid" else None))
    cc.set_schedule(student, gate=0.0, threshold=0.0)
    model = (student if form == "training" else cc.finalize(student, force=True)).eval()
    alone, batch = _naflexvit_batch()
    diff, leak = _naflexvit_padded_vs_alone(model, alone, batch)
    assert diff <= 1e-5
    assert leak > 1e-3


NAFLEX_SAVED = [("linear_angular", None), ("separable", None), ("linear_angular", [1]), ("separable", [1])]


def test_naflexvit_padded_batch_through_cc_load_timm_and_remote_code(tmp_path):
    """Both kinds and hybrids saved with the transformers remote code (CastlingTimmNaFlexVit*, built with timm): a
    padded NaFlex batch through cc.load, timm local-dir: and the remote code (in-process, and in a fresh process
    with castle_convert blocked) gives each image its alone output and equals the saved model."""
    import json

    import timm
    from safetensors.torch import save_file

    from castle_convert.export.load import read_safetensors
    from castle_convert.export.save import hub_model
    from test_publish import _subprocess

    alone, batch = _naflexvit_batch(seed=3)
    x = torch.randn(2, 3, 40, 24, generator=torch.Generator().manual_seed(4))      # images, another size
    cases = {}
    for kind, keep in NAFLEX_SAVED:
        name = f"{kind}{'-hybrid' if keep else ''}"
        final = cc.finalize(_trained(cc.convert(NAFLEXVIT.build(), kind=kind, keep_softmax=keep)), force=True).eval()
        d = cc.save_pretrained(final, tmp_path / name)
        config = json.loads((d / "config.json").read_text())
        assert config["architectures"] == ["CastlingTimmNaFlexVitForImageClassification"], name
        assert set(config["timm_naflex"]["layers"]) == set(config["converted_modules"]), name
        assert (d / "modeling_castling.py").exists() and "pip install timm" in (d / "README.md").read_text()
        hub = hub_model(config, read_safetensors(d / "model.safetensors")[0])
        with torch.no_grad():
            ref, ref_x = final(batch), final(x)
            for model in (cc.load(d), timm.create_model(f"local-dir:{d}", pretrained=True), hub):
                got, got_x = model.eval()(batch), model(x)
                assert (getattr(got, "logits", got) - ref).abs().max() <= 1e-5, (name, type(model))
                assert (getattr(got_x, "logits", got_x) - ref_x).abs().max() <= 1e-5, (name, type(model))
                diff, leak = _naflexvit_padded_vs_alone(model, alone, batch)
                assert diff <= 1e-5 and leak > 1e-3, (name, type(model), diff, leak)   # the mask is what holds it
            assert (hub(**batch).logits - ref).abs().max() <= 1e-5      # the collator's keys as keyword arguments
        n = hub.num_prefix_tokens + batch["patches"].shape[1]
        perm = torch.randperm(batch["patches"].shape[1], generator=torch.Generator().manual_seed(0))
        for bad, error, words in (({**batch, "attn_mask": torch.zeros(len(SIZES), 1, n, n)}, NotImplementedError,
                                   "attn_mask/is_causal"),
                                  ({k: v[:, perm] for k, v in batch.items()}, ValueError, "row-major"),
                                  ({k: v for k, v in batch.items() if k != "patch_valid"}, ValueError, "patch_valid")):
            with pytest.raises(error, match=words) as e:                 # as castle-convert's model: one line
                hub(bad)
            assert "\n" not in str(e.value)
        refs = {"ref": ref, "ref_x": ref_x, "x": x, **batch,
                **{f"alone{i}_{k}": v for i, a in enumerate(alone) for k, v in a.items()}}
        save_file({k: v.contiguous() for k, v in refs.items()}, str(tmp_path / f"{name}.ref.safetensors"))
        cases[name] = str(d)
    result = _subprocess(f"""
        import json, torch
        from transformers import AutoModel, AutoModelForImageClassification
        from safetensors.torch import load_file
        out = {{}}
        for name, d in {cases!r}.items():
            t = load_file({str(tmp_path)!r} + f"/{{name}}.ref.safetensors")
            batch = {{k: t[k] for k in ("patches", "patch_coord", "patch_valid")}}
            model = AutoModelForImageClassification.from_pretrained(d, trust_remote_code=True).eval()
            backbone = AutoModel.from_pretrained(d, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                logits = model(batch).logits
                diff = max((logits - t["ref"]).abs().max().item(),
                           (model(pixel_values=t["x"]).logits - t["ref_x"]).abs().max().item())
                feats = backbone(batch).last_hidden_state
                P = backbone.num_prefix_tokens
                for i in range(3):
                    a = {{k: t[f"alone{{i}}_{{k}}"] for k in batch}}
                    n = P + a["patches"].shape[1]
                    diff = max(diff, (model(a).logits[0] - logits[i]).abs().max().item(),
                               (backbone(a).last_hidden_state[0] - feats[i, :n]).abs().max().item())
            out[name] = [diff, type(model).__name__, type(backbone).__name__]
        print(json.dumps(out))
    """, tmp_path, block_castle=True)
    assert set(result) == set(cases)
    for name, (diff, cls, base) in result.items():
        assert diff <= 1e-5, (name, diff)
        assert (cls, base) == ("CastlingTimmNaFlexVitForImageClassification", "CastlingTimmNaFlexVitModel"), name


def test_naflexvit_attention_pool_head_stays_softmax_and_gets_the_mask():
    import timm
    from families import TINY
    torch.manual_seed(0)
    tiny = {k: v for k, v in TINY.items() if k != "dynamic_img_size"}
    teacher = timm.create_model("naflexvit_base_patch16_map", pretrained=False, num_classes=5,
                                pos_embed_grid_size=(4, 4), **tiny).eval()
    report = cc.inspect(teacher)
    assert [r["name"] for r in report.left_softmax] == ["attn_pool"]
    student = _trained(cc.convert(teacher))
    cc.set_schedule(student, gate=0.0, threshold=0.0)
    alone, batch = _naflexvit_batch()
    final = cc.finalize(student, force=True).eval()
    assert _naflexvit_padded_vs_alone(final, alone, batch)[0] <= 1e-5


def test_naflexvit_map_head_backbone_through_remote_code(tmp_path):
    """A headless naflexvit with a MAP head (timm's attention pooling, softmax, masked by timm): the remote code's
    CastlingTimmNaFlexVitModel gives timm's pooled output and tokens for a padded NaFlex batch."""
    import json

    import timm
    from families import TINY

    from castle_convert.export.load import read_safetensors
    from castle_convert.export.save import hub_model
    torch.manual_seed(0)
    tiny = {k: v for k, v in TINY.items() if k != "dynamic_img_size"}
    teacher = timm.create_model("naflexvit_base_patch16_map", pretrained=False, num_classes=0,
                                pos_embed_grid_size=(4, 4), **tiny).eval()
    final = cc.finalize(_trained(cc.convert(teacher, kind="separable")), force=True).eval()
    d = cc.save_pretrained(final, tmp_path / "map")
    config = json.loads((d / "config.json").read_text())
    assert config["architectures"] == ["CastlingTimmNaFlexVitModel"]
    hub = hub_model(config, read_safetensors(d / "model.safetensors")[0])
    _, batch = _naflexvit_batch()
    with torch.no_grad():
        out = hub(batch)
        assert (out.pooler_output - final(batch)).abs().max() <= 1e-5
        assert (out.last_hidden_state - final.forward_features(**batch)["patches"]).abs().max() <= 1e-5


def test_naflexvit_patches_out_of_row_major_order_are_refused_in_one_line():
    model = cc.finalize(cc.convert(NAFLEXVIT.build()), force=True).eval()
    _, batch = _naflexvit_batch()
    perm = torch.randperm(batch["patches"].shape[1], generator=torch.Generator().manual_seed(0))
    shuffled = {k: v[:, perm] for k, v in batch.items()}
    with pytest.raises(ValueError) as e:
        model(shuffled)
    msg = str(e.value)
    assert "\n" not in msg and "row-major" in msg and "patchify_image" in msg, msg


def test_naflexvit_a_callers_own_attention_mask_is_refused_in_one_line():
    model = cc.finalize(cc.convert(NAFLEXVIT.build()), force=True).eval()
    _, batch = _naflexvit_batch()
    n = model.num_prefix_tokens + batch["patches"].shape[1]
    with pytest.raises(NotImplementedError, match="attn_mask/is_causal are not supported"):
        model({**batch, "attn_mask": torch.zeros(len(SIZES), 1, n, n)})
