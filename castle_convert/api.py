"""Public entry points that join two layers.

:func:`convert` and :func:`load` are :func:`castle_convert.convert.convert` and
:func:`castle_convert.export.load.load` plus, for a transformers model, the guards of
:mod:`castle_convert.export.guards` (the model's own ``save_pretrained`` / ``push_to_hub`` go through
castle-convert's directory format; ``output_attentions`` and ``set_attn_implementation`` are refused).
Conversion itself depends only on adapters, attention and config; the guards live with the exporter
they route to, and are installed here, above both.
"""

from __future__ import annotations

import functools

from torch import nn

from castle_convert import convert as _convert
from castle_convert.export import guards
from castle_convert.export.load import load as _load


@functools.wraps(_convert.convert)
def convert(model: nn.Module, *args, **kwargs) -> nn.Module:
    return guards.install(_convert.convert(model, *args, **kwargs))


@functools.wraps(_load)
def load(path, **kwargs) -> nn.Module:
    return guards.install(_load(path, **kwargs))
