"""Graph toolchains and serving on converted models (inference form, both kinds, timm and transformers
sources), each output within 1e-5 of eager in fp32:

* the checks timm's own ``tests/test_models.py`` makes — ``test_model_forward_torchscript``,
  ``test_model_forward_fx``, ``test_model_backward_fx`` (every parameter gets a gradient through the
  traced graph), ``test_model_forward_fx_torchscript``, ``test_model_forward_intermediates`` — with
  timm's own FX recipe (``create_feature_extractor`` with timm's leaf modules and autowrapped functions);
* torchvision ``create_feature_extractor`` of an intermediate node;
* ``torch.export`` with dynamic height/width, ``torch.compile(dynamic=True)`` across resolutions (one
  graph), ONNX with a dynamic resolution (onnxruntime);
* threads calling one model with mixed shapes of the same token count, and direct calls of blocks.

Where the *original* softmax model fails a route as well, the route is in ``UNSUPPORTED`` with the
reason, and :func:`test_unsupported_routes_fail_on_the_original_too` checks that it still does.
"""

from __future__ import annotations

import copy
import fnmatch
import threading

import pytest
import torch

import castle_convert as cc
from castle_convert.convert import primary_output
from families import FAMILIES, TINY

BY_ID = {f.id: f for f in FAMILIES}
TIMM = [f for f in FAMILIES if not f.hf]

# (family pattern, route) -> why the original softmax model fails it too
UNSUPPORTED = {
    ("hf-*", "torchscript"): "transformers' ViT/DeiT/DINOv2 classes cannot be scripted (PreTrainedModel/config code)",
    ("hf-*", "fx"): "transformers' ViT/DeiT/DINOv2 forward iterates over traced shapes (use torch.export)",
    ("timm-deit-distilled", "fx"): ("timm's DeiT _pos_embed calls resample_abs_pos_embed, which timm autowraps "
                                    "only in vision_transformer.py, on traced sizes (dynamic_img_size)"),
    ("timm-dinov3", "dynamic-size"): ("timm's DINOv3 RoPE (coordinates normalised by the grid) fixes the patch grid "
                                     "in the exported graph"),
    ("hf-siglip-vision", "dynamic-size"): ("transformers' SigLIP exported with a dynamic batch keeps a guard on it: "
                                          "the exported original fails at batch 1 too"),
    ("hf-siglip2-naflex", "dynamic-size"): ("transformers' SigLIP2 exported with a dynamic batch keeps a guard on it: "
                                           "the exported original fails at batch 1 too (the patch route with a "
                                           "dynamic patch count: tests/test_naflex.py)"),
    ("timm-naflexvit", "torchscript"): "timm's NaFlexVit forward expands keyword arguments (**kwargs), which "
                                       "TorchScript does not compile",
    ("timm-naflexvit", "fx-torchscript"): ("timm's NaFlexVit FX graph keeps its NaFlex-mode leaf calls (patch_coord / "
                                          "patch_valid placeholders), which TorchScript does not compile"),
    ("hf-dinov2-registers", "dynamic-size"): ("transformers' DINOv2-with-registers embedding (antialiased bicubic "
                                             "interpolation) fixes the patch grid in the traced graph (load the "
                                             "directory through timm instead); plain Dinov2Model exports: "
                                             "test_export_dynamic_height_width_transformers_dinov2"),
}


def unsupported(family, route: str):
    return next((why for (pat, r), why in UNSUPPORTED.items() if r == route and fnmatch.fnmatch(family.id, pat)), None)


def skip_unsupported(family, route: str) -> None:
    why = unsupported(family, route)
    if why:
        pytest.skip(f"the original {family.id} fails {route} too: {why}")


def final_model(family, kind: str, layers: int = 2) -> torch.nn.Module:
    """The inference form of ``family`` (``layers=1`` where only the traced code matters: torch.export / compile /
    ONNX trace every layer, at a cost that grows with the depth)."""
    torch.manual_seed(0)
    model = cc.finalize(cc.convert(family.build(layers=layers), kind=kind), force=True).eval()
    with torch.no_grad():                       # non-trivial converted parameters (γ, DW, separable gains)
        for name, p in model.named_parameters():
            if "dw.conv" in name or "relu_gain" in name:
                p.normal_(0, 0.1)
    return model


def out(family, model, x) -> torch.Tensor:
    return primary_output(family(model, x)).float()


def images(family, rows: int, cols: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, rows * family.patch, cols * family.patch, generator=torch.Generator().manual_seed(seed))


# -- timm's generic checks (tests/test_models.py), on timm-source models --------------------------

def _tracer_kwargs() -> dict:
    from timm.models import get_notrace_functions, get_notrace_modules
    return dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                param_shapes_constant=True)


def _fx_model(model: torch.nn.Module, train: bool = False):
    """timm's ``_create_fx_model``: torchvision's feature extractor with timm's tracer settings."""
    from torchvision.models.feature_extraction import (NodePathTracer, create_feature_extractor,
                                                       get_graph_node_names)
    tracer_kwargs = _tracer_kwargs()
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    eval_return_nodes, train_return_nodes = [eval_nodes[-1]], [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**tracer_kwargs).trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_node_names = [n.name for n in graph_nodes[0]._input_nodes.keys()]
        graph_node_names = [n.name for n in graph_nodes]
        train_return_nodes = [train_nodes[-graph_node_names.index(n)] for n in output_node_names]
    return create_feature_extractor(model, train_return_nodes=train_return_nodes,
                                    eval_return_nodes=eval_return_nodes, tracer_kwargs=tracer_kwargs)


def _cat(outputs) -> torch.Tensor:
    values = tuple(outputs.values()) if isinstance(outputs, dict) else outputs
    return torch.cat(values) if isinstance(values, tuple) else values


TIMM_FAMILIES = pytest.mark.parametrize("family", TIMM, ids=[f.id for f in TIMM])


@TIMM_FAMILIES
@pytest.mark.covering
def test_forward_torchscript(family, kind):
    skip_unsupported(family, "torchscript")
    model = final_model(family, kind)
    scripted = torch.jit.script(model)
    for rows, cols in ((4, 4), (3, 6)):                       # the native size and a non-square one
        x = images(family, rows, cols)
        with torch.no_grad():
            assert (scripted(x).float() - out(family, model, x)).abs().max() <= 1e-5


@TIMM_FAMILIES
@pytest.mark.covering
def test_forward_fx(family, kind):
    skip_unsupported(family, "fx")
    model = final_model(family, kind)
    x = images(family, 3, 6)
    with torch.inference_mode():
        ref = out(family, model, x)
        got = _cat(_fx_model(model)(x))
    assert (got - ref).abs().max() <= 1e-5


@TIMM_FAMILIES
@pytest.mark.covering
def test_backward_fx(family, kind):
    skip_unsupported(family, "fx")
    model = final_model(family, kind).train()
    # separable's inference form does not use RoPE (position-free context): learned RoPE frequencies (mixed RoPE)
    # are dead there, and FX drops them
    num_params = sum(p.numel() for n, p in model.named_parameters()
                     if not (kind == "separable" and n.startswith("rope.")))
    traced = _fx_model(model, train=True)
    outputs = _cat(traced(images(family, 3, 5)))
    outputs.mean().backward()
    missing = [n for n, p in traced.named_parameters() if p.grad is None]
    assert not missing, f"no gradient through the traced graph for {missing}"
    assert sum(p.grad.numel() for p in traced.parameters()) == num_params
    assert not torch.isnan(outputs).any()


@TIMM_FAMILIES
@pytest.mark.covering
def test_forward_fx_torchscript(family, kind):
    skip_unsupported(family, "fx")
    skip_unsupported(family, "fx-torchscript")
    model = final_model(family, kind)
    scripted = torch.jit.script(_fx_model(model))
    x = images(family, 5, 3)
    with torch.inference_mode():
        assert (_cat(scripted(x)).float() - out(family, model, x)).abs().max() <= 1e-5


@TIMM_FAMILIES
@pytest.mark.covering
def test_forward_intermediates_and_features_only(family, kind):
    """timm's test_model_forward_intermediates: NCHW intermediates on the input's (non-square) grid, final
    output == forward_features, and the same with gradient checkpointing."""
    model = final_model(family, kind)
    x = images(family, 3, 6)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, output_fmt="NCHW")
        assert torch.allclose(final, model.forward_features(x))
        assert all(t.shape[-2:] == (3, 6) for t in inter) and len(inter) == len(model.blocks)
        hooked = []
        handles = [b.register_forward_hook(lambda m, a, o: hooked.append(o)) for b in model.blocks]
        model.forward_features(x)
        for h in handles:
            h.remove()
        P = model.num_prefix_tokens
        for t, h in zip(inter, hooked):
            assert torch.equal(t, h[:, P:].reshape(2, 3, 6, -1).permute(0, 3, 1, 2))
        model.set_grad_checkpointing()
        again, _ = model.forward_intermediates(x, output_fmt="NCHW")
    assert torch.allclose(final, again, rtol=1e-4, atol=1e-5)


def test_castle_arch_passes_timm_generic_checks(kind):
    """timm.create_model("castle_<arch>") (the registered route) scripts, FX-traces, and gives features."""
    import timm
    model = timm.create_model("castle_test_vit", pretrained=False, **{**TINY, "num_classes": 10})
    if kind == "separable":      # castle_<arch> without weights builds the default kind: take the separable from convert
        model = final_model(BY_ID["timm-vit"], kind)
    model.eval()
    x = images(BY_ID["timm-vit"], 3, 5, batch=1)
    with torch.no_grad():
        ref = model(x)
        assert (torch.jit.script(model)(x) - ref).abs().max() <= 1e-5
        assert (_cat(_fx_model(model)(x)) - ref).abs().max() <= 1e-5
    feats = timm.create_model("castle_test_vit", pretrained=False, features_only=True, out_indices=(0, 1),
                              **TINY)
    with torch.no_grad():
        maps = feats.eval()(x)
    assert [tuple(m.shape[-2:]) for m in maps] == [(3, 5), (3, 5)]


# -- torchvision feature extraction ----------------------------------------------------------------

@TIMM_FAMILIES
@pytest.mark.covering
def test_torchvision_feature_extractor_intermediate_node(family, kind):
    skip_unsupported(family, "fx")
    from torchvision.models.feature_extraction import create_feature_extractor
    model = final_model(family, kind)
    x = images(family, 3, 5)
    extractor = create_feature_extractor(model, return_nodes={"blocks.0": "first", "norm": "last"},
                                         tracer_kwargs=_tracer_kwargs())     # timm's leaf functions, as timm does
    with torch.no_grad():
        got = extractor(x)
        seen = []
        handle = model.blocks[0].register_forward_hook(lambda m, a, o: seen.append(o))
        last = model.forward_features(x)
        handle.remove()
    assert (got["first"] - seen[0]).abs().max() <= 1e-5
    assert (got["last"] - last).abs().max() <= 1e-5


# -- torch.export, torch.compile, ONNX: timm and transformers sources ------------------------------

class _Tensor(torch.nn.Module):
    """Images in, the primary output out, with the family's calling convention (HF interpolates)."""

    def __init__(self, family, model):
        super().__init__()
        self.family, self.model = family, model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return out(self.family, self.model, x)


@pytest.mark.covering
def test_export_dynamic_height_width(family, kind):
    skip_unsupported(family, "dynamic-size")
    model = final_model(family, kind, layers=1)
    Dim = torch.export.Dim
    shapes = ({0: Dim("b", min=1, max=8), 2: family.patch * Dim("rows", min=2, max=16),
               3: family.patch * Dim("cols", min=2, max=16)},)
    exported = torch.export.export(_Tensor(family, model), (images(family, 5, 7),), dynamic_shapes=shapes)
    # (transformers' ViT/DeiT embedding has an early return at its native token count, which torch.export turns
    # into a guard against it: the original's export takes every size but the native one too)
    for rows, cols, batch in ((3, 6, 1), (6, 3, 3), (2, 5, 2)):
        x = images(family, rows, cols, batch)
        with torch.no_grad():
            assert (exported.module()(x) - out(family, model, x)).abs().max() <= 1e-5


def test_export_dynamic_height_width_transformers_dinov2(kind):
    """transformers' Dinov2Model (the main job's source, not in the family table) exports with dynamic batch,
    height and width; its embedding's early return guards the native token count, as the original's does."""
    import transformers
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                    patch_size=8, mlp_ratio=2)
    model = cc.finalize(cc.convert(transformers.Dinov2Model(cfg).eval(), kind=kind), force=True).eval()
    family = BY_ID["hf-dinov2-registers"]                       # the same calling convention and patch size
    Dim = torch.export.Dim
    shapes = ({0: Dim("b", min=1, max=8), 2: 8 * Dim("rows", min=2, max=16), 3: 8 * Dim("cols", min=2, max=16)},)
    exported = torch.export.export(_Tensor(family, model), (images(family, 5, 7),), dynamic_shapes=shapes)
    for rows, cols, batch in ((3, 6, 1), (6, 3, 3), (2, 5, 2)):
        x = images(family, rows, cols, batch)
        with torch.no_grad():
            assert (exported.module()(x) - out(family, model, x)).abs().max() <= 1e-5


COMPILE_CASES = ["timm-vit", "timm-deit-distilled", "hf-vit", "hf-dinov2-registers"]


@pytest.mark.covering
@pytest.mark.parametrize("fid", COMPILE_CASES)
def test_compile_dynamic_across_resolutions(fid, kind):
    """torch.compile(dynamic=True, fullgraph=True): eager's outputs at every resolution, square or not. A
    transformers model compiles once for them all; timm's PatchEmbed formats the input size into an assert
    message, which specialises each size (the original recompiles per resolution just the same)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    family = BY_ID[fid]
    model = final_model(family, kind, layers=1)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_Tensor(family, model), backend=counter, dynamic=True, fullgraph=True)
    frames = []
    for rows, cols in ((5, 7), (3, 6), (6, 3)):
        x = images(family, rows, cols)
        with torch.no_grad():
            assert (compiled(x) - out(family, model, x)).abs().max() <= 1e-5
        frames.append(counter.frame_count)
    if family.hf:
        assert frames[-1] == frames[0], f"recompiled across resolutions: frame counts {frames}"


# the other two in the slow lane: timm and transformers, both kinds, stay in the fast one
ONNX_CASES = ["timm-vit:linear_angular", pytest.param("timm-deit3:separable", marks=pytest.mark.slow),
              "hf-vit:separable", pytest.param("hf-deit:linear_angular", marks=pytest.mark.slow)]


@pytest.mark.parametrize("case", ONNX_CASES)
def test_onnx_dynamic_resolution(case, tmp_path):
    pytest.importorskip("onnxscript")
    import onnxruntime as ort
    from castle_convert.export.onnx import export_onnx
    fid, kind = case.split(":")
    family = BY_ID[fid]
    model = final_model(family, kind, layers=1)
    directory = cc.save_pretrained(model, tmp_path / "m", verify=False)
    result = export_onnx(directory, tmp_path / "m.onnx", dynamic_size=True, atol=1e-5)
    assert result.ok and len(result.checked_shapes) == 2
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    loaded = cc.load(directory)
    for rows, cols in ((6, 3), (3, 7)):
        x = images(family, rows, cols, batch=1)
        got = session.run(None, {"pixel_values": x.numpy()})[0]
        with torch.no_grad():
            assert abs(got - out(family, loaded, x).numpy()).max() <= 1e-5


@pytest.mark.parametrize("case", ["timm-vit:separable", "hf-vit:linear_angular", "timm-eva02:linear_angular",
                                  "timm-rope-mixed:separable"])
def test_remote_code_scripts_and_exports_at_any_size(case, tmp_path):
    """The transformers remote code (export/hub, copied into every directory) takes the grid the same way:
    its attentions script, and its model exports with dynamic height/width, equal to castle-convert's model."""
    import json

    from castle_convert.export.load import read_safetensors
    from castle_convert.export.save import hub_model
    fid, kind = case.split(":")
    family = BY_ID[fid]
    model = final_model(family, kind, layers=1)
    directory = cc.save_pretrained(model, tmp_path / "d", verify=False)
    config = json.loads((directory / "config.json").read_text())
    hub = hub_model(config, read_safetensors(directory / "model.safetensors")[0])
    attn = next(m for m in hub.modules() if type(m).__name__ in ("CastlingAttention", "CastlingSeparableAttention"))
    tokens = torch.randn(2, family.prefix_tokens + 18, 32)
    with torch.no_grad():
        assert torch.equal(torch.jit.script(attn)(tokens, (3, 6)), attn(tokens, (3, 6)))

    class Hub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hub = hub

        def forward(self, x):
            kw = {} if config.get("timm_vit") or config.get("timm_eva") else {"interpolate_pos_encoding": True}
            return primary_output(self.hub(pixel_values=x, **kw))

    Dim = torch.export.Dim
    exported = torch.export.export(Hub(), (images(family, 5, 7),), dynamic_shapes=(
        {2: family.patch * Dim("rows", min=2, max=16), 3: family.patch * Dim("cols", min=2, max=16)},))
    x = images(family, 3, 6)
    with torch.no_grad():
        assert (exported.module()(x) - out(family, model, x)).abs().max() <= 1e-5


# -- threads, shapes and direct calls ---------------------------------------------------------------

THREAD_CASES = ["timm-vit", "timm-reg4-dinov2", "hf-vit", "hf-dinov2-registers"]


@pytest.mark.parametrize("fid", THREAD_CASES)
def test_threads_with_mixed_shapes_match_single_calls(fid, kind):
    """Calls with the same token count but transposed shapes (rows×cols vs cols×rows) from several threads
    at once: every output equals its single-call reference exactly."""
    family = BY_ID[fid]
    model = final_model(family, kind)
    shapes = [(4, 8), (8, 4)]
    inputs = [images(family, *shapes[i % 2], batch=1, seed=i) for i in range(8)]
    with torch.no_grad():
        reference = [out(family, model, x) for x in inputs]
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors = []
    barrier = threading.Barrier(4)

    def worker(t: int) -> None:
        try:
            barrier.wait()
            with torch.no_grad():
                for rep in range(6):
                    i = (t + rep) % len(inputs)
                    results[(t, rep)] = (i, out(family, model, inputs[i]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    wrong = [k for k, (i, y) in results.items() if not torch.equal(y, reference[i])]
    assert len(results) == 24 and not wrong, f"{len(wrong)} of {len(results)} threaded calls differ"


def test_direct_calls_take_the_grid_and_refuse_to_guess(kind):
    """Blocks and attentions called directly: the grid is an argument; without one a square count is a square
    image and any other count is a one-line error — never the grid of an earlier call."""
    family = BY_ID["timm-vit"]
    model = final_model(family, kind)
    x = images(family, 3, 6)
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))           # (B, 1 + 18, C)
        blk, attn = model.blocks[0], model.blocks[0].attn
        seen = []
        h = blk.register_forward_hook(lambda m, a, o: seen.append(o))
        model(images(family, 6, 3))                                              # another shape first
        model(x)
        h.remove()
        assert torch.equal(blk(tokens, grid=(3, 6)), seen[-1])
        with pytest.raises(ValueError, match="cannot place 18 patch tokens on a grid"):
            attn(blk.norm1(tokens))
        square = model.norm_pre(model._pos_embed(model.patch_embed(images(family, 4, 4))))
        assert torch.equal(attn(square), attn(square, grid=(4, 4)))


def test_hf_layers_take_the_grid_as_a_keyword(kind):
    family = BY_ID["hf-vit"]
    model = final_model(family, kind)
    x = images(family, 3, 6)
    seen = []
    layer = model.vit.layers[0] if hasattr(model.vit, "layers") else model.vit.encoder.layer[0]
    h = layer.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        hidden = model.vit.embeddings(x, interpolate_pos_encoding=True)
        model(x, interpolate_pos_encoding=True)
        h.remove()
        direct = layer(hidden, grid=(3, 6))
        assert torch.equal(direct[0] if isinstance(direct, tuple) else direct, seen[0])
        with pytest.raises(ValueError, match="cannot place 18 patch tokens"):
            layer(hidden)


# -- the routes the originals fail: still failing there ---------------------------------------------

def _route(route: str, family, model):
    x = images(family, 5, 7)
    if route == "torchscript":
        torch.jit.script(model)
    elif route == "fx":
        _fx_model(model)
    elif route == "fx-torchscript":
        torch.jit.script(_fx_model(model))
    else:
        Dim = torch.export.Dim
        exported = torch.export.export(_Tensor(family, model), (x,), dynamic_shapes=(
            {0: Dim("b", min=1, max=8), 2: family.patch * Dim("rows", min=2, max=16),
             3: family.patch * Dim("cols", min=2, max=16)},))           # as test_export_dynamic_height_width
        exported.module()(images(family, 3, 6, 1))


@pytest.mark.parametrize("pattern, route", list(UNSUPPORTED))
def test_unsupported_routes_fail_on_the_original_too(pattern, route):
    family = next(f for f in FAMILIES if fnmatch.fnmatch(f.id, pattern))
    with pytest.raises(Exception):                              # noqa: B017 - any failure of the original
        _route(route, family, copy.deepcopy(family.build()).eval())
