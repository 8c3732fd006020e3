"""What images a model expects: its data config (timm's ``resolve_data_config`` fields, or a transformers
model's image-processor mean / std / size). Used by the data pipeline, the fidelity block and the published
``preprocessor_config.json``; imports only the timm adapter (lazily)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torch import nn

RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass
class DataConfig:
    """What images the model expects: timm's data-config fields."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875


def data_config(model: nn.Module, resolution: Optional[int] = None) -> DataConfig:
    """The teacher's data config: timm pretrained_cfg, or the HF image-processor fields."""
    hf_config = getattr(model, "config", None)
    if hf_config is not None and not hasattr(model, "pretrained_cfg"):
        proc = hf_processor_dict(model) or {}
        size = proc.get("size", getattr(hf_config, "image_size", 224))
        if isinstance(size, dict):
            size = size.get("height", size.get("shortest_edge", 224))
        crop, crop_pct = proc.get("crop_size"), 1.0
        if proc.get("do_center_crop") and isinstance(crop, dict) and crop.get("height"):
            crop_pct, size = min(1.0, crop["height"] / size), crop["height"]   # shorter side to size, centre crop
        c = getattr(hf_config, "num_channels", 3)
        cfg = DataConfig(input_size=(c, size, size), mean=tuple(proc.get("image_mean", (0.5,) * 3)),
                         std=tuple(proc.get("image_std", (0.5,) * 3)),
                         interpolation=RESAMPLE_NAMES.get(proc.get("resample"), "bilinear"), crop_pct=crop_pct)
    else:
        from timm.data import resolve_data_config

        from castle_convert.adapters import timm_vit
        d = resolve_data_config(model=model)
        # The size the model was built for (img_size=...) wins over its pretrained_cfg default.
        cfg = DataConfig(input_size=timm_vit.input_size(model), mean=tuple(d["mean"]), std=tuple(d["std"]),
                         interpolation=d.get("interpolation", "bicubic"), crop_pct=d.get("crop_pct", 0.875))
    if resolution is not None:
        cfg.input_size = (cfg.input_size[0], resolution, resolution)
    return cfg


def hf_processor_dict(model: nn.Module) -> Optional[dict]:
    """A transformers model's own image processor as a dict: ``castle_image_processor`` (the
    ``preprocessor_config.json`` castle-convert read with it), else the ``preprocessor_config.json`` beside the
    directory it was loaded from (``config._name_or_path``); None for timm models and models without one."""
    if hasattr(model, "pretrained_cfg") or getattr(model, "config", None) is None:
        return None
    own = getattr(model, "castle_image_processor", None)
    if own:
        return dict(own)
    folder = str(getattr(model.config, "_name_or_path", "") or "")
    file = Path(folder) / "preprocessor_config.json" if folder else None
    if file is not None and file.is_file():
        try:
            found = json.loads(file.read_text())
        except (OSError, ValueError):
            return None
        return found if isinstance(found, dict) else None
    return None


def resized_processor(proc: dict, r: int) -> dict:
    """A transformers processor config producing ``r``×``r`` inputs, with the same resize/crop ratio."""
    size, crop = proc.get("size"), proc.get("crop_size")
    if proc.get("do_center_crop") and isinstance(crop, dict) and isinstance(size, dict) and "shortest_edge" in size:
        ratio = size["shortest_edge"] / max(1, crop.get("height", size["shortest_edge"]))
        return {**proc, "size": {"shortest_edge": int(round(r * ratio))}, "crop_size": {"height": r, "width": r}}
    if isinstance(size, dict) and "shortest_edge" in size:
        return {**proc, "size": {"shortest_edge": r}, **({"crop_size": {"height": r, "width": r}} if crop else {})}
    return {**proc, "size": {"height": r, "width": r}, **({"crop_size": {"height": r, "width": r}} if crop else {})}
