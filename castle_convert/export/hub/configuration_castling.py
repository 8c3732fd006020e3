"""Configuration of a Castling-ViT checkpoint written by castle-convert.

This file is copied into every published output directory and loaded by
``transformers`` with ``trust_remote_code=True``: it imports only ``transformers``.

Fields (besides the usual ``PretrainedConfig`` ones such as ``id2label``):
    castling: the attention settings (``kind``, ``dw``, ``dw_kernel``, ``eps``, ...).
    source: how the base architecture is rebuilt (``library``: ``timm`` or ``transformers``).
    timm_vit: for timm ViT sources, the geometry of the ViT implemented in ``modeling_castling.py``.
    timm_eva: for timm Eva sources (built with timm from ``source``), per converted attention what
        timm's own attention does not tell (``layers``: ``{name: {"in_bias": bool}}``).
    timm_naflex: the same for timm ``naflexvit_*`` sources (built with timm from ``source``).
    format_version: castle-convert's output-directory format.
For Hugging Face sources the base model's own config fields (``hidden_size``, ...) are stored
at the top level as well, so the transformers model classes read them unchanged.
"""

from transformers import PretrainedConfig


class CastlingViTConfig(PretrainedConfig):
    model_type = "castling_vit"

    def __init__(self, castling=None, source=None, timm_vit=None, timm_eva=None, timm_naflex=None,
                 converted_modules=None, format_version=None, castle_convert_version=None, **kwargs):
        self.castling = dict(castling or {})
        self.source = dict(source or {})
        self.timm_vit = dict(timm_vit) if timm_vit else None
        self.timm_eva = dict(timm_eva) if timm_eva else None
        self.timm_naflex = dict(timm_naflex) if timm_naflex else None
        self.converted_modules = list(converted_modules or [])
        self.format_version = format_version
        self.castle_convert_version = castle_convert_version
        super().__init__(**kwargs)
