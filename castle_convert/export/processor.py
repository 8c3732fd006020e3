"""``preprocessor_config.json``: the model's data config as a transformers image processor, so
``AutoImageProcessor`` and ``pipeline("image-classification", ...)`` prepare images as timm would."""

from __future__ import annotations

import math
from typing import Optional

from torch import nn

_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def image_processor_config(model: nn.Module, resolution: Optional[int] = None) -> Optional[dict]:
    """A ViTImageProcessor config (resize to the input size) when the data config does not crop;
    a BitImageProcessor config (shorter side to ``size / crop_pct``, centre crop) when it does —
    both exactly timm's eval transform for square inputs. A transformers source keeps its own
    processor (``model.castle_image_processor``) when it has one. ``resolution``: the square input
    size the model was distilled at, when it is not the architecture's own (crop ratio kept)."""
    from castle_convert.preprocess import data_config

    own = getattr(model, "castle_image_processor", None)
    if own:
        return _resized(dict(own), resolution) if resolution else dict(own)
    d = data_config(model, resolution)
    c, h, w = d.input_size
    common = dict(do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(d.mean),
                  image_std=list(d.std), resample=_RESAMPLE.get(d.interpolation, 3), do_convert_rgb=c == 3)
    crop = d.crop_pct if d.crop_pct else 1.0
    if crop >= 1.0:
        return dict(image_processor_type="ViTImageProcessor", do_resize=True, size={"height": h, "width": w},
                    **common)
    return dict(image_processor_type="BitImageProcessor", do_resize=True,
                size={"shortest_edge": int(math.floor(min(h, w) / crop))}, do_center_crop=True,
                crop_size={"height": h, "width": w}, **common)


def _resized(proc: dict, r: int) -> dict:
    """A transformers processor config producing ``r``×``r`` inputs, with the same resize/crop ratio."""
    size, crop = proc.get("size"), proc.get("crop_size")
    if proc.get("do_center_crop") and isinstance(crop, dict) and isinstance(size, dict) and "shortest_edge" in size:
        ratio = size["shortest_edge"] / max(1, crop.get("height", size["shortest_edge"]))
        return {**proc, "size": {"shortest_edge": int(round(r * ratio))}, "crop_size": {"height": r, "width": r}}
    if isinstance(size, dict) and "shortest_edge" in size:
        return {**proc, "size": {"shortest_edge": r}, **({"crop_size": {"height": r, "width": r}} if crop else {})}
    return {**proc, "size": {"height": r, "width": r}, **({"crop_size": {"height": r, "width": r}} if crop else {})}
