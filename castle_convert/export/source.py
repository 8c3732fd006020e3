"""What a converted model was built from, recorded so the architecture can be rebuilt anywhere.

* timm: the architecture name and every constructor argument that shapes the model, read from
  the model's modules (timm's own ``_model_args`` record is the starting point), plus its data
  config; and, for the remote-code files, a ``timm_vit`` geometry spec of the ViT (timm Eva / naflexvit: a
  ``timm_eva`` / ``timm_naflex`` spec, what the timm-built remote-code model cannot read off timm's own modules).
* transformers: the model class and its full config.

Both are verified by rebuilding (see ``save.save_pretrained``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from torch import nn


class RemoteCodeUnsupported(ValueError):
    """The architecture has parts the published remote code (modeling_castling.py) does not implement."""


# -- timm ----------------------------------------------------------------------------------------

# Arguments that only affect training (dropout, init): not recorded.
_TRAIN_ONLY = {"drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
               "drop_path_rate", "weight_init", "fix_init", "pretrained_cfg", "pretrained_cfg_overlay",
               "pretrained_model_args", "cache_dir", "device", "dtype", "checkpoint_path"}
# Data-config fields kept from timm's pretrained_cfg.
_DATA_FIELDS = ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation", "num_classes",
                "label_names", "fixed_input_size")


def is_timm(model: nn.Module) -> bool:
    return getattr(model, "pretrained_cfg", None) is not None or type(model).__module__.startswith("timm.")


def _identity(m: Optional[nn.Module]) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


def _in_linear(attn: nn.Module) -> nn.Linear:
    """The input projection of a (converted) attention: ``qkv``, or the separable kind's ``in_proj``."""
    lin = getattr(attn, "qkv", None)
    return lin if lin is not None else attn.in_proj


def _qk_norm(attn: nn.Module) -> bool:
    """Whether the attention normalises q/k per head (the separable inference form keeps only k_norm)."""
    return not (_identity(getattr(attn, "q_norm", None)) and _identity(getattr(attn, "k_norm", None)))


def _timm_vit_parts(model: nn.Module):
    """(patch_embed, first block, its attention) of a timm ViT, or raise."""
    blocks = getattr(model, "blocks", None)
    pe = getattr(model, "patch_embed", None)
    if pe is None or blocks is None or not len(blocks):
        raise RemoteCodeUnsupported(f"{type(model).__name__} is not a timm VisionTransformer "
                                    "(no patch_embed / blocks)")
    return pe, blocks[0], blocks[0].attn


def timm_class_name(module: nn.Module) -> str:
    """The timm class name of ``module``, also after conversion swapped it for its grid-passing subclass
    (``GridVisionTransformer`` is a ``VisionTransformer``, ``GridBlock`` a ``Block``)."""
    if type(module).__module__ in ("castle_convert.adapters.timm_grid", "castle_convert.adapters.timm_naflex"):
        from castle_convert.adapters.timm_grid import timm_class
        return timm_class(module).__name__
    return type(module).__name__


def timm_architecture(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if arch:
        return arch[len("castle_"):] if arch.startswith("castle_") else arch
    if timm_class_name(model) == "VisionTransformer":
        return "vit_base_patch16_224"      # every shaping argument is recorded explicitly
    raise ValueError(f"cannot tell which timm architecture {type(model).__name__} is: build it with "
                     "timm.create_model() so model.pretrained_cfg names it")


def features_net(model: nn.Module) -> Optional[nn.Module]:
    """``model`` when it is timm's ``features_only`` wrapper of a ViT (``FeatureGetterNet``), else None."""
    return model if type(model).__name__ == "FeatureGetterNet" and hasattr(model, "model") else None


def timm_model_args(model: nn.Module) -> dict:
    """Every constructor argument that shapes ``model`` (timm ``VisionTransformer`` family)."""
    import inspect as _inspect

    if features_net(model) is not None:       # features_only: the (pruned) ViT inside, rebuilt and wrapped alike
        args = timm_model_args(model.model)
        args.update(features_only=True, out_indices=list(model.out_indices))   # what timm's ViT takes
        return _jsonable(args)

    from timm.models.vision_transformer import VisionTransformer

    args = {k: v for k, v in dict(getattr(model, "_model_args", None) or {}).items() if k not in _TRAIN_ONLY}
    if not hasattr(model, "patch_embed") or not hasattr(model, "blocks"):
        return _jsonable(args)
    if timm_class_name(model) not in ("VisionTransformer", "VisionTransformerDistilled"):
        # another timm class (Eva): the arguments it was created with rebuild it; only the head may have changed
        args["num_classes"] = int(getattr(model, "num_classes", args.get("num_classes", 0)) or 0)
        return _jsonable(args)
    pe, blk, attn = _timm_vit_parts(model)
    ls = getattr(blk, "ls1", None)
    derived = dict(
        img_size=list(pe.img_size) if getattr(pe, "img_size", None) is not None else None,
        patch_size=list(pe.patch_size),
        in_chans=pe.proj.in_channels,
        num_classes=model.num_classes,
        global_pool=model.global_pool,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=_in_linear(attn).bias is not None,
        qk_norm=_qk_norm(attn),
        proj_bias=attn.proj.bias is not None,
        scale_attn_norm=not _identity(getattr(attn, "norm", None)),
        scale_mlp_norm=not _identity(getattr(blk.mlp, "norm", None)),
        init_values=(float(getattr(ls, "init_values", 1e-5) or 1e-5) if not _identity(ls) else None),
        class_token=getattr(model, "cls_token", None) is not None,
        reg_tokens=int(getattr(model, "num_reg_tokens", 0)),
        no_embed_class=bool(getattr(model, "no_embed_class", False)),
        pos_embed="learn" if getattr(model, "pos_embed", None) is not None else "none",
        pre_norm=not _identity(getattr(model, "norm_pre", None)),
        final_norm=not (_identity(getattr(model, "norm", None)) and _identity(getattr(model, "fc_norm", None))),
        fc_norm=not _identity(getattr(model, "fc_norm", None)),
        pool_include_prefix=bool(getattr(model, "pool_include_prefix", False)),
        dynamic_img_size=bool(getattr(model, "dynamic_img_size", False)),
        dynamic_img_pad=bool(getattr(pe, "dynamic_img_pad", False)),
    )
    known = set(_inspect.signature(VisionTransformer.__init__).parameters)
    args.update({k: v for k, v in derived.items() if k in known})
    return _jsonable(args)


def timm_data_config(model: nn.Module) -> dict:
    """mean / std / input size / crop of a timm model (what ``timm.data.resolve_data_config`` gives)."""
    from castle_convert.preprocess import data_config
    cfg = getattr(model, "pretrained_cfg", None) or {}
    d = data_config(model)
    out = {k: cfg[k] for k in _DATA_FIELDS if cfg.get(k) is not None}
    out.update(input_size=list(d.input_size), mean=list(d.mean), std=list(d.std), crop_pct=d.crop_pct,
               interpolation=d.interpolation, num_classes=int(getattr(model, "num_classes", 0) or 0))
    return _jsonable(out)


def timm_vit_spec(model: nn.Module) -> dict:
    """Geometry of a timm ViT for ``modeling_castling.CastlingTimmViT*`` (raises RemoteCodeUnsupported)."""
    from timm.layers import LayerScale, Mlp, PatchEmbed
    from timm.layers.attention import Attention
    from timm.models.vision_transformer import Block

    from castle_convert.attention import INFERENCE_FORMS

    def no(reason: str) -> RemoteCodeUnsupported:
        return RemoteCodeUnsupported(f"{timm_class_name(model)} ({timm_architecture(model)}): {reason}")

    pe, blk0, _ = _timm_vit_parts(model)
    if timm_class_name(model) not in ("VisionTransformer", "VisionTransformerDistilled"):
        raise no(f"model class {timm_class_name(model)} is not VisionTransformer / VisionTransformerDistilled "
                 "(modeling_castling.py reimplements only those)")
    if type(pe) is not PatchEmbed or not isinstance(pe.proj, nn.Conv2d) or tuple(pe.proj.kernel_size) != tuple(
            pe.patch_size) or tuple(pe.proj.stride) != tuple(pe.patch_size):
        raise no(f"patch embedding {type(pe).__name__} is not timm's plain PatchEmbed")
    if getattr(model, "attn_pool", None) is not None:
        raise no("attention pooling head (global_pool='map'/'prr')")
    if not _identity(getattr(model, "patch_drop", None)) and model.training:
        raise no("patch dropout")
    distilled = timm_class_name(model) == "VisionTransformerDistilled"
    pool = model.global_pool
    if pool not in ("token", "avg", "max", "avgmax") and not distilled:
        raise no(f"global_pool={pool!r}")
    norms: list[nn.Module] = []
    eps = blk0.norm1.eps
    act = None
    for i, blk in enumerate(model.blocks):
        where = f"blocks.{i}"
        if timm_class_name(blk) != Block.__name__ or not isinstance(blk, Block):
            raise no(f"{where} is a {type(blk).__name__}, not timm's Block")
        softmax = type(blk.attn) is Attention                      # a hybrid's layer kept softmax
        if not softmax and not isinstance(blk.attn, INFERENCE_FORMS):
            raise no(f"{where}.attn is {type(blk.attn).__name__}, not a finalized castling attention")
        if softmax and getattr(blk.attn, "gate", None) is not None:
            raise no(f"{where}.attn is a gated softmax attention (hybrid of a gated model)")
        if type(blk.mlp) is not Mlp or not isinstance(blk.mlp.fc1, nn.Linear):
            raise no(f"{where}.mlp is {type(blk.mlp).__name__}, not timm's Mlp")
        if not isinstance(blk.mlp.act, nn.GELU):
            raise no(f"{where}.mlp.act is {type(blk.mlp.act).__name__} (only GELU is implemented)")
        this_act = "gelu_tanh" if blk.mlp.act.approximate == "tanh" else "gelu"
        if act is not None and this_act != act:
            raise no("blocks use different activations")
        act = this_act
        for ls in (blk.ls1, blk.ls2):
            if not (_identity(ls) or type(ls) is LayerScale) or getattr(ls, "inplace", False) and model.training:
                raise no(f"{where} layer scale {type(ls).__name__}")
        if _identity(blk.ls1) != _identity(blk.ls2) or _identity(blk.ls1) != _identity(model.blocks[0].ls1):
            raise no("layer scale on some branches only")
        for dp in (getattr(blk, "drop_path1", None), getattr(blk, "drop_path2", None)):
            if not _identity(dp) and model.training:
                raise no("drop path in training mode")
        a = blk.attn
        if getattr(a, "out_gate", None) is not None and (a.out_gate.bias is not None) != (_in_linear(a).bias is not None):
            raise no(f"{where}.attn gate bias differs from qkv bias")
        if _in_linear(a).in_features != model.embed_dim or a.proj.out_features != model.embed_dim:
            raise no(f"{where}.attn changes the width")
        norms += [blk.norm1, blk.norm2, getattr(a, "q_norm", None), getattr(a, "k_norm", None), a.norm,
                  blk.mlp.norm]
    a0 = model.blocks[0].attn
    norms += [model.norm_pre, model.norm, model.fc_norm, pe.norm]
    for n in norms:
        if _identity(n):
            continue
        if not isinstance(n, nn.LayerNorm) or not n.elementwise_affine or n.bias is None:
            raise no(f"normalisation {type(n).__name__} (only affine LayerNorm is implemented)")
        if n.eps != eps:
            raise no(f"normalisation layers use different eps ({n.eps} vs {eps})")
    if (model.cls_token is None) and pool == "token":
        raise no("token pooling without a class token")
    spec = dict(
        img_size=list(pe.img_size), patch_size=list(pe.patch_size), in_chans=pe.proj.in_channels,
        patch_bias=pe.proj.bias is not None, embed_norm_eps=None if _identity(pe.norm) else pe.norm.eps,
        embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=a0.num_heads, head_dim=a0.head_dim,
        mlp_hidden=model.blocks[0].mlp.fc1.out_features, mlp_bias=model.blocks[0].mlp.fc1.bias is not None,
        act=act, qkv_bias=_in_linear(a0).bias is not None, proj_bias=a0.proj.bias is not None,
        qk_norm=_qk_norm(a0), scale_attn_norm=not _identity(a0.norm),
        mlp_norm_eps=None if _identity(model.blocks[0].mlp.norm) else model.blocks[0].mlp.norm.eps,
        gated=getattr(a0, "out_gate", None) is not None, layer_scale=not _identity(model.blocks[0].ls1),
        class_token=model.cls_token is not None, reg_tokens=int(getattr(model, "num_reg_tokens", 0) or 0),
        distilled=distilled, no_embed_class=bool(model.no_embed_class), pos_embed=model.pos_embed is not None,
        pre_norm=not _identity(model.norm_pre),
        final_norm=not (_identity(model.norm) and _identity(model.fc_norm)),
        fc_norm=not _identity(model.fc_norm), global_pool=pool,
        pool_include_prefix=bool(getattr(model, "pool_include_prefix", False)),
        dynamic_img_size=bool(model.dynamic_img_size), dynamic_img_pad=bool(getattr(pe, "dynamic_img_pad", False)),
        num_classes=int(model.num_classes), norm_eps=eps,
    )
    if spec["final_norm"] and not _identity(model.norm) and not _identity(model.fc_norm):
        raise no("both a final norm and an fc_norm")
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        if (a.num_heads, a.head_dim, blk.mlp.fc1.out_features) != (spec["num_heads"], spec["head_dim"],
                                                                     spec["mlp_hidden"]):
            raise no(f"blocks.{i} has a different width/heads than blocks.0")
        if (_qk_norm(a), not _identity(a.norm), getattr(a, "out_gate", None) is not None,
                _in_linear(a).bias is not None) != (
                spec["qk_norm"], spec["scale_attn_norm"], spec["gated"], spec["qkv_bias"]):
            raise no(f"blocks.{i}.attn differs in structure from blocks.0.attn")
    return _jsonable(spec)


def is_timm_eva(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ``Eva`` (eva02_*, vit_*_rope_*, vit_*_dinov3, vit_pe_*), converted or not."""
    return is_timm(model) and timm_class_name(model) == "Eva"


def timm_eva_spec(model: nn.Module) -> dict:
    """What ``modeling_castling.CastlingTimmEva*`` needs beyond the source description (which timm builds): per
    converted attention, whether its fused input projection has a bias (raises RemoteCodeUnsupported)."""
    from castle_convert.attention import INFERENCE_FORMS
    from castle_convert.adapters.timm_eva import attention_classes

    def no(reason: str) -> RemoteCodeUnsupported:
        return RemoteCodeUnsupported(f"Eva ({timm_architecture(model)}): {reason}")

    converted = set(getattr(model, "castling_converted", None) or [])
    layers = {}
    for i, blk in enumerate(getattr(model, "blocks", [])):
        where = f"blocks.{i}"
        if timm_class_name(blk) not in ("EvaBlock", "EvaBlockPostNorm"):
            raise no(f"{where} is a {type(blk).__name__}, not timm's EvaBlock / EvaBlockPostNorm")
        a = blk.attn
        if isinstance(a, INFERENCE_FORMS):
            if f"{where}.attn" not in converted:
                raise no(f"{where}.attn is converted but not listed in castling_converted")
            layers[f"{where}.attn"] = {"in_bias": _in_linear(a).bias is not None}
        elif not isinstance(a, attention_classes()):
            raise no(f"{where}.attn is {type(a).__name__}, neither a finalized castling attention nor timm's "
                     "EvaAttention / AttentionRope")
    other = sorted(converted - set(layers))
    if other:
        raise no(f"converted modules outside the blocks' attentions ({', '.join(other[:3])})")
    return {"layers": layers}


def is_timm_naflex(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ``NaFlexVit`` (naflexvit_*), converted or not."""
    return is_timm(model) and timm_class_name(model) == "NaFlexVit"


def timm_naflex_spec(model: nn.Module) -> dict:
    """What ``modeling_castling.CastlingTimmNaFlexVit*`` needs beyond the source description (which timm builds): per
    converted attention, whether its input projection has a bias (raises RemoteCodeUnsupported)."""
    from timm.layers.attention import Attention

    from castle_convert.attention import INFERENCE_FORMS

    def no(reason: str) -> RemoteCodeUnsupported:
        return RemoteCodeUnsupported(f"NaFlexVit ({timm_architecture(model)}): {reason}")

    if type(model).__name__ != "GridNaFlexVit":
        raise no("its forward does not pass the patch grid to the converted attentions (blocks other than timm's "
                 "Block)")
    converted = set(getattr(model, "castling_converted", None) or [])
    layers = {}
    for i, blk in enumerate(model.blocks):
        where = f"blocks.{i}"
        if timm_class_name(blk) != "Block":
            raise no(f"{where} is a {type(blk).__name__}, not timm's Block")
        a = blk.attn
        if isinstance(a, INFERENCE_FORMS):
            if f"{where}.attn" not in converted:
                raise no(f"{where}.attn is converted but not listed in castling_converted")
            layers[f"{where}.attn"] = {"in_bias": _in_linear(a).bias is not None}
        elif type(a) is not Attention:
            raise no(f"{where}.attn is {type(a).__name__}, neither a finalized castling attention nor timm's Attention")
    other = sorted(converted - set(layers))
    if other:
        raise no(f"converted modules outside the blocks' attentions ({', '.join(other[:3])})")
    return {"layers": layers}


def timm_base_model(model: nn.Module, args: dict) -> Optional[str]:
    """The Hub id of the pretrained weights ``model`` was initialised from, when timm says so and the
    architecture was not reshaped (a custom width/depth/size cannot have come from those weights)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    hub = cfg.get("hf_hub_id")
    own = dict(getattr(model, "_model_args", None) or {})
    reshaping = set(own) - _TRAIN_ONLY - {"num_classes", "global_pool", "dynamic_img_size", "dynamic_img_pad",
                                          "img_size"}
    if not hub or reshaping or hub.count("/") != 1:
        return None
    return hub


# -- the timm pretrained_cfg of a converted model (timm route, castle_convert.load) ----------------------

PREFIX = "castle_"
_NO_WEIGHTS = ("url", "hf_hub_id", "hf_hub_filename", "hf_hub_revision", "file", "state_dict", "custom_load",
               "tag", "source")
# pretrained_cfg key holding the castle-convert config (format_version, castling, converted_modules, source):
# timm's save_for_hf / push_to_hf_hub write pretrained_cfg into config.json, so their output reloads here.
CFG_KEY = "castle_convert"
# config.json "architecture" of a transformers-source directory without a timm equivalent: timm's local-dir: /
# hf-hub: read it, and its entry point says in one line which routes load the directory
TRANSFORMERS_ENTRY = PREFIX + "transformers"


def converted_pretrained_cfg(cfg: dict, arch: str, castle: Optional[dict]) -> dict:
    """The ``pretrained_cfg`` of a converted model: names ``castle_<arch>``, no softmax-weights source
    (hub id, url, tag, file), and the castle-convert config when known (``CFG_KEY``)."""
    out = {k: v for k, v in cfg.items() if k not in _NO_WEIGHTS and k != CFG_KEY}
    out["architecture"] = PREFIX + arch
    if castle:
        out[CFG_KEY] = castle
    return out


def castle_config(config: dict) -> dict:
    """The fields of a config.json / metadata that rebuild the converted architecture."""
    return {k: config[k] for k in ("format_version", "castling", "converted_modules", "source") if k in config}


# -- transformers --------------------------------------------------------------------------------

def hf_config_dict(model: nn.Module) -> dict:
    cfg = model.config
    data = json.loads(cfg.to_json_string(use_diff=False))
    data["architectures"] = [type(model).__name__]
    for k in ("_name_or_path", "transformers_version", "auto_map"):
        data.pop(k, None)
    return data


def hf_base_model(model: nn.Module) -> Optional[str]:
    name = getattr(model.config, "_name_or_path", "") or ""
    if name.count("/") == 1 and not os.path.exists(name) and not name.startswith((".", "/", "~")):
        return name
    return None


# -- both ----------------------------------------------------------------------------------------

def describe_source(model: nn.Module) -> dict:
    """Enough to rebuild the base architecture of ``model`` (converted or not) with no download."""
    if is_timm(model):
        args = timm_model_args(model)
        src = {"library": "timm", "architecture": timm_architecture(model), "model_args": args,
               "pretrained_cfg": timm_data_config(model)}
        base = timm_base_model(model, args)
        if base:
            src["base_model"] = base
        return src
    if getattr(model, "config", None) is not None and type(model).__module__.startswith("transformers."):
        src = {"library": "transformers", "model_type": model.config.model_type,
               "architectures": [type(model).__name__], "config": hf_config_dict(model)}
        base = hf_base_model(model)
        if base:
            src["base_model"] = base
        return src
    raise ValueError(f"cannot describe {type(model).__name__}: not a timm or transformers model")


# timm.create_model arguments that load or download weights (never honoured from a checkpoint's config)
_LOADER_ARGS = {"checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict",
                "cache_dir"}
# Anywhere in a source description (e.g. a transformers TimmWrapper config's model_args, which it passes to
# timm.create_model) a loader argument with a value, or a model name that reads other files, is refused: the one
# guard of every route (hub/castling_checks.py, which the remote code carries a copy of).
from castle_convert.export.hub.castling_checks import loader_arguments, names_other_files  # noqa: E402,F401


def build_source(source: dict, *, device: Any = "cpu") -> nn.Module:
    """The (unconverted) base architecture ``source`` describes, randomly initialised, no download.

    Nothing ``source`` names is ever loaded: a loader argument anywhere in it (``checkpoint_path``,
    ``pretrained_cfg_overlay``, ... — e.g. in a transformers ``TimmWrapperModel``'s ``model_args``) is an error."""
    library = source.get("library")
    named = loader_arguments(source)
    if named:
        raise ValueError(f"{', '.join(named[:3])} names weights to load or fetch: a castle-convert checkpoint's weights "
                         "are its model.safetensors only (never a file or download named in its config); remove the "
                         "key(s) from config.json / the weights' metadata")
    if library == "timm":
        import timm
        arch = source["architecture"]
        if not timm.is_model(arch):
            raise ValueError(f"timm {timm.__version__} has no architecture '{arch}': install the timm version "
                             "the checkpoint was written with (see report.json versions)")
        args = dict(source.get("model_args") or {})
        loaders = sorted(set(args) & _LOADER_ARGS)
        if loaders:           # timm would torch.load / download what they name: a directory's weights are its own
            raise ValueError(f"source.model_args names {', '.join(loaders)}: a castle-convert checkpoint's weights are "
                             "its model.safetensors only (never a file or download named in its config); remove "
                             "the key(s) from config.json / the weights' metadata")
        for k in ("img_size", "patch_size"):
            if isinstance(args.get(k), list):
                args[k] = tuple(args[k])
        model = timm.create_model(arch, pretrained=False, device=device, **args)
        data = source.get("pretrained_cfg") or {}
        if data:
            model.pretrained_cfg = {**model.pretrained_cfg, **{k: tuple(v) if isinstance(v, list) else v
                                                               for k, v in data.items()}}
            model.default_cfg = model.pretrained_cfg
        return model
    if library == "transformers":
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        cfg = dict(source["config"])
        model_type = cfg.get("model_type") or source.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"transformers {transformers.__version__} does not know model_type '{model_type}'")
        config = CONFIG_MAPPING[model_type].from_dict(cfg)
        cls_name = (source.get("architectures") or cfg.get("architectures") or [None])[0]
        cls = getattr(transformers, cls_name, None) if cls_name else None
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise ValueError(f"transformers {transformers.__version__} has no model class '{cls_name}'")
        import torch
        with torch.device(device):
            return cls(config).eval()
    raise ValueError(f"unknown source library {library!r} (expected 'timm' or 'transformers')")
