"""Attention kinds: one file each, registered by name in :data:`KINDS`.

A kind is a training-form class with ``from_pretrained_attention(spec, config)`` whose instances
implement ``to_inference()``. Adding a kind is one new file plus one line here.
"""

from castle_convert.attention.base import CastlingModule, CastlingTrainingForm, SoftmaxAttentionSpec
from castle_convert.attention.linear_angular import (LinearAngularAttention,
                                                     LinearAngularAttentionInference)
from castle_convert.attention.separable import SeparableAttention, SeparableAttentionInference

KINDS = {
    "linear_angular": LinearAngularAttention,     # Castling-ViT (arXiv 2211.10526), the default
    "separable": SeparableAttention,              # MobileViTv2 separable self-attention (arXiv 2206.02680)
}

__all__ = ["KINDS", "CastlingModule", "CastlingTrainingForm", "SoftmaxAttentionSpec",
           "LinearAngularAttention", "LinearAngularAttentionInference", "SeparableAttention",
           "SeparableAttentionInference"]
