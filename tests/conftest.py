import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from families import FAMILIES  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(params=FAMILIES, ids=[f.id for f in FAMILIES])
def family(request):
    return request.param


from castle_convert.attention import KINDS  # noqa: E402


@pytest.fixture(params=list(KINDS))
def kind(request):
    """Every attention kind of castle_convert.attention.KINDS (the shared checks run on each)."""
    return request.param


# The tiny models' patch grids are 4×4 to 4×7: with local_global's default pattern (4×4 blocks, halo 2, 8×8 pooled
# regions, and exact softmax at up to 600 tokens) they would compute plain softmax attention. The shared checks run
# it on a pattern that small grids exercise (2×2 blocks, halo 1, 2×2 regions, the CLS row's top 2 tokens, never the
# exact fallback): windows, pooled regions, top tokens and their exclusions all take part. Explicit settings win.
TINY_PATTERN = {"block": 2, "halo": 1, "pool": 2, "topk": 2, "exact_tokens": 0}


@pytest.fixture(autouse=True)
def _tiny_local_global_pattern(monkeypatch):
    import dataclasses
    import importlib

    from castle_convert.config import CastlingConfig

    convert_module = importlib.import_module("castle_convert.convert")      # the module (the package exports the function)

    resolve = convert_module._resolve_config
    default = CastlingConfig()

    def tiny(config=None, **overrides):
        out = resolve(config, **overrides)
        given = set(overrides) | (set(config) if isinstance(config, dict) else set())
        if out.kind == "local_global" and not given & set(TINY_PATTERN) and all(
                getattr(out, k) == getattr(default, k) for k in TINY_PATTERN):
            out = dataclasses.replace(out, **TINY_PATTERN)
        return out

    monkeypatch.setattr(convert_module, "_resolve_config", tiny)
