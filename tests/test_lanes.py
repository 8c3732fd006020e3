"""The fast lane (the README's test command) leaves no kind and no family trait out of the covering checks."""

from __future__ import annotations

from castle_convert.attention import KINDS
from families import FAMILIES


def test_every_kind_and_every_trait_is_in_the_fast_lane():
    assert {f.lane_kind for f in FAMILIES} == set(KINDS)
    for kind in KINDS:                                    # each kind on a timm and a transformers source, and RoPE
        assert {f.hf for f in FAMILIES if f.lane_kind == kind} == {False, True}, kind
        assert any(f.rope for f in FAMILIES if f.lane_kind == kind), kind
    default = [f for f in FAMILIES if f.lane_kind == "local_global"]
    traits = {"timm": any(not f.hf for f in default), "transformers": any(f.hf for f in default),
              "RoPE": any(f.rope for f in default), "NaFlex": any(f.naflex for f in default),
              "attention-pooling head": any(f.pool for f in default),
              "registers": any(f.prefix_tokens > 2 for f in default)}
    assert all(traits.values()), traits
