"""Attention kinds: one file each, registered by name in :data:`KINDS`.

A kind is a training-form class with ``from_pretrained_attention(spec, config)`` whose instances
implement ``to_inference()``. Adding a kind is one new file plus one line here.
"""

from castle_convert.attention.base import (CastlingModule, CastlingTrainingForm, GridTracker,
                                           SoftmaxAttentionSpec)
from castle_convert.attention.linear_angular import (LinearAngularAttention,
                                                     LinearAngularAttentionInference)

KINDS = {
    "linear_angular": LinearAngularAttention,
}

__all__ = ["KINDS", "CastlingModule", "CastlingTrainingForm", "GridTracker", "SoftmaxAttentionSpec",
           "LinearAngularAttention", "LinearAngularAttentionInference"]
