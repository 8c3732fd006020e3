"""Attention kinds: one file each, registered by name in :data:`KINDS`.

A kind is a training-form class with ``from_pretrained_attention(spec, config)`` whose instances
implement ``to_inference()``. Adding a kind is one new file plus one line here.
"""

from castle_convert.attention.base import CastlingModule, CastlingTrainingForm, SoftmaxAttentionSpec
from castle_convert.attention.linear_angular import (LinearAngularAttention,
                                                     LinearAngularAttentionInference)
from castle_convert.attention.local_global import LocalGlobalAttention, LocalGlobalAttentionInference
from castle_convert.attention.separable import SeparableAttention, SeparableAttentionInference

KINDS = {
    "linear_angular": LinearAngularAttention,     # Castling-ViT (arXiv 2211.10526), the default
    "separable": SeparableAttention,              # MobileViTv2 separable self-attention (arXiv 2206.02680)
    "local_global": LocalGlobalAttention,         # exact softmax over window + prefix + pooled regions (issue 25)
}
# The inference forms of every kind (what a finalized model holds).
INFERENCE_FORMS = (LinearAngularAttentionInference, SeparableAttentionInference, LocalGlobalAttentionInference)

__all__ = ["KINDS", "CastlingModule", "CastlingTrainingForm", "SoftmaxAttentionSpec",
           "LinearAngularAttention", "LinearAngularAttentionInference", "SeparableAttention",
           "SeparableAttentionInference", "LocalGlobalAttention", "LocalGlobalAttentionInference", "INFERENCE_FORMS"]
