"""Castling-ViT models for ``transformers`` (``trust_remote_code=True``), written by castle-convert.

This file and its siblings are copied into every published output directory. They import only torch and
transformers (timm Eva and naflexvit sources import timm when their model is built, inside a ``try``);
the attention math comes from ``castling_functional.py`` (a verbatim copy of
``castle_convert/attention/functional.py``), so a checkpoint loaded here runs exactly the kernels it was
converted and verified with.

* ``castling_layers.py``: the converted attentions (linear-angular, separable, the softmax a hybrid keeps).
* ``modeling_castling_timm.py``: timm sources — a self-contained timm ViT, and timm-built Eva / naflexvit
  (their classes re-exported here, where ``auto_map`` names them).
* this file: transformers sources (ViT / DeiT / DINOv2 / CLIP / SigLIP / SigLIP2 / DINOv3): the transformers
  class itself, with every self-attention replaced by :class:`CastlingHFAttention` (keys
  ``...attention.attn.qkv`` etc., as castle-convert writes them).

Every converted attention computes ``proj(norm(γ·normalize(½V + (1/π)·Q̂(K̂ᵀV)) + DW(V)))``: no
softmax, nothing N×N.
"""

import inspect
from typing import Optional, Tuple

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel

from .castling_functional import patch_grid
from .castling_layers import (DW_MODES, SUPPORTED_KINDS, CastlingAttention, CastlingSeparableAttention,  # noqa: F401
                              SoftmaxAttention, _check_castling, _check_published, _DWConv, _init_castling_weights,
                              _StrictLoading, make_attention)
from .configuration_castling import CastlingViTConfig
from .modeling_castling_timm import (CastlingTimmEvaForImageClassification, CastlingTimmEvaModel,  # noqa: F401
                                     CastlingTimmNaFlexVitForImageClassification, CastlingTimmNaFlexVitModel,
                                     CastlingTimmViTForImageClassification, CastlingTimmViTModel)


# -- transformers sources: the transformers class with castling attention --------------------------

class CastlingHFAttention(nn.Module):
    """Takes the place of a transformers ``XAttention``; keeps its call/return convention. The call's
    patch grid arrives as the ``grid`` keyword argument (see :class:`_GridKwarg`)."""

    def __init__(self, attn: nn.Module, returns_tuple: bool):
        super().__init__()
        self.attn = attn
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args, grid: Optional[Tuple[int, int]] = None,
                position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                token_mask: Optional[torch.Tensor] = None, grid_sizes: Optional[torch.Tensor] = None, **kwargs):
        rope = None
        if position_embeddings is not None:                                        # DINOv3: (cos, sin), (M, d)
            cos, sin = position_embeddings
            rope = torch.cat([sin, cos], dim=-1)                                   # (M, 2d), [sin | cos]
        out = self.attn(hidden_states, grid, rope, token_mask, grid_sizes)         # (B, N, dim)
        return (out, None) if self.returns_tuple else out


class _GridKwarg:
    """Forward pre-hook of the base model: this call's patch grid (from its ``pixel_values``) joins this
    call's own keyword arguments, which transformers passes down to every attention. It holds the patch
    size only: nothing of a call is stored."""

    def __init__(self, patch_size: Tuple[int, int]):
        self.patch_size = patch_size

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        pixels = args[0] if args else kwargs.get("pixel_values")
        if not isinstance(pixels, torch.Tensor) or "grid" in kwargs:
            return None
        return args, {**kwargs, "grid": patch_grid(pixels.shape[-2], pixels.shape[-1], self.patch_size)}


class _GridOnEmbeddings(_GridKwarg):
    """Forward hook of the embeddings, for transformers versions whose base model calls its encoder without
    keyword arguments: the call's grid travels on the call's own embedding tensor (``_castle_grid``)."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, out):
        pixels = args[0] if args else kwargs.get("pixel_values")
        if isinstance(pixels, torch.Tensor) and isinstance(out, torch.Tensor):
            out._castle_grid = patch_grid(pixels.shape[-2], pixels.shape[-1], self.patch_size)


def _naflex_kwargs(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a NaFlex tower (SigLIP2): this call's padding mask ``token_mask`` (B, N) and each
    image's patch grid ``grid_sizes`` (B, 2) join this call's keyword arguments (the N×N mask transformers
    builds from the same padding mask is not needed by linear attention)."""
    names = list(inspect.signature(module.forward).parameters)

    def arg(name):
        if name in kwargs:
            return kwargs[name]
        i = names.index(name) if name in names else len(args)
        return args[i] if i < len(args) else None

    mask, shapes, pixels = arg("pixel_attention_mask"), arg("spatial_shapes"), arg("pixel_values")
    if "token_mask" in kwargs or ("grid" in kwargs and mask is None) or shapes is None or pixels is None:
        return None
    if mask is None:
        mask = torch.ones(pixels.shape[:2], dtype=torch.bool, device=pixels.device)   # (B, N): no padding
    _check_padding(mask, shapes)
    return args, {**kwargs, "token_mask": mask.to(torch.bool), "grid_sizes": shapes.to(pixels.device)}


def _check_padding(mask: torch.Tensor, shapes: torch.Tensor) -> None:
    """Raise (one line) unless each image's ``spatial_shapes`` (rows, cols) agree with its ``pixel_attention_mask``
    (B, N): its rows·cols real patches first, then padding, as the image processor gives them (eager mode only)."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling() or \
            mask.device.type == "meta" or isinstance(mask, torch.fx.Proxy):
        return
    B, N = mask.shape
    shapes = shapes.to(mask.device).to(torch.long)
    pos = torch.arange(N, device=mask.device).unsqueeze(0)                        # (1, N)
    ok = ((pos < shapes[:, 0:1] * shapes[:, 1:2]) == mask.to(torch.bool)).all(-1) & (shapes > 0).all(-1)   # (B,)
    if not bool(ok.all()):
        b = int((~ok).nonzero()[0])
        rows, cols = (int(v) for v in shapes[b])
        real = int(mask[b].to(torch.long).sum())
        raise ValueError(f"SigLIP2 with castling attention: image {b} of this batch has spatial_shapes {rows}x{cols} "
                         f"({rows * cols} patches) but its pixel_attention_mask marks {real} of {N} positions real"
                         f"{'' if real != rows * cols else ' (not the first ones)'}: pass each image's mask and "
                         "shapes as the image processor gives them (its rows·cols patches first, then padding)")


def _grid_from_embeddings(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of the encoder: the grid on its input tensor becomes the ``grid`` keyword argument."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if "grid" in kwargs or getattr(hidden, "_castle_grid", None) is None:
        return None
    return args, {**kwargs, "grid": hidden._castle_grid}


def _hf_layout(m: nn.Module) -> Optional[str]:
    if isinstance(m, nn.MultiheadAttention):
        return None
    if all(isinstance(getattr(m, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj")) and any(
            isinstance(getattr(m, n, None), nn.Linear) for n in ("o_proj", "out_proj")):
        return "qkvo"
    sa, out = getattr(m, "attention", None), getattr(m, "output", None)
    if sa is not None and out is not None and isinstance(getattr(out, "dense", None), nn.Linear) and all(
            isinstance(getattr(sa, n, None), nn.Linear) for n in ("query", "key", "value")):
        return "self_output"
    return None


def _hf_returns_tuple(attn: nn.Module, dim: int, n_tokens: int) -> bool:
    """The replaced module's return convention, probed once (works on the meta device too)."""
    p = next(attn.parameters())
    try:
        with torch.no_grad():
            out = attn.eval()(torch.zeros(1, n_tokens, dim, device=p.device, dtype=p.dtype))
        return isinstance(out, tuple)
    except Exception:  # noqa: BLE001 - fall back to the annotation
        ann = str(inspect.signature(type(attn).forward).return_annotation).lower()
        return "tuple" in ann


def _vision_tower(model: PreTrainedModel) -> nn.Module:
    """The module whose forward takes ``pixel_values`` and passes its keyword arguments to every attention:
    the base model (ViT/DeiT/DINOv2), the CLIP/SigLIP vision tower, the DINOv3 model."""
    for m in model.modules():
        emb = getattr(m, "embeddings", None)
        if isinstance(getattr(emb, "patch_embedding", None), nn.Conv2d) and isinstance(getattr(m, "encoder", None),
                                                                                       nn.Module):
            return m                                                               # CLIP / SigLIP
        if isinstance(getattr(emb, "patch_embeddings", None), nn.Conv2d) and hasattr(m, "rope_embeddings"):
            return m                                                               # DINOv3
        if isinstance(getattr(emb, "patch_embedding", None), nn.Linear) and hasattr(emb, "position_embedding_size"):
            return m                                                               # SigLIP2 (NaFlex)
    return getattr(model, model.base_model_prefix, model)


def _castling_swap_hf(model: PreTrainedModel, config) -> None:
    """Replace every self-attention of a transformers ViT/DeiT/DINOv2/CLIP/SigLIP/DINOv3 vision tower with
    castling attention (text towers and attention-pooling heads stay softmax)."""
    _check_castling(config.castling)
    base = _vision_tower(model)
    emb = base.embeddings
    n_prefix = int(getattr(emb, "cls_token", None) is not None) \
        + int(getattr(emb, "class_embedding", None) is not None) \
        + int(getattr(emb, "distillation_token", None) is not None)
    reg = getattr(emb, "register_tokens", None)
    n_prefix += reg.shape[1] if reg is not None else 0
    pe = getattr(emb, "patch_embeddings", None) or getattr(emb, "patch_embedding")
    patch = pe.kernel_size if isinstance(pe, nn.Conv2d) else getattr(pe, "patch_size", config.patch_size)
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    naflex = isinstance(pe, nn.Linear)                        # SigLIP2: patches + padding mask + grids in
    base.register_forward_pre_hook(_naflex_kwargs if naflex else _GridKwarg(patch), with_kwargs=True)
    encoder = getattr(base, "encoder", None)
    if not naflex and isinstance(encoder, nn.Module) and isinstance(getattr(emb, "patch_embeddings", None), nn.Module) and any(
            p.kind is p.VAR_KEYWORD
                                              for p in inspect.signature(encoder.forward).parameters.values()):
        emb.register_forward_hook(_GridOnEmbeddings(patch), with_kwargs=True)
        encoder.register_forward_pre_hook(_grid_from_embeddings, with_kwargs=True)
    found = []
    for name, m in base.named_modules():
        if _hf_layout(m) is not None and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    prefix = "" if base is model else next(n for n, m in model.named_modules() if m is base) + "."
    # paths without the base model's own prefix ("vit."): a classifier's directory loads as its base model
    # (AutoModel) too, whose module paths lack it
    bp = getattr(model, "base_model_prefix", "") + "."

    def rel(path: str) -> str:
        return path[len(bp):] if bp != "." and path.startswith(bp) else path

    converted = {rel(c) for c in getattr(config, "converted_modules", None) or []}   # hybrid: the rest stays softmax
    if converted:
        found = [name for name in found if rel(prefix + name) in converted]
    if not found:
        raise ValueError(f"no self-attention found in {type(model).__name__}: this transformers version has an "
                         "attention layout modeling_castling.py does not know")
    vcfg = getattr(base, "config", config)
    dim = vcfg.hidden_size
    heads = vcfg.num_attention_heads
    for name in found:
        old = base.get_submodule(name)
        rt = _hf_returns_tuple(old, dim, n_prefix + 4)
        p = next(old.parameters())
        sa = getattr(old, "attention", old)
        qkv = [getattr(sa, n, None) or getattr(old, n2) for n, n2 in (("query", "q_proj"), ("key", "k_proj"),
                                                                        ("value", "v_proj"))]
        o = getattr(old, "o_proj", None) or getattr(old, "out_proj", None) or old.output.dense
        attn = make_attention(dim, heads, dim // heads, n_prefix, config.castling,
                              qkv_bias=any(x.bias is not None for x in qkv), proj_bias=o.bias is not None)
        attn.rope_half = hasattr(base, "rope_embeddings")                          # DINOv3: rotate-half RoPE
        new = CastlingHFAttention(attn, rt).to(device=p.device, dtype=p.dtype)
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent) if parent else base, child, new)


def _refuse_attentions(module: nn.Module, args: tuple, kwargs: dict) -> None:
    if kwargs.get("output_attentions") or (kwargs.get("output_attentions") is None
                                          and getattr(module.config, "output_attentions", False)):
        raise ValueError("output_attentions=True: castling linear attention never forms the N×N attention map, so "
                         "there are no attention weights to return (use output_hidden_states=True)")


def _hf_class(name: str):
    base_cls = getattr(transformers, name)

    def __init__(self, config):
        _check_published(config)                       # untrusted config.json: before anything is built
        base_cls.__init__(self, config)
        _castling_swap_hf(self, config)
        self.register_forward_pre_hook(_refuse_attentions, with_kwargs=True)

    def _init_weights(self, module):
        if isinstance(module, (CastlingAttention, CastlingSeparableAttention, _DWConv)):
            _init_castling_weights(module)
        elif not isinstance(module, CastlingHFAttention):
            base_cls._init_weights(self, module)

    return type(f"Castling{name}", (_StrictLoading, base_cls), {
        "config_class": CastlingViTConfig, "__init__": __init__, "_init_weights": _init_weights,
        "__module__": __name__,
        "__doc__": f"transformers {name} with castling linear-angular attention (keys as castle-convert writes)."})


def _hf_head_class(base_name: str):
    """``Castling<Base>ForImageClassification`` for a transformers backbone without a classification class of its
    own config (CLIP / SigLIP / SigLIP2 vision towers, DINOv3): the castling backbone under ``backbone`` (a backbone
    directory's keys load into it, as transformers loads a base model's checkpoint into a model with a head) and a
    new linear head of ``config.num_labels`` on its pooled output (``pooler_output``: CLS after the final norm, or the
    MAP head; the mean token where there is none)."""
    from transformers.modeling_outputs import ImageClassifierOutput
    backbone_cls = globals()[f"Castling{base_name}"]

    def __init__(self, config):
        PreTrainedModel.__init__(self, config)
        self.num_labels = int(config.num_labels)
        self.backbone = backbone_cls(config)
        width = int(getattr(config, "hidden_size", 0) or self.backbone.config.hidden_size)
        self.classifier = nn.Linear(width, self.num_labels) if self.num_labels > 0 else nn.Identity()
        self.post_init()

    def _init_weights(self, module):
        if module is self.classifier and isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=float(getattr(self.config, "initializer_range", 0.02)))
            nn.init.zeros_(module.bias)
        elif module is not self:
            self.backbone._init_weights(module)

    def forward(self, pixel_values=None, labels=None, output_hidden_states=None, return_dict=None, **kwargs):
        out = self.backbone(pixel_values, output_hidden_states=output_hidden_states, return_dict=True, **kwargs)
        pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None \
            else out.last_hidden_state.mean(dim=1)
        logits = self.classifier(pooled)
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels.to(logits.device))
        output = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return output if use_dict else output.to_tuple()

    return type(f"Castling{base_name}ForImageClassification", (PreTrainedModel,), {
        "config_class": CastlingViTConfig, "base_model_prefix": "backbone", "main_input_name": "pixel_values",
        "__init__": __init__, "_init_weights": _init_weights, "forward": forward, "__module__": __name__,
        "__doc__": f"transformers {base_name} with castling attention and a new image-classification head."})


HF_CLASSES = ("ViTModel", "ViTForImageClassification", "DeiTModel", "DeiTForImageClassification",
              "DeiTForImageClassificationWithTeacher", "Dinov2Model", "Dinov2ForImageClassification",
              "Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification",
              "CLIPVisionModel", "SiglipVisionModel", "Siglip2VisionModel", "DINOv3ViTModel")
for _name in HF_CLASSES:
    if hasattr(transformers, _name):
        globals()[f"Castling{_name}"] = _hf_class(_name)

# a backbone's directory loaded with AutoModelForImageClassification(..., num_labels=N): transformers' own classification
# class of that config where there is one (DINOv2: CLS + mean patch token, as transformers' Dinov2ForImageClassification),
# else a new head on the pooled output
HF_HEADS = {"ViTModel": "ViTForImageClassification", "DeiTModel": "DeiTForImageClassification",
            "Dinov2Model": "Dinov2ForImageClassification",
            "Dinov2WithRegistersModel": "Dinov2WithRegistersForImageClassification"}
for _name in ("CLIPVisionModel", "SiglipVisionModel", "Siglip2VisionModel", "DINOv3ViTModel"):
    if f"Castling{_name}" in globals():
        globals()[f"Castling{_name}ForImageClassification"] = _hf_head_class(_name)
        HF_HEADS[_name] = f"{_name}ForImageClassification"
