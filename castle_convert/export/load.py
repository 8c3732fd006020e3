"""``castle_convert.load(dir)``: a published directory back to the inference-form model.

Weights are read only from safetensors (never unpickled). Every problem with the directory — a
missing file, a corrupt or truncated ``model.safetensors``, a config from a newer format, keys
that do not fit — is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from castle_convert.config import error_line

FORMAT_VERSION = 2              # the output-directory format written by this castle-convert
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "model.ckpt", "pytorch_model.bin.index.json")
METADATA_KEY = "castle_convert"     # safetensors metadata: JSON of the config fields load() needs


class CheckpointError(ValueError):
    """A published directory or weights file cannot be loaded; the message names the file and the fix."""


def _upgrade_hint() -> str:
    from castle_convert import __version__
    return f"upgrade castle-convert (this is {__version__}: pip install -U castle-convert)"


def check_format(version: Any, where: Path) -> None:
    try:
        v = int(version)
    except (TypeError, ValueError):
        raise CheckpointError(f"{where}: format_version {version!r} is not an integer") from None
    if v > FORMAT_VERSION:
        raise CheckpointError(f"{where} was written in format_version {v}, newer than this castle-convert reads "
                              f"(up to {FORMAT_VERSION}): {_upgrade_hint()}")


MAX_JSON_BYTES = 32 << 20        # config.json / report.json / preprocessor_config.json: a few KB (1 MB with 22k labels)


def read_json_file(file: Union[str, Path]) -> dict:
    """A JSON object file of a published directory (untrusted): a :class:`CheckpointError` naming the file when it
    is larger than :data:`MAX_JSON_BYTES`, not JSON or not an object."""
    file = Path(file)
    try:
        size = file.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{file} is {size} bytes, more than a castle-convert JSON file can be "
                                  f"({MAX_JSON_BYTES}): it was not written by castle-convert")
        data = json.loads(file.read_bytes().decode("utf-8"))
    except CheckpointError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({error_line(e)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} is not a JSON object (it holds a {type(data).__name__})")
    return data


def read_config(path: Union[str, Path]) -> dict:
    """``config.json`` of a castle-convert output directory, checked."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory (expected a castle-convert output directory)")
    file = path / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: {path} is not a complete castle-convert output directory")
    config = read_json_file(file)
    if "castling" not in config or "source" not in config:
        raise CheckpointError(f"{file} has no 'castling'/'source' section: {path} was not written by castle-convert "
                              "(load a plain timm or transformers model with those libraries)")
    check_format(config.get("format_version", 1), file)
    return config


def weights_path(path: Union[str, Path]) -> Path:
    path = Path(path)
    file = path / WEIGHTS_NAME
    if file.is_file():
        return file
    pickles = [n for n in PICKLE_NAMES if (path / n).exists()]
    if pickles:
        from castle_convert.config import pickle_fix
        raise CheckpointError(
            f"{file} is missing and {path / pickles[0]} is a pickle file: castle-convert reads weights only from "
            f"safetensors and never unpickles them; {pickle_fix(path / pickles[0], file)}")
    raise CheckpointError(f"{file} is missing: {path} is not a complete castle-convert output directory")


def read_safetensors(file: Union[str, Path], device: Any = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a clear error if it is not one, or is cut short."""
    from safetensors import safe_open

    file = Path(file)
    if file.suffix != ".safetensors":
        raise CheckpointError(f"{file}: castle-convert loads weights only from .safetensors files (never pickle)")
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        raise CheckpointError(f"{file} is not a readable safetensors file (corrupt or truncated?): "
                              f"{type(e).__name__}: {str(e)[:200]}") from e
    return state, metadata


def config_from_metadata(metadata: dict[str, str], file: Path) -> dict:
    """The config fields embedded in a castle-convert ``model.safetensors`` (for timm's route)."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        raise CheckpointError(f"{file} has no '{METADATA_KEY}' metadata: it was not written by castle-convert's "
                              "save_pretrained (format 2 or later), e.g. plain weights saved by torch or timm: write "
                              "the model with cc.save_pretrained(model, DIR) and load DIR")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: the '{METADATA_KEY}' metadata is not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("source"), dict):
        raise CheckpointError(f"{file}: the '{METADATA_KEY}' metadata is not a castle-convert config (no 'source' "
                              "object): write the model with cc.save_pretrained(model, DIR) and load DIR")
    check_format(config.get("format_version", 1), file)
    return config


# config.json keys castle-convert adds around a transformers source's own config fields
_CASTLE_KEYS = ("model_type", "format_version", "castle_convert_version", "castling", "converted_modules", "source",
                "castle_headless", "dtype", "architectures", "auto_map", "transformers_version", "timm_vit", "timm_eva",
                "timm_naflex", "architecture", "deploy_resolution")


def full_source(config: dict) -> dict:
    """``config['source']`` with a transformers source's ``config`` (format 2 keeps the base config's fields
    at the top level of config.json only; older directories also repeat them under ``source.config``)."""
    source = dict(config["source"])
    if source.get("library") == "transformers" and "config" not in source:
        own = ("architecture",) if source.get("model_type") == "timm_wrapper" else ()   # TimmWrapper's own key
        base = {k: v for k, v in config.items() if k not in _CASTLE_KEYS or k in own}
        source["config"] = {**base, "model_type": source.get("model_type"),
                            "architectures": list(source.get("architectures") or [])}
    return source


def build_converted(config: dict, *, device: Any = "cpu") -> nn.Module:
    """The converted, finalized architecture ``config`` describes — random weights, no calibration."""
    from castle_convert.config import CastlingConfig
    from castle_convert.convert import convert, finalize
    from castle_convert.export.source import build_source

    # written before ref_tokens existed: the plain sum (never the calibration-size default)
    castling = CastlingConfig.from_dict({"ref_tokens": 0, **config["castling"]})
    base = build_source(full_source(config), device=device)
    converted = set(config.get("converted_modules") or [])
    filter_fn = (lambda m, fqn: fqn in converted) if converted else None
    model = convert(base, castling, inplace=True, filter_fn=filter_fn, gamma_init="one")
    model = finalize(model, inplace=True, check=False, force=True)
    model.castling_config = castling
    return model.eval()


def weights_header(file: Union[str, Path]):
    """The safetensors header of ``file`` (names and shapes, no tensor read): a :class:`CheckpointError` when it is
    not a safetensors file or is truncated."""
    from castle_convert.export.hub.castling_checks import ConfigCheckError, read_header
    file = Path(file)
    if file.suffix != ".safetensors":
        raise CheckpointError(f"{file}: castle-convert loads weights only from .safetensors files (never pickle)")
    try:
        return read_header(file)
    except (OSError, ConfigCheckError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file (corrupt or truncated?): "
                              f"{error_line(e)}") from None


def checked_config(config: dict, header, where: Union[str, Path]) -> None:
    """The one validation of a published config (``castling`` fields, sizes bounded by the weights ``header``, no
    loader arguments or names of other files; see ``hub/castling_checks.py``), as a :class:`CheckpointError`."""
    from castle_convert.attention import KINDS
    from castle_convert.export.hub.castling_checks import ConfigCheckError, check_config
    try:
        check_config(config, header, kinds=list(KINDS), where=str(where))
    except ConfigCheckError as e:
        raise CheckpointError(str(e)) from None


def build_checked(config: dict, header, file: Path, where: Union[str, Path]) -> nn.Module:
    """:func:`build_converted` once the weights file's tensors (``header``) are known to be exactly those of the
    architecture ``config`` describes: first built on the meta device (no memory), compared, then built for real."""
    from castle_convert.export.hub.castling_checks import ConfigCheckError, check_shapes
    try:
        meta = build_converted(config, device="meta")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - rebuild problems name the config file
        raise CheckpointError(f"cannot rebuild the architecture described in {where}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    try:
        check_shapes({k: tuple(v.shape) for k, v in meta.state_dict().items()}, header, where=str(file))
    except ConfigCheckError as e:
        raise CheckpointError(str(e)) from None
    del meta
    try:
        return build_converted(config)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - rebuild problems name the config file
        raise CheckpointError(f"cannot rebuild the architecture described in {where}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None


def load_into(model: nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    """Strict load with an error that names ``file`` and the keys that do not fit."""
    from castle_convert.export.hub.castling_checks import ConfigCheckError, Header, check_shapes
    try:                                        # the one shape check (hub/castling_checks.py), named after ``file``
        check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()},
                     Header({k: tuple(v.shape) for k, v in state.items()}), where=str(file))
    except ConfigCheckError as e:
        raise CheckpointError(str(e)) from None
    model.load_state_dict(state, strict=True)


def _float_dtype(state: dict[str, torch.Tensor]) -> Optional[torch.dtype]:
    for t in state.values():
        if t.is_floating_point():
            return t.dtype
    return None


def load_routes(path: Union[str, Path]) -> list[str]:
    """The routes that load the output directory ``path``, as the CLI names them: castle_convert.load always,
    transformers when the remote-code files are there, timm for timm sources."""
    path = Path(path)
    config = read_config(path)
    routes = ["castle_convert.load()"]
    if config.get("auto_map") and (path / "modeling_castling.py").is_file():
        routes.append("transformers (trust_remote_code=True)")
    timm_ok = config["source"].get("library") == "timm"
    if not timm_ok:                    # a transformers source: through the equivalent timm ViT, where there is one
        from castle_convert.export.timm_equivalent import plan
        timm_ok = str(config.get("architecture", "")).startswith("castle_") and not isinstance(plan(config), str)
    if timm_ok:
        routes.append(f'timm (timm.create_model("local-dir:{path}", pretrained=True))')
    return routes


HUB_FILES = ["config.json", WEIGHTS_NAME, "preprocessor_config.json", "README.md", "report.json", "recipe.yaml"]


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and "\\" not in text


def resolve_path(path: Union[str, Path], *, revision: Optional[str] = None, cache_dir: Any = None) -> Path:
    """A local directory as it is; a Hub repo id (``owner/name``) through ``huggingface_hub``, as
    ``from_pretrained`` does (the local cache when offline); anything else a :class:`CheckpointError`."""
    local = Path(path).expanduser()
    if local.exists() or not _looks_like_repo_id(str(path)):
        return local
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(path), revision=revision, cache_dir=cache_dir, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001 - offline / not found / network: one line
        from huggingface_hub import constants
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else "on the Hub"
        raise CheckpointError(f"{path} is not a local directory, and the Hub repo '{path}' could not be fetched "
                              f"{where}: {error_line(e)}. Pass the "
                              "path of a castle-convert output directory, or check the repo id / network") from e


def load(path: Union[str, Path], *, device: Any = "cpu", dtype: Optional[torch.dtype] = None,
         revision: Optional[str] = None, cache_dir: Any = None) -> nn.Module:
    """Load a directory written by :func:`castle_convert.save_pretrained` (or the CLI), or a Hub repo
    id (``owner/name``, at ``revision``) holding one: fetched with ``huggingface_hub`` like
    ``from_pretrained`` (from the local cache when ``HF_HUB_OFFLINE=1``; weights from safetensors only).

    Rebuilds the source architecture (timm or transformers; nothing is downloaded), converts it
    to the inference form without calibration, and loads ``model.safetensors`` strictly. Returns
    the model in eval mode on ``device`` (in the stored dtype unless ``dtype`` is given), with its
    preprocessing attached: timm sources' ``pretrained_cfg``; transformers sources'
    ``castle_image_processor``, the ``preprocessor_config.json`` dict (``AutoImageProcessor.from_pretrained(path)``
    builds the processor from it).
    """
    path = resolve_path(path, revision=revision, cache_dir=cache_dir)
    config = read_config(path)
    file = weights_path(path)
    header = weights_header(file)                       # untrusted config.json: checked before anything is built
    checked_config(config, header, path / CONFIG_NAME)
    model = build_checked(config, header, file, path / CONFIG_NAME)
    state, _ = read_safetensors(file)
    model.to(dtype or _float_dtype(state) or torch.float32)
    load_into(model, state, file)
    processor = path / "preprocessor_config.json"
    if processor.is_file() and config["source"].get("library") == "transformers":
        model.castle_image_processor = read_json_file(processor)
    model.castle_source = dict(config["source"])
    if config["source"].get("library") == "timm":
        from castle_convert.export.source import castle_config, converted_pretrained_cfg
        # names castle_<arch>, no softmax hub id: timm's save_for_hf / push_to_hf_hub of it reload as converted
        model.pretrained_cfg = converted_pretrained_cfg(model.pretrained_cfg, config["source"]["architecture"],
                                                        castle_config(config))
        if config.get("id2label"):
            labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
            model.pretrained_cfg["label_names"] = labels
        model.default_cfg = model.pretrained_cfg
    return model.to(device).eval()
