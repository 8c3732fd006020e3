"""What images a model expects: its data config (timm's ``resolve_data_config`` fields, or a transformers
model's image-processor mean / std / size). Used by the data pipeline, the fidelity block and the published
``preprocessor_config.json``; imports only the timm adapter (lazily)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn


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
        proc = getattr(model, "castle_image_processor", None) or {}
        size = proc.get("size", getattr(hf_config, "image_size", 224))
        if isinstance(size, dict):
            size = size.get("height", size.get("shortest_edge", 224))
        c = getattr(hf_config, "num_channels", 3)
        cfg = DataConfig(input_size=(c, size, size), mean=tuple(proc.get("image_mean", (0.5,) * 3)),
                         std=tuple(proc.get("image_std", (0.5,) * 3)), interpolation="bilinear",
                         crop_pct=1.0)
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
