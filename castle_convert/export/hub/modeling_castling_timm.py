"""Castling-ViT models of timm sources for ``transformers`` (``trust_remote_code=True``), written by
castle-convert; ``modeling_castling.py`` re-exports the classes (``auto_map`` names them there).

* timm ViTs (``CastlingTimmViTForImageClassification`` / ``CastlingTimmViTModel``): a self-contained torch
  implementation of timm's ``VisionTransformer`` (and DeiT's distilled variant) whose state-dict keys are
  timm's, so the same ``model.safetensors`` loads in timm.
* timm Eva models, RoPE inside attention (``CastlingTimmEva*``) and timm ``naflexvit_*``
  (``CastlingTimmNaFlexVit*``): timm-backed, like transformers' ``TimmWrapperModel`` — the timm architecture
  built with timm (``pip install timm``; imported inside a ``try``), each converted attention replaced by
  :mod:`castling_layers`', the call's RoPE, patch grid or padding mask and grids passed down; keys are timm's.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

from .castling_layers import (CastlingAttention, CastlingSeparableAttention, SoftmaxAttention, _CastlingAttentionBase,
                              _CastlingQKVAttention, _check_castling, _check_published, _DWConv,
                              _init_castling_weights, _StrictLoading, make_attention)
from .castling_checks import names_other_files
from .configuration_castling import CastlingViTConfig

# -- timm sources: a self-contained timm VisionTransformer ------------------------------------------

class _PatchEmbed(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        self.patch_size = tuple(spec["patch_size"])
        self.dynamic_img_pad = bool(spec.get("dynamic_img_pad", False))
        self.proj = nn.Conv2d(spec["in_chans"], spec["embed_dim"], self.patch_size, stride=self.patch_size,
                              bias=spec.get("patch_bias", True))
        eps = spec.get("embed_norm_eps")
        self.norm = nn.LayerNorm(spec["embed_dim"], eps=eps) if eps is not None else nn.Identity()

    def forward(self, x: torch.Tensor):
        if self.dynamic_img_pad:
            ph, pw = self.patch_size
            x = F.pad(x, (0, (pw - x.shape[-1] % pw) % pw, 0, (ph - x.shape[-2] % ph) % ph))
        x = self.proj(x)                                                           # (B, D, gh, gw)
        hw = (x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), hw                         # (B, gh·gw, D)


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Mlp(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        dim, hidden, bias = spec["embed_dim"], spec["mlp_hidden"], spec.get("mlp_bias", True)
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU(approximate="tanh" if spec.get("act") == "gelu_tanh" else "none")
        eps = spec.get("mlp_norm_eps")
        self.norm = nn.LayerNorm(hidden, eps=eps) if eps is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class _Block(nn.Module):
    def __init__(self, spec: dict, castling: dict, num_prefix_tokens: int, softmax: bool = False):
        super().__init__()
        dim, eps = spec["embed_dim"], spec["norm_eps"]
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        if softmax and spec.get("gated"):
            raise ValueError("a gated-attention timm model with softmax layers kept is not supported by this "
                             "modeling_castling.py: load it with castle_convert.load()")
        self.attn = (SoftmaxAttention if softmax else make_attention)(
            dim, spec["num_heads"], spec["head_dim"], num_prefix_tokens, castling,
            qkv_bias=spec.get("qkv_bias", True), proj_bias=spec.get("proj_bias", True),
            qk_norm_eps=eps if spec.get("qk_norm") else None,
            out_norm_eps=eps if spec.get("scale_attn_norm") else None,
            gated=spec.get("gated", False), gate_bias=spec.get("qkv_bias", True))
        self.ls1 = _LayerScale(dim) if spec.get("layer_scale") else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp(spec)
        self.ls2 = _LayerScale(dim) if spec.get("layer_scale") else nn.Identity()

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), grid))
        return x + self.ls2(self.mlp(self.norm2(x)))


def _resample_pos_embed(pos: torch.Tensor, new_hw: tuple, old_hw: tuple, num_prefix: int) -> torch.Tensor:
    """timm's ``resample_abs_pos_embed``: bicubic, antialiased, prefix rows kept."""
    if tuple(new_hw) == tuple(old_hw):
        return pos
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    D = pos.shape[-1]
    grid = grid.float().reshape(1, old_hw[0], old_hw[1], D).permute(0, 3, 1, 2)   # (1, D, H, W)
    grid = F.interpolate(grid, size=tuple(new_hw), mode="bicubic", antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1)


class CastlingTimmViTPreTrainedModel(_StrictLoading, PreTrainedModel):
    """A timm ViT (``VisionTransformer`` / DeiT ``VisionTransformerDistilled``) with castling
    attention; parameters carry timm's names (``cls_token``, ``blocks.0.attn.qkv``, ``head``)."""

    config_class = CastlingViTConfig
    base_model_prefix = "castling_timm_vit"          # never a key prefix: keys are timm's
    _castle_head = False                             # ForImageClassification: a head of config.num_labels classes
    main_input_name = "pixel_values"
    _no_split_modules = ["_Block"]
    supports_gradient_checkpointing = True

    def __init__(self, config: CastlingViTConfig):
        _check_published(config)                       # untrusted config.json: before anything is built
        super().__init__(config)
        spec = config.timm_vit
        if not spec:
            raise ValueError("config.json has no 'timm_vit' section: this directory was not written for a timm "
                             "source model")
        castling = config.castling
        _check_castling(castling)
        self.spec = spec
        D = spec["embed_dim"]
        self.num_prefix_tokens = int(spec.get("class_token", True)) + int(spec.get("distilled", False)) \
            + int(spec.get("reg_tokens", 0))
        self.grid = tuple(spec["img_size"][i] // spec["patch_size"][i] for i in range(2))
        self.patch_embed = _PatchEmbed(spec)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if spec.get("class_token", True) else None
        self.reg_token = nn.Parameter(torch.zeros(1, spec["reg_tokens"], D)) if spec.get("reg_tokens") else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if spec.get("distilled") else None
        if spec.get("pos_embed", True):
            n_pos = self.grid[0] * self.grid[1] + (0 if spec.get("no_embed_class") else self.num_prefix_tokens)
            self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, D))
        else:
            self.pos_embed = None
        eps = spec["norm_eps"]
        self.norm_pre = nn.LayerNorm(D, eps=eps) if spec.get("pre_norm") else nn.Identity()
        converted = set(config.converted_modules or [])          # hybrid: the other blocks stay softmax
        self.blocks = nn.ModuleList([
            _Block(spec, castling, self.num_prefix_tokens, softmax=bool(converted) and f"blocks.{i}.attn" not in converted)
            for i in range(spec["depth"])])
        self.norm = nn.LayerNorm(D, eps=eps) if spec.get("final_norm", True) and not spec.get("fc_norm") \
            else nn.Identity()
        self.fc_norm = nn.LayerNorm(D, eps=eps) if spec.get("final_norm", True) and spec.get("fc_norm") \
            else nn.Identity()
        # a classifier: config.num_labels (a backbone's directory loaded with AutoModelForImageClassification(...,
        # num_labels=N) gets a new head of N classes, as transformers' own backbones do)
        n = int(config.num_labels) if self._castle_head else spec.get("num_classes", 0)
        self.head = nn.Linear(D, n) if n > 0 else nn.Identity()
        if spec.get("distilled"):
            self.head_dist = nn.Linear(D, n) if n > 0 else nn.Identity()
        self.gradient_checkpointing = False          # transformers' gradient_checkpointing_enable() sets it
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def _init_weights(self, module: nn.Module) -> None:
        _init_castling_weights(module)
        if module is self:
            for p in (self.cls_token, self.reg_token, self.dist_token, self.pos_embed):
                if p is not None:
                    nn.init.trunc_normal_(p, std=0.02)

    def _pos_embed(self, x: torch.Tensor, hw: tuple) -> torch.Tensor:
        B = x.shape[0]
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        if self.pos_embed is None:
            return torch.cat(prefix + [x], dim=1)
        no_embed_class = self.spec.get("no_embed_class", False)
        if self.spec.get("dynamic_img_size"):
            pos = _resample_pos_embed(self.pos_embed, hw, self.grid, 0 if no_embed_class else self.num_prefix_tokens)
        elif tuple(hw) != self.grid:
            raise ValueError(f"input gives a {hw[0]}x{hw[1]} patch grid but this model was built for "
                             f"{self.grid[0]}x{self.grid[1]} (image size {tuple(self.spec['img_size'])})")
        else:
            pos = self.pos_embed
        if no_embed_class:
            return torch.cat(prefix + [x + pos], dim=1)
        return torch.cat(prefix + [x], dim=1) + pos

    def forward_features(self, pixel_values: torch.Tensor, output_hidden_states: bool = False):
        """All tokens after the final norm, (B, N, D) — timm's ``forward_features``; with
        ``output_hidden_states`` also the embeddings and every block's output (transformers' convention)."""
        x, hw = self.patch_embed(pixel_values)
        x = self.norm_pre(self._pos_embed(x, hw))
        hidden = [x] if output_hidden_states else None
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = self._gradient_checkpointing_func(blk.__call__, x, hw) if checkpointing else blk(x, hw)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        return (x, tuple(hidden)) if output_hidden_states else x

    def _flags(self, output_hidden_states: Optional[bool], output_attentions: Optional[bool]) -> bool:
        if output_attentions or (output_attentions is None and getattr(self.config, "output_attentions", False)):
            raise ValueError("output_attentions=True: castling linear attention never forms the N×N attention map, "
                             "so there are no attention weights to return (use output_hidden_states=True)")
        return bool(output_hidden_states if output_hidden_states is not None
                    else getattr(self.config, "output_hidden_states", False))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's ``forward_head``: pool, fc_norm, classifier (averaged with head_dist if distilled)."""
        if self.spec.get("distilled"):
            x, x_dist = x[:, 0], x[:, 1]
            if pre_logits:
                return (x + x_dist) / 2
            return (self.head(x) + self.head_dist(x_dist)) / 2
        pool = self.spec.get("global_pool", "token")
        if pool == "token":
            x = x[:, 0]
        elif pool:
            x = x if self.spec.get("pool_include_prefix") else x[:, self.num_prefix_tokens:]
            if pool == "avg":
                x = x.mean(dim=1)
            elif pool == "max":
                x = x.amax(dim=1)
            elif pool == "avgmax":
                x = 0.5 * (x.amax(dim=1) + x.mean(dim=1))
            else:
                raise ValueError(f"unsupported global_pool {pool!r}")
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)


def _return(return_dict: Optional[bool], config, output):
    use_dict = return_dict if return_dict is not None else getattr(config, "return_dict", True)
    return output if use_dict else output.to_tuple()


class CastlingTimmViTForImageClassification(CastlingTimmViTPreTrainedModel):
    """Logits equal the timm model's ``model(x)``; on a backbone's directory, a new head of ``num_labels``."""

    _castle_head = True

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None,
                return_dict: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                output_attentions: Optional[bool] = None, **kwargs):
        hidden = None
        if self._flags(output_hidden_states, output_attentions):
            x, hidden = self.forward_features(pixel_values, output_hidden_states=True)
        else:
            x = self.forward_features(pixel_values)
        logits = self.forward_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.to(logits.device))
        return _return(return_dict, self.config, ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden))


class CastlingTimmViTModel(CastlingTimmViTPreTrainedModel):
    """Feature extractor: ``last_hidden_state`` = timm ``forward_features`` (B, N, D),
    ``pooler_output`` = timm ``forward_head(..., pre_logits=True)`` (what a headless timm model returns)."""

    def forward(self, pixel_values: torch.Tensor, return_dict: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, output_attentions: Optional[bool] = None, **kwargs):
        hidden = None
        if self._flags(output_hidden_states, output_attentions):
            x, hidden = self.forward_features(pixel_values, output_hidden_states=True)
        else:
            x = self.forward_features(pixel_values)
        out = BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=self.forward_head(x, pre_logits=True),
                                         hidden_states=hidden)
        return _return(return_dict, self.config, out)


# -- timm Eva sources: the timm architecture, built with timm, castling attention in place ------------

# timm.create_model arguments that read or fetch weights: never taken from a config.json
_TIMM_LOADER_ARGS = ("checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict",
                     "cache_dir")


def _import_timm(arch: str):
    """timm, or a one-line ImportError saying how to install it (only timm Eva / naflexvit sources need it)."""
    try:
        import timm
    except ImportError:
        raise ImportError(f"this checkpoint was converted from the timm model '{arch}', whose architecture its remote "
                          "code builds with timm, which is not installed: pip install timm") from None
    return timm


def _build_timm(config, spec: dict) -> nn.Module:
    """The timm model that ``config.source`` describes (random init, no download), converted attentions replaced by
    this file's castling attentions with the timm attention's own q/k norms, out norm, gate and proj. spec: the
    config's ``timm_eva`` / ``timm_naflex`` section (``layers``: per converted attention, ``in_bias``)."""
    source = config.source or {}
    arch = source.get("architecture", "")
    args = dict(source.get("model_args") or {})
    bad = [f"source.model_args.{k}" for k in sorted(set(args) & set(_TIMM_LOADER_ARGS))]
    if not isinstance(arch, str) or names_other_files(arch):
        bad.append(f"source.architecture {arch!r}")
    if bad:
        raise ValueError(f"config.json {', '.join(bad)} names weights to load or fetch: a castle-convert checkpoint's "
                         "weights are its model.safetensors only; remove it from config.json")
    timm = _import_timm(arch)
    if not timm.is_model(arch):
        raise ValueError(f"timm {timm.__version__} has no architecture '{arch}': install the timm version the "
                         "checkpoint was written with (pip install -U timm)")
    for k in ("img_size", "patch_size"):
        if isinstance(args.get(k), list):
            args[k] = tuple(args[k])
    model = timm.create_model(arch, pretrained=False, **args)
    castling = config.castling
    _check_castling(castling)
    layers = spec.get("layers") or {}
    for name in config.converted_modules or []:
        old = model.get_submodule(name)
        info = layers.get(name, {})
        first = old.qkv if getattr(old, "qkv", None) is not None else old.q_proj
        has_k_norm = not isinstance(old.k_norm, nn.Identity)
        gate = getattr(old, "gate", None)
        prefix = int(getattr(old, "num_prefix_tokens", getattr(model, "num_prefix_tokens", 0)))   # timm Attention: none
        new = make_attention(first.in_features, old.num_heads, old.head_dim, prefix, castling,
                             qkv_bias=bool(info.get("in_bias", True)), proj_bias=old.proj.bias is not None,
                             qk_norm_eps=1e-6 if has_k_norm else None, gated=gate is not None,
                             gate_bias=gate is not None and gate.bias is not None)
        # the timm attention's own modules (any norm class timm built): same keys as castle-convert's
        if isinstance(new, _CastlingQKVAttention):
            new.q_norm, new.k_norm = old.q_norm, old.k_norm
            new.rope_half = bool(getattr(old, "rotate_half", False))
        elif new.k_norm is not None:
            new.k_norm = old.k_norm
        new.norm, new.proj = old.norm, old.proj
        if gate is not None:
            new.out_gate = gate
        p = old.proj.weight
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new.to(device=p.device, dtype=p.dtype))
    return model


def _head_for_labels(owner: nn.Module, model: nn.Module, config) -> None:
    """A timm-built classifier (``owner._castle_head``) has ``config.num_labels`` classes: timm's
    ``reset_classifier`` when the source's head has another count (a backbone's directory given a head)."""
    n = int(config.num_labels)
    if getattr(owner, "_castle_head", False) and int(getattr(model, "num_classes", 0) or 0) != n:
        model.reset_classifier(n)


def _build_timm_eva(config) -> nn.Module:
    """The timm Eva of ``config`` (see :func:`_build_timm`), every block taking the call's RoPE and grid."""
    eva = _build_timm(config, config.timm_eva or {})
    for blk in eva.blocks:                                   # every block takes grid=, in place (keys unchanged)
        blk.__class__ = _grid_eva_block(type(blk))
    return eva


def _adopt_timm(self: nn.Module, model: nn.Module) -> None:
    """The timm model's parameters, buffers, submodules and plain attributes become ``self``'s (keys unchanged)."""
    for name, p in model._parameters.items():
        self.register_parameter(name, p)
    for name, b in model._buffers.items():
        self.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)
    for name, m in model._modules.items():
        self.add_module(name, m)
    skip = {"training", "pretrained_cfg", "default_cfg", "pretrained_model_args", "feature_info", "grad_checkpointing"}
    for name, value in vars(model).items():
        if not name.startswith("_") and name not in skip and not hasattr(type(self), name) \
                and name not in self._modules and name not in self._parameters and name not in self._buffers:
            setattr(self, name, value)


_GRID_EVA_BLOCKS: dict = {}


def _grid_eva_block(cls: type) -> type:
    """A subclass of timm's ``EvaBlock`` / ``EvaBlockPostNorm`` ``cls`` whose forward passes the call's RoPE and patch
    grid to a castling attention; a block whose attention stays softmax (hybrid) runs as timm wrote it."""
    if cls in _GRID_EVA_BLOCKS:
        return _GRID_EVA_BLOCKS[cls]
    post_norm = cls.__name__ == "EvaBlockPostNorm"

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        if not isinstance(self.attn, _CastlingAttentionBase):
            return cls.forward(self, x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise NotImplementedError("castling linear attention has no attention matrix to mask: attn_mask/is_causal "
                                      "are not supported")
        if post_norm:
            x = x + self.drop_path1(self.norm1(self.attn(x, grid, rope)))
            return x + self.drop_path2(self.norm2(self.mlp(x)))
        x_attn = self.attn(self.norm1(x), grid, rope)                              # (B, N, D)
        if self.gamma_1 is not None:
            x_attn = self.gamma_1 * x_attn
        x = x + self.drop_path1(x_attn)
        x_mlp = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            x_mlp = self.gamma_2 * x_mlp
        return x + self.drop_path2(x_mlp)

    _GRID_EVA_BLOCKS[cls] = type(f"Grid{cls.__name__}", (cls,), {
        "forward": forward, "__module__": __name__,
        "__doc__": f"timm's {cls.__name__}, the call's RoPE and patch grid passed to its castling attention."})
    return _GRID_EVA_BLOCKS[cls]


class CastlingTimmEvaPreTrainedModel(_StrictLoading, PreTrainedModel):
    """A timm Eva (``eva02_*``, ``vit_*_rope_*``, ``vit_*_dinov3``, ``vit_pe_*``) with castling attention, built with
    timm (needs ``pip install timm``): the timm model's modules and parameters are this model's own, under timm's
    names (``blocks.0.attn.qkv``, ``rope.freqs``, ``head``), so one ``model.safetensors`` serves every route."""

    config_class = CastlingViTConfig
    base_model_prefix = "castling_timm_eva"          # never a key prefix: keys are timm's
    _castle_head = False
    main_input_name = "pixel_values"
    _no_split_modules = ["GridEvaBlock", "GridEvaBlockPostNorm"]
    supports_gradient_checkpointing = True

    def __init__(self, config: CastlingViTConfig):
        _check_published(config)                       # untrusted config.json: before anything is built
        super().__init__(config)
        if not getattr(config, "timm_eva", None):
            raise ValueError("config.json has no 'timm_eva' section: this directory was not written for a timm Eva "
                             "source model")
        eva = _build_timm_eva(config)
        _head_for_labels(self, eva, config)
        self._timm_eva_class = type(eva)
        _adopt_timm(self, eva)
        self.gradient_checkpointing = False          # transformers' gradient_checkpointing_enable() sets it
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Freshly built (not loaded) parts, as for timm ViTs: linear, conv and norm layers and castling modules —
        a new classifier too (a backbone's directory loaded with ``num_labels=N``; transformers leaves unloaded
        weights as uninitialised memory, NaN included); timm's non-persistent buffers (RoPE tables, EvaAttention's
        zero k_bias) recomputed, as transformers' TimmWrapperModel does."""
        _init_castling_weights(module)
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()

    def get_input_embeddings(self) -> nn.Module:
        return self.patch_embed

    def forward_features(self, pixel_values: torch.Tensor, output_hidden_states: bool = False):
        """All tokens after the final norm, (B, N, D) — timm's ``forward_features``, each call's RoPE and patch grid
        passed to every block (derived from this call's input; nothing is stored between calls)."""
        x = self.patch_embed(pixel_values)                                          # (B, H, W, D) or (B, N, D)
        grid = (x.shape[1], x.shape[2]) if self.dynamic_img_size else tuple(self.patch_embed.grid_size)
        x, rope = self._timm_eva_class._pos_embed(self, x)                          # (B, N, D); RoPE of this grid
        x = self.norm_pre(x)
        hidden = [x] if output_hidden_states else None
        mixed = bool(getattr(self, "rope_mixed", False)) and rope is not None
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, blk in enumerate(self.blocks):
            r = rope[i] if mixed else rope                                          # mixed RoPE: per depth
            x = self._gradient_checkpointing_func(blk.__call__, x, r, None, False, grid) if checkpointing \
                else blk(x, rope=r, grid=grid)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        return (x, tuple(hidden)) if output_hidden_states else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's Eva ``forward_head``: pool (or attention pooling), fc_norm, classifier."""
        x = self._timm_eva_class.pool(self, x)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    _flags = CastlingTimmViTPreTrainedModel._flags


class CastlingTimmEvaForImageClassification(CastlingTimmEvaPreTrainedModel):
    """Logits equal the timm model's ``model(x)``; on a backbone's directory, a new head of ``num_labels``."""

    _castle_head = True

    forward = CastlingTimmViTForImageClassification.forward


class CastlingTimmEvaModel(CastlingTimmEvaPreTrainedModel):
    """Feature extractor: ``last_hidden_state`` = timm ``forward_features`` (B, N, D), ``pooler_output`` = timm
    ``forward_head(..., pre_logits=True)``."""

    forward = CastlingTimmViTModel.forward


# -- timm naflexvit sources: timm's NaFlexVit, built with timm; images or NaFlex batches ---------------

_GRID_NAFLEX_BLOCKS: dict = {}


def _grid_naflex_block(cls: type) -> type:
    """A subclass of timm's ``Block`` ``cls`` whose castling attention receives the call's patch grid — or, in a padded
    NaFlex batch, its key-padding mask and grids instead of timm's N×N mask; a softmax layer (hybrid) gets timm's."""
    if cls.__name__ != "Block":
        raise ValueError(f"this naflexvit has {cls.__name__} blocks; modeling_castling.py passes the grid to timm's Block "
                         "only: load it with castle_convert.load() or timm")
    if cls in _GRID_NAFLEX_BLOCKS:
        return _GRID_NAFLEX_BLOCKS[cls]

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                grid: Optional[Tuple[int, int]] = None, token_mask: Optional[torch.Tensor] = None,
                grid_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(self.attn, _CastlingAttentionBase):
            return cls.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
        if token_mask is None and (attn_mask is not None or is_causal):
            raise NotImplementedError("castling linear attention has no attention matrix to mask: attn_mask/is_causal "
                                      "are not supported")
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), grid, None, token_mask, grid_sizes)))  # (B, N, D)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    _GRID_NAFLEX_BLOCKS[cls] = type("GridBlock", (cls,), {
        "forward": forward, "__module__": __name__,
        "__doc__": "timm's Block, the call's patch grid (or padding mask and grids) passed to its castling attention."})
    return _GRID_NAFLEX_BLOCKS[cls]


def _naflex_grid_sizes(patch_coord: torch.Tensor, patch_valid: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, 2): each image's (rows, cols) of patches, from its real patches' (y, x) coordinates (B, N, 2)."""
    coord = patch_coord.to(torch.long)
    if patch_valid is not None:
        coord = coord * patch_valid.to(torch.long).unsqueeze(-1)               # padding's coordinates ignored
    return coord.amax(dim=1) + 1                                                # (B, 2)


def _check_row_major(patch_coord: torch.Tensor, patch_valid: Optional[torch.Tensor], grid_sizes: torch.Tensor) -> None:
    """Raise (one line) unless each image's real patches come first, row-major over its own grid."""
    B, M = patch_coord.shape[:2]
    pos = torch.arange(M, device=patch_coord.device).unsqueeze(0)              # (1, M)
    rows, cols = grid_sizes[:, 0:1], grid_sizes[:, 1:2]                        # (B, 1) each
    inside = pos < rows * cols                                                  # (B, M)
    valid = inside if patch_valid is None else patch_valid.to(torch.bool)
    expected = torch.stack([pos // cols, pos % cols], dim=-1)                   # (B, M, 2)
    ok = (valid == inside) & ((patch_coord.to(torch.long) == expected).all(-1) | ~valid)
    if not bool(ok.all()):
        b = int((~ok).any(-1).nonzero()[0])
        raise ValueError(f"naflexvit with castling attention needs each image's patches first and row-major over its "
                         f"own grid (as timm's patchify_image / NaFlex collator give them); image {b} of this batch "
                         "is not (shuffled or dropped patches): pass its patches in that order")


def _naflex_inputs(pixel_values, patches, patch_coord, patch_valid, attn_mask):
    """(patches or images, patch_coord, patch_valid, attn_mask) of a call: images (B, C, H, W), or a NaFlex batch —
    timm's collator dict as ``pixel_values`` (its keys win, as in timm), or the tensors as keyword arguments."""
    x = pixel_values if pixel_values is not None else patches
    if isinstance(x, dict):
        patch_coord = x.get("patch_coord", patch_coord)
        patch_valid = x.get("patch_valid", patch_valid)
        attn_mask = x.get("attn_mask", attn_mask)
        x = x.get("patches")
    if x is None:
        raise ValueError("no input: pass pixel_values, images (B, C, H, W) or a NaFlex batch (timm's collator dict of "
                         "patches, patch_coord, patch_valid)")
    if patch_coord is not None and patch_valid is None:
        raise ValueError("a NaFlex batch needs patch_valid (B, N) with its patch_coord: pass the NaFlex collator's dict")
    return x, patch_coord, patch_valid, attn_mask


class CastlingTimmNaFlexVitPreTrainedModel(_StrictLoading, PreTrainedModel):
    """timm's ``NaFlexVit`` (``naflexvit_*``) with castling attention, built with timm (needs ``pip install timm``):
    timm's modules and parameter names (``embeds.proj``, ``blocks.0.attn.qkv``, ``head``), so one
    ``model.safetensors`` serves every route. Takes images (B, C, H, W) or a NaFlex batch (``patches`` (B, N, P·P·C),
    ``patch_coord`` (B, N, 2), ``patch_valid`` (B, N)): each image of a padded batch gets the output it gets alone."""

    config_class = CastlingViTConfig
    base_model_prefix = "castling_timm_naflexvit"    # never a key prefix: keys are timm's
    _castle_head = False
    main_input_name = "pixel_values"
    _no_split_modules = ["GridBlock"]
    supports_gradient_checkpointing = True

    def __init__(self, config: CastlingViTConfig):
        _check_published(config)                       # untrusted config.json: before anything is built
        super().__init__(config)
        if not getattr(config, "timm_naflex", None):
            raise ValueError("config.json has no 'timm_naflex' section: this directory was not written for a timm "
                             "naflexvit source model")
        model = _build_timm(config, config.timm_naflex)
        if type(model).__name__ != "NaFlexVit":
            raise ValueError(f"config.json source.architecture builds a timm {type(model).__name__}, not a NaFlexVit: "
                             "this directory's config.json was edited; save the model again")
        for blk in model.blocks:                             # every block takes grid= / token_mask=, keys unchanged
            blk.__class__ = _grid_naflex_block(type(blk))
        _head_for_labels(self, model, config)
        self._timm_naflex_class = type(model)
        _adopt_timm(self, model)
        self.gradient_checkpointing = False          # transformers' gradient_checkpointing_enable() sets it
        self.post_init()

    _init_weights = CastlingTimmEvaPreTrainedModel._init_weights
    _flags = CastlingTimmViTPreTrainedModel._flags

    def get_input_embeddings(self) -> nn.Module:
        return self.embeds

    def _castle_call(self, patches: torch.Tensor, patch_coord: Optional[torch.Tensor],
                     patch_valid: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor]
                     ) -> Tuple[Optional[Tuple[int, int]], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(grid, token_mask, grid_sizes) of this call: images → their grid; a NaFlex batch → its key-padding mask
        (B, prefix + N) and grids (B, 2); a caller's own attn_mask → nothing (the castling blocks refuse it)."""
        if patch_coord is None:
            return tuple(self.embeds.dynamic_feat_size((patches.shape[-2], patches.shape[-1]))), None, None
        if attn_mask is not None:
            return None, None, None
        if self.training and self.patch_drop is not None:
            raise ValueError("naflexvit with castling attention: patch dropout reorders the patches of a NaFlex batch "
                             "(each image's grid is lost); call model.eval() or set model.patch_drop = None")
        sizes = _naflex_grid_sizes(patch_coord, patch_valid)                     # (B, 2)
        if not (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()):
            _check_row_major(patch_coord, patch_valid, sizes)
        B, M = patch_coord.shape[:2]
        valid = torch.ones(B, M, dtype=torch.bool, device=patch_coord.device) if patch_valid is None \
            else patch_valid.to(torch.bool)                                       # (B, M)
        prefix = torch.ones(B, self.num_prefix_tokens, dtype=torch.bool, device=valid.device)
        return None, torch.cat([prefix, valid], dim=1), sizes                   # (B, prefix + M), (B, 2)

    def forward_features(self, pixel_values: torch.Tensor, patch_coord: Optional[torch.Tensor] = None,
                         patch_valid: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                         output_hidden_states: bool = False):
        """(tokens after the final norm (B, N, D), patch_valid (B, N) or None, hidden states or None) — timm's
        NaFlexVit ``forward_features``, the call's grid or padding mask and grids passed to every block."""
        grid, token_mask, grid_sizes = self._castle_call(pixel_values, patch_coord, patch_valid, attn_mask)
        embeds = self._timm_naflex_class._forward_embeds(self, pixel_values, patch_coord=patch_coord,
                                                         patch_valid=patch_valid, attn_mask=attn_mask)
        x, attn_mask = embeds["patches"], embeds.get("attn_mask")                 # (B, N, D); timm's N×N mask
        hidden = [x] if output_hidden_states else None
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            if checkpointing:
                x = self._gradient_checkpointing_func(blk.__call__, x, attn_mask, False, grid, token_mask, grid_sizes)
            else:
                x = blk(x, attn_mask=attn_mask, grid=grid, token_mask=token_mask, grid_sizes=grid_sizes)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        return x, embeds.get("patch_valid"), (tuple(hidden) if hidden is not None else None)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False,
                     patch_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """timm's NaFlexVit ``forward_head``: pool (masked in a NaFlex batch; or attention pooling), fc_norm, head."""
        x = self._timm_naflex_class._pool(self, x, patch_valid=patch_valid)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)


class CastlingTimmNaFlexVitForImageClassification(CastlingTimmNaFlexVitPreTrainedModel):
    """Logits equal the timm model's ``model(x)`` — images, or a NaFlex batch (its dict as ``pixel_values``); on a
    backbone's directory, a new head of ``num_labels``."""

    _castle_head = True

    def forward(self, pixel_values=None, patch_coord: Optional[torch.Tensor] = None,
                patch_valid: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                return_dict: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                output_attentions: Optional[bool] = None, attn_mask: Optional[torch.Tensor] = None,
                patches: Optional[torch.Tensor] = None, **kwargs):
        x, patch_coord, patch_valid, attn_mask = _naflex_inputs(pixel_values, patches, patch_coord, patch_valid,
                                                                attn_mask)
        x, patch_valid, hidden = self.forward_features(x, patch_coord, patch_valid, attn_mask,
                                                       self._flags(output_hidden_states, output_attentions))
        logits = self.forward_head(x, patch_valid=patch_valid)                   # (B, classes)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.to(logits.device))
        return _return(return_dict, self.config, ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden))


class CastlingTimmNaFlexVitModel(CastlingTimmNaFlexVitPreTrainedModel):
    """Feature extractor: ``last_hidden_state`` = timm ``forward_features`` (B, N, D) (a NaFlex batch: its padded
    tokens too), ``pooler_output`` = timm ``forward_head(..., pre_logits=True)`` (masked pooling)."""

    def forward(self, pixel_values=None, patch_coord: Optional[torch.Tensor] = None,
                patch_valid: Optional[torch.Tensor] = None, return_dict: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, output_attentions: Optional[bool] = None,
                attn_mask: Optional[torch.Tensor] = None, patches: Optional[torch.Tensor] = None, **kwargs):
        x, patch_coord, patch_valid, attn_mask = _naflex_inputs(pixel_values, patches, patch_coord, patch_valid,
                                                                attn_mask)
        x, patch_valid, hidden = self.forward_features(x, patch_coord, patch_valid, attn_mask,
                                                       self._flags(output_hidden_states, output_attentions))
        out = BaseModelOutputWithPooling(last_hidden_state=x, hidden_states=hidden,
                                         pooler_output=self.forward_head(x, pre_logits=True, patch_valid=patch_valid))
        return _return(return_dict, self.config, out)
