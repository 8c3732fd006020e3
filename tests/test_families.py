"""Shared checks, run on every model family of tests/families.py × every attention kind."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import castle_convert as cc
from castle_convert.attention import CastlingModule, CastlingTrainingForm
from castle_convert.convert import primary_output


def _inputs(family, batch=2, w_extra=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, family.size, family.size + w_extra, generator=g)


@torch.no_grad()
def _out(family, model, x):
    return primary_output(family(model, x)).float()


# The parameters each kind adds to the pretrained ones (plus the DW conv's ".dw." weights).
KIND_PARAMS = ("gamma", "context_query", "context_gain", "relu_gain")
# State an inference form may keep, per kind (a new kind adds its own entry).
INFERENCE_STATE = {
    "linear_angular": ("qkv.", "q_norm.", "k_norm.", "norm.", "proj.", "out_gate.", "gamma", "dw.conv.weight"),
    "separable": ("in_proj.", "k_norm.", "norm.", "proj.", "out_gate.", "context_query", "context_gain",
                  "relu_gain", "dw.conv.weight"),
    "local_global": ("qkv.", "q_norm.", "k_norm.", "norm.", "proj.", "out_gate.", "dw.conv.weight"),
}
# Kinds whose inference form has a softmax over the N tokens' context scores (never over N×N).
SOFTMAX_OVER_SCORES = {"separable"}


def _kind_param(name: str) -> bool:
    return name.endswith(KIND_PARAMS) or ".dw." in name


def _perturb(model, seed=0):
    """Move the kind's own parameters (γ, context query/gains, DW weights) off their init so the
    checks exercise them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _kind_param(name):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_teacher_equivalent_start(family, kind):
    teacher = family.build()
    student = cc.convert(teacher, kind=kind)
    n = sum(isinstance(m, CastlingTrainingForm) for m in student.modules())
    assert n == 2, "every attention of the 2-layer model is converted"
    assert not any(isinstance(m, CastlingModule) for m in teacher.modules()), "original untouched"
    for x in (_inputs(family), _inputs(family, w_extra=2 * family.patch, seed=1)):
        diff = (_out(family, teacher, x) - _out(family, student.eval(), x)).abs().max().item()
        assert diff <= 1e-5, f"logits differ by {diff} at the teacher-equivalent start"


def _backward(family, model, x):
    loss = primary_output(family(model, x)).float().pow(2).mean()
    loss = loss + family.features(model, x).float().pow(2).mean()   # reaches last-layer patch tokens
    loss.backward()
    return {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}


def test_every_parameter_gets_a_gradient(family, kind):
    teacher = family.build().train()
    student = cc.convert(teacher, kind=kind)
    cc.set_schedule(student, gate=0.5, threshold=1.0)          # both branches live, mask active
    x = _inputs(family)
    unused_in_teacher = _backward(family, teacher, x)          # e.g. HF's mask_token
    missing = _backward(family, student, x) - unused_in_teacher
    assert not missing, f"no gradient for {missing}"
    for name, p in student.named_parameters():
        if p.grad is None:
            continue
        assert torch.isfinite(p.grad).all(), name
        if _kind_param(name):
            assert p.grad.abs().sum() > 0, f"castling parameter {name} has a zero gradient"
    densities = [m.last_mask_density for m in student.modules() if isinstance(m, CastlingTrainingForm)]
    assert all(0.0 < float(d) < 1.0 for d in densities), densities


def test_finalize_parity(family, kind):
    student = cc.convert(family.build(), kind=kind)
    _perturb(student)
    cc.set_schedule(student, gate=0.3, threshold=1.0)
    final = cc.finalize(student, force=True)
    assert final.castling_parity <= 1e-4
    cc.set_schedule(student, gate=0.0, threshold=0.0)
    for x in (_inputs(family, seed=3), _inputs(family, w_extra=family.patch, seed=4)):
        diff = (_out(family, student.eval(), x) - _out(family, final.eval(), x)).abs().max().item()
        assert diff <= 1e-4, diff
    assert any(isinstance(m, CastlingTrainingForm) for m in student.modules()), "finalize copies by default"


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()
        self.shapes: list[tuple] = []
        self.op_shapes: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func.overloadpacket))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
                self.op_shapes.append((str(func.overloadpacket), tuple(t.shape)))
        return out


def test_inference_form_is_clean(family, kind):
    final = cc.finalize(cc.convert(family.build(), kind=kind), force=True)
    allowed = INFERENCE_STATE[kind]
    for name, m in final.named_modules():
        if isinstance(m, CastlingModule):
            extra = [k for k in m.state_dict() if not k.startswith(allowed)]
            assert not extra, f"{name} keeps non-inference state {extra}"
            assert not m.__dict__.get("_buffers"), f"{name} has buffers {list(m._buffers)}"
    assert not any(isinstance(m, CastlingTrainingForm) for m in final.modules())
    x = _inputs(family, batch=1, w_extra=2 * family.patch)
    n_tokens = (x.shape[-2] // family.patch) * (x.shape[-1] // family.patch) + family.prefix_tokens
    rec = _OpRecorder()
    with rec, torch.no_grad():
        family(final, x)
    assert not [op for op in rec.ops if "scaled_dot_product" in op], rec.ops
    heads = next(m for m in final.modules() if isinstance(m, CastlingModule)).num_heads
    softmaxes = [shape for op, shape in rec.op_shapes if "softmax" in op]
    if family.pool:                                 # the attention-pooling head stays softmax: (heads, queries, N)
        pooled = [s for s in softmaxes if s == (heads, family.pool, n_tokens)]
        assert len(pooled) == 1, softmaxes
        softmaxes.remove(pooled[0])
    if kind in SOFTMAX_OVER_SCORES:                 # one softmax over N context scores per layer
        assert softmaxes == [(1, heads, n_tokens)] * 2, softmaxes
    elif kind == "local_global":                    # the prefix queries' exact rows over the N keys (P×N) and,
        P = family.prefix_tokens                     # in a padded batch, each query's own pattern keys
        from conftest import TINY_PATTERN
        w, G = TINY_PATTERN["block"] + 2 * TINY_PATTERN["halo"], TINY_PATTERN["pool"]
        pattern = w * w + P + (min(TINY_PATTERN["topk"], n_tokens - P) if P else 0) + G * G
        prefix = [s for s in softmaxes if s == (1, heads, P, n_tokens)]
        rows = [s for s in softmaxes if s not in prefix]   # the patch queries' rows, in whatever block layout
        assert all(s[-1] == pattern for s in rows), softmaxes
        assert sum(math.prod(s[:-1]) for s in rows) == 2 * heads * (n_tokens - P), softmaxes   # 2 layers
        assert len(prefix) == (2 if P else 0), softmaxes
    else:
        assert not softmaxes, rec.ops
    assert not [s for s in rec.shapes if len(s) >= 2 and s[-1] == n_tokens and s[-2] == n_tokens], \
        "an N×N tensor was formed"


@pytest.mark.covering
def test_compile_fullgraph_and_export(family, kind):
    final = cc.finalize(cc.convert(family.build(layers=1), kind=kind), force=True).eval()   # one layer: the same code
    x = _inputs(family)
    ref = _out(family, final, x)
    torch._dynamo.reset()            # each family × kind compiles the same forward code: no recompile limit
    compiled = torch.compile(final, fullgraph=True, backend="aot_eager")
    args = family.args(x)            # a NaFlex tower takes patches, its padding mask and grids
    with torch.no_grad():
        got = primary_output(compiled(*args)).float()
    assert (got - ref).abs().max() <= 1e-5
    exported = torch.export.export(final, args)
    with torch.no_grad():
        got = primary_output(exported.module()(*args)).float()
    assert (got - ref).abs().max() <= 1e-5


def _grid_of(kwargs: dict):
    """The grid of a call: ``grid``, or the one grid every image of a padded batch has (``grid_sizes``, NaFlex)."""
    sizes = kwargs.get("grid_sizes")
    if sizes is None:
        return kwargs.get("grid")
    rows = {tuple(int(v) for v in r) for r in sizes}
    return rows.pop() if len(rows) == 1 else rows


def _grids_seen(model) -> list:
    """Record the ``grid`` every converted attention of ``model`` is called with."""
    seen = []
    for m in model.modules():
        if isinstance(m, CastlingModule):
            m.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(_grid_of(kwargs)), with_kwargs=True)
    return seen


def test_non_square_grid(family, kind):
    student = cc.convert(family.build(), kind=kind)
    x = _inputs(family, w_extra=3 * family.patch)               # (H, W) = (s, s + 3p)
    _perturb(student)
    cc.set_schedule(student, gate=0.0, threshold=0.0)
    seen = _grids_seen(student)
    final = cc.finalize(student, inputs=x, force=True)
    grid = (family.size // family.patch, family.size // family.patch + 3)
    assert seen and all(g == grid for g in seen)                # the training form got this call's grid
    seen = _grids_seen(final)
    out = _out(family, final, x)
    assert torch.isfinite(out).all() and seen and all(g == grid for g in seen)


@pytest.mark.parametrize("form", ["training", "inference"])
def test_bf16_autocast_is_finite(family, kind, form):
    model = cc.convert(family.build(), kind=kind)
    cc.set_schedule(model, gate=0.5, threshold=1.0)
    if form == "inference":
        model = cc.finalize(model, force=True)
    x = _inputs(family) * 30                                   # large activations on purpose
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _out(family, model.eval(), x)
    assert torch.isfinite(out).all()
