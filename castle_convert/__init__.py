"""castle-convert: turn pretrained Vision Transformers' softmax attention into linear attention
(Castling-ViT linear-angular by default, or MobileViTv2 separable: ``convert(model, kind="separable")``).

Public API::

    import castle_convert as cc
    student = cc.convert(model)          # training form, teacher-equivalent at step 0
    result = cc.distill(model, student, "fashion-mnist", recipe="quick")   # result.student: finalized
    deployable = cc.finalize(student)    # inference form, parity-checked
    print(cc.inspect(model).format())    # what would be converted, MACs before/after
"""

from castle_convert.config import CastlingConfig, ConfigError
from castle_convert.convert import (ConversionError, FinalizeError, InspectReport, convert, finalize,
                                    inspect, set_schedule)
from castle_convert.distill import distill

__version__ = "0.1.0"

__all__ = ["CastlingConfig", "ConfigError", "ConversionError", "FinalizeError", "InspectReport",
           "convert", "distill", "finalize", "inspect", "set_schedule", "__version__"]
