"""The output directory of a run, written atomically (temp dir + rename at the end)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from torch import nn

FORMAT_VERSION = 1


class OutputExistsError(FileExistsError):
    """The output directory exists and is not empty, and --overwrite was not given."""


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless ``overwrite`` (checked before any work)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise OutputExistsError(f"output {path} exists and is not empty: choose another --output, or pass "
                                "--overwrite to replace it")


def describe_source(model: nn.Module) -> dict:
    """Enough to rebuild the base architecture of ``model`` (timm name + args, or the HF config)."""
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg is not None:
        return {"library": "timm", "architecture": cfg.get("architecture"),
                "model_args": {"num_classes": getattr(model, "num_classes", None)}}
    hf = getattr(model, "config", None)
    return {"library": "transformers", "model_type": getattr(hf, "model_type", None),
            "architectures": getattr(hf, "architectures", None) or [type(model).__name__],
            "config": hf.to_dict() if hf is not None else None}


def write_output_dir(path: Path, model: nn.Module, *, source: dict, recipe_yaml: Optional[str] = None,
                     report: Optional[dict] = None, extra_files: Optional[dict[str, Path]] = None,
                     overwrite: bool = False) -> Path:
    """Write ``model`` (inference form) and its metadata to ``path`` atomically.

    Files: ``model.safetensors`` (inference-only weights, metadata embeds the recipe),
    ``config.json``, ``recipe.yaml``, ``report.json``. Nothing appears at ``path`` until all of them
    are complete.
    """
    from safetensors.torch import save_file

    from castle_convert import __version__
    from castle_convert.convert import castling_modules

    path = Path(path)
    check_output_dir(path, overwrite)
    if any(getattr(m, "is_training_form", False) for _, m in castling_modules(model)):
        raise ValueError("write_output_dir takes a finalized model: call castle_convert.finalize() first")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        metadata = {"format": "pt", "castle_convert_version": __version__, "format_version": str(FORMAT_VERSION)}
        if recipe_yaml:
            metadata["recipe"] = recipe_yaml
        save_file(state, str(tmp / "model.safetensors"), metadata=metadata)
        config = {
            "castle_convert_version": __version__,
            "format_version": FORMAT_VERSION,
            "castling": getattr(model, "castling_config").to_dict(),
            "converted_modules": list(getattr(model, "castling_converted", [])),
            "source": source,
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if recipe_yaml:
            (tmp / "recipe.yaml").write_text(recipe_yaml)
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
        for name, src in (extra_files or {}).items():
            if Path(src).is_dir():
                shutil.copytree(src, tmp / name)
            elif Path(src).exists():
                shutil.copy2(src, tmp / name)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def report_versions() -> dict[str, Any]:
    import platform

    import timm
    import torch
    import transformers

    from castle_convert import __version__
    import accelerate
    return {"castle_convert": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version()}
