"""Model-family adapters: find a family's softmax attentions, describe them as
:class:`~castle_convert.attention.SoftmaxAttentionSpec`, and put converted modules in place.

Each adapter module exposes ``NAME``, ``SUPPORTED`` (human-readable attention classes),
``applies(model)``, ``scan(model) -> Scan``, ``input_size(model) -> (C, H, W)``,
``forward(model, images)`` (the family's calling convention for any image size) and
``pass_grid(model)``: after conversion, make the model's own forward hand each call's patch grid
to the converted attentions (``grid=(rows, cols)``, derived from that call's input; nothing is
stored between calls). Adapters know nothing about training.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from castle_convert.attention.base import CastlingModule, SoftmaxAttentionSpec
from castle_convert.attention.functional import patch_grid


@dataclass
class Candidate:
    """A softmax attention that can be converted."""

    name: str                                        # module path, e.g. "blocks.3.attn"
    module: nn.Module
    build_spec: Callable[[], SoftmaxAttentionSpec]
    wrap: Callable[[CastlingModule], nn.Module] = lambda m: m   # family call-convention shim
    backbone: str = ""                               # path of the backbone it belongs to


@dataclass
class Rejected:
    """A module that looks like attention but cannot be converted, with the reason."""

    name: str
    module: nn.Module
    reason: str


@dataclass
class Backbone:
    """A ViT backbone: where its images enter (for the patch grid) and its geometry."""

    name: str
    patch_embed: nn.Module
    patch_size: tuple[int, int]
    num_prefix_tokens: int
    pad: bool = False

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid (rows, cols) of a ``height``×``width`` px image."""
        return patch_grid(int(height), int(width), self.patch_size, self.pad)

    def tokens(self, height: int, width: int) -> int:
        """Tokens of a ``height``×``width`` px image: the grid plus the prefix tokens."""
        gh, gw = self.grid(height, width)
        return gh * gw + self.num_prefix_tokens


@dataclass
class Scan:
    adapter: str
    candidates: list[Candidate] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    # attentions that stay softmax by design (attention pooling heads, text towers): listed, never an error
    left_softmax: list[Rejected] = field(default_factory=list)
    backbones: list[Backbone] = field(default_factory=list)


def _adapters():
    from castle_convert.adapters import hf_vit, timm_vit
    return [timm_vit, hf_vit]


def adapter_for(model: nn.Module):
    """The adapter module whose family ``model`` belongs to, or None."""
    for adapter in _adapters():
        if adapter.applies(model):
            return adapter
    return None


def patch_sizes(model: nn.Module) -> set[int]:
    """The patch sizes (px) of ``model``'s ViT backbones (empty when it has none)."""
    adapter = adapter_for(model)
    return {p for bb in (adapter.scan(model).backbones if adapter else []) for p in bb.patch_size if p}


def off_patch_grid(model: nn.Module, size: int) -> Optional[tuple[int, int]]:
    """``(patch, nearest size on the grid)`` when ``size`` px is not a positive multiple of ``model``'s
    patch size (the border pixels would be dropped), else None."""
    patches = patch_sizes(model)
    if size >= 1 and not any(size % p for p in patches):
        return None
    p = max(patches or {1})
    return p, max(p, size // p * p)


def image_grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    """The patch grid of ``model``'s (first) ViT backbone for a ``height``×``width`` px image: what its
    forward passes to the converted attentions (for calling one directly, e.g. on captured hidden states)."""
    adapter = adapter_for(model)
    backbones = adapter.scan(model).backbones if adapter is not None else []
    if not backbones:
        raise ValueError(f"{type(model).__name__} has no ViT backbone with a patch grid")
    return backbones[0].grid(height, width)


def pass_grid(model: nn.Module) -> None:
    """Make ``model``'s forward pass each call's patch grid to its converted attentions (see the module doc)."""
    adapter = adapter_for(model)
    if adapter is not None:
        adapter.pass_grid(model)


def supported_classes() -> list[str]:
    return [cls for adapter in _adapters() for cls in adapter.SUPPORTED]


def attention_problem(module: nn.Module, rope_ok: bool = False) -> Optional[str]:
    """Why an attention-like module (or one inside it) is an unsupported variant, else None (``rope_ok``: the
    family passes its RoPE to the converted attention, so RoPE is not a problem)."""
    for sub in module.modules():
        problem = _variant_problem(sub, rope_ok)
        if problem:
            return problem
    return None


def _variant_problem(module: nn.Module, rope_ok: bool = False) -> Optional[str]:
    cls = type(module).__name__
    attrs = {a for a in (set(vars(module)) | set(module._modules) | set(module._parameters)
                         | set(module._buffers)) if getattr(module, a, None) is not None}
    if attrs & {"relative_position_bias_table", "relative_position_index", "rel_pos",
                "rel_pos_h", "rel_pos_w"} or "relpos" in cls.lower():
        return ("relative position bias (added to the N×N logits the linear form never forms; dropping it left "
                "stage 1 8-25% worse on tiny BEiT, benchmarks/relpos_stage1.py)")
    try:
        forward_args = set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        forward_args = set()
    if not rope_ok and ("rope" in attrs or "rope" in forward_args or "rope" in cls.lower() or "rotary" in cls.lower()):
        return "rotary position embedding (RoPE) applied inside attention"
    if {"proj_l", "proj_w"} <= attrs:
        return "talking-heads attention (mixes the N×N attention maps across heads)"
    if getattr(module, "num_kv_heads", None) not in (None, getattr(module, "num_heads", None)):
        return "grouped-query attention (fewer key/value heads than query heads)"
    return None


def looks_like_attention(module: nn.Module) -> bool:
    cls = type(module).__name__.lower()
    return ("attention" in cls or cls.endswith("attn")) and any(
        isinstance(m, nn.Linear) for m in module.children())


def fused_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear computing ``cat([p(x) for p in parts], -1)`` exactly."""
    w = torch.cat([p.weight.detach() for p in parts], 0)
    has_bias = any(p.bias is not None for p in parts)
    fused = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(w)
        if has_bias:
            fused.bias.copy_(torch.cat([
                p.bias.detach() if p.bias is not None
                else torch.zeros(p.out_features, device=w.device, dtype=w.dtype) for p in parts]))
    fused.weight.requires_grad_(parts[0].weight.requires_grad)
    return fused


def cast_inputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``images`` in the floating dtype of ``model``'s parameters: an fp16/bf16 model takes fp16/bf16 pixels (timm
    does not cast them itself; under autocast an fp32 model's inputs stay as they are)."""
    p = next(model.parameters(), None)
    if p is not None and p.is_floating_point() and images.is_floating_point() and images.dtype != p.dtype:
        return images.to(p.dtype)
    return images


def forward(model: nn.Module, images: torch.Tensor):
    """Run ``model`` on an image batch with its family's calling convention."""
    adapter = adapter_for(model)
    images = cast_inputs(model, images)
    return adapter.forward(model, images) if adapter is not None else model(images)


@torch.no_grad()
def count_macs(model: nn.Module, inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass (FLOPs / 2) with the family's calling convention,
    counted by ``torch.utils.flop_counter``.

    Works on meta-device models and inputs (shapes only). Counts matmuls, convolutions and
    attention kernels; elementwise ops and normalisations are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    # torch's module tracker (inside FlopCounterMode) asserts on a parameter that a module takes as its input
    # (timm's AttentionPoolLatent passes its latent queries): count with gradients off, as no_grad means anyway
    grads = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter:
            forward(model, inputs)
    finally:
        model.train(was_training)
        for p, flag in grads:
            p.requires_grad_(flag)
    return counter.get_total_flops() // 2


def example_inputs(model: nn.Module, batch: int = 2, generator: Optional[torch.Generator] = None,
                   img_size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """A random image batch ``(B, C, H, W)`` of the size the model expects (or ``img_size``).

    On a meta-device model the batch is an empty meta tensor (shapes only, for MAC counting).
    """
    adapter = adapter_for(model)
    c, h, w = adapter.input_size(model)
    if img_size is not None:
        h, w = img_size
    p = next(model.parameters())
    if p.device.type == "meta":
        return torch.empty(batch, c, h, w, device="meta", dtype=p.dtype)
    return torch.randn(batch, c, h, w, generator=generator, dtype=p.dtype).to(p.device)


def group_by_reason(items: list[Rejected]) -> list[str]:
    """One line per (class, reason): ``blocks.0.attn … blocks.11.attn (12× Attention): reason``."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in items:
        groups.setdefault((type(r.module).__name__, r.reason), []).append(r.name)
    lines = []
    for (cls, reason), names in groups.items():
        where = names[0] if len(names) == 1 else f"{names[0]} … {names[-1]} ({len(names)}×)"
        lines.append(f"{where} [{cls}]: {reason}")
    return lines
