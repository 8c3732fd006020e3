"""``preprocessor_config.json``: the model's preprocessing as a transformers image processor (its own class and
``save_pretrained``), so ``AutoImageProcessor`` and ``pipeline(...)`` prepare images as timm or the source would, at
the size the model is deployed at: the source's own input size unless the caller names another."""

from __future__ import annotations

import math
from typing import Any, Optional

from torch import nn

_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def image_processor_config(model: nn.Module, image_size: Optional[int] = None) -> Optional[dict]:
    """A ViTImageProcessor config (resize to the input size) when the data config does not crop;
    a BitImageProcessor config (shorter side to ``size / crop_pct``, centre crop) when it does —
    both exactly timm's eval transform for square inputs. A transformers source keeps its own
    processor (:func:`castle_convert.preprocess.hf_processor_dict`) when it has one. ``image_size``: the square
    size to publish, when not the source's own (the crop ratio kept)."""
    from castle_convert.preprocess import data_config, hf_processor_dict, resized_processor

    own = hf_processor_dict(model)
    if own:
        return resized_processor(own, image_size) if image_size else own
    d = data_config(model, image_size)
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


def image_processor(model: nn.Module, image_size: Optional[int] = None) -> Any:
    """The transformers image processor of :func:`image_processor_config` (an instance of its class, which writes
    ``preprocessor_config.json`` with ``save_pretrained``), or the config dict itself when the installed
    transformers lacks that class; None when the model has no image preprocessing."""
    import transformers
    config = image_processor_config(model, image_size)
    cls = getattr(transformers, str((config or {}).get("image_processor_type")), None)
    if not config or cls is None:
        return config
    return cls.from_dict({k: v for k, v in config.items() if k != "image_processor_type"})


def processor_dict(processor: Any) -> Optional[dict]:
    """A processor (or its config dict) as the plain dict the model card and ``deploy_resolution`` read."""
    if processor is None or isinstance(processor, dict):
        return processor
    import json
    return json.loads(processor.to_json_string())


def output_size(processor: Optional[dict]) -> Optional[tuple[int, int]]:
    """(height, width) of the images ``processor`` produces, when it produces one fixed size."""
    if not processor:
        return None
    size = processor.get("crop_size") if processor.get("do_center_crop") else processor.get("size")
    if isinstance(size, dict) and "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    if isinstance(size, dict) and "shortest_edge" in size and not processor.get("do_center_crop"):
        return None                                   # aspect ratio kept: no one size
    return None
