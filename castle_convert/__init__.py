"""castle-convert: turn pretrained Vision Transformers' softmax attention into linear attention
(Castling-ViT linear-angular by default, or MobileViTv2 separable: ``convert(model, kind="separable")``).

Public API::

    import castle_convert as cc
    student = cc.convert(model)          # training form, teacher-equivalent at step 0
    cc.attention_transfer(model, student, image_batches, steps=150)   # stage 1 (per-layer, cheap)
    result = cc.distill(model, student, "fashion-mnist", recipe="quick")   # result.student: finalized
    deployable = cc.finalize(student)    # inference form, parity-checked
    print(cc.inspect(model).format())    # what would be converted, MACs before/after
    cc.save_pretrained(deployable, "out/")   # loads with transformers (remote code), timm, cc.load
    model = cc.load("out/")

Importing castle_convert registers ``castle_<arch>`` models with timm (when timm is imported).
"""

from castle_convert.export.timm_route import install as _install_timm_route

_install_timm_route()

from castle_convert.config import CastlingConfig, ConfigError  # noqa: E402
from castle_convert.convert import (ConversionError, FinalizeError, InspectReport, finalize,  # noqa: E402
                                    inspect, lora_targets, set_schedule)
from castle_convert.api import convert, load  # noqa: E402  (+ the transformers guards)
from castle_convert.attention.base import NotAnnealedError  # noqa: E402
from castle_convert.distill import distill  # noqa: E402
from castle_convert.distill.schedule import GateSchedule  # noqa: E402
from castle_convert.distill.transfer import attention_transfer, layer_errors  # noqa: E402
from castle_convert.export import CheckpointError, ExportError, save_pretrained  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "CastlingTrainerCallback":      # imports transformers' Trainer machinery: only when asked for
        from castle_convert.distill.callbacks import CastlingTrainerCallback
        return CastlingTrainerCallback
    raise AttributeError(f"module 'castle_convert' has no attribute {name!r}")


__all__ = ["CastlingConfig", "CastlingTrainerCallback", "CheckpointError", "ConfigError", "ConversionError", "ExportError", "FinalizeError",
           "GateSchedule", "InspectReport", "NotAnnealedError", "attention_transfer", "convert", "distill", "finalize", "inspect", "layer_errors", "load", "lora_targets",
           "save_pretrained", "set_schedule", "__version__"]
