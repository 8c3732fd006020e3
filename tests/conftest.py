import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from families import FAMILIES  # noqa: E402

# one thread per pytest-xdist worker (-n N runs N workers side by side); all of the machine's (up to 2) otherwise
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


# -- lanes: the README's command runs the fast lane; .ci/run runs it, then --lane slow ------------------------------

LANES = ("fast", "slow", "full")
BY_ID = {f.id: f for f in FAMILIES}


def pytest_addoption(parser):
    parser.addoption("--lane", choices=LANES, default="fast",
                     help="fast (default; the README's test command): every check, the costly family x kind ones "
                          "(marked covering) with each family's lane_kind (tests/families.py); slow: the other kinds "
                          "of those; full: both (.ci/run runs fast, then slow). Tests named by node id always run.")


def pytest_configure(config):
    config.addinivalue_line("markers", "covering: a costly check over family x kind: the fast lane runs each family "
                                       "with its lane_kind only, --lane slow the other kinds")
    config.addinivalue_line("markers", "slow: a case the fast lane leaves to --lane slow (another of its kind runs "
                                       "in the fast lane)")


def in_fast_lane(item) -> bool:
    """A ``covering`` test runs in the fast lane only for (family, its lane_kind); a ``slow`` one never; every other
    test always does."""
    if item.get_closest_marker("slow") is not None:
        return False
    if item.get_closest_marker("covering") is None:
        return True
    params = getattr(item, "callspec", None) and item.callspec.params
    family = params.get("family") or BY_ID[params["fid"]]
    return params["kind"] == family.lane_kind


def pytest_collection_modifyitems(config, items):
    lane = config.getoption("--lane")
    if lane == "full":
        return
    named = [a for a in config.args if "::" in a]                 # asked for by node id: run whatever the lane
    keep, drop = [], []
    for item in items:
        wanted = in_fast_lane(item) == (lane == "fast") or any(item.nodeid.startswith(a) for a in named)
        (keep if wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config):
    lane = config.getoption("--lane")
    return f"lane: {lane}" + (" (--lane slow: the other kinds of the covering checks; .ci/run runs both)"
                              if lane == "fast" else "")


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
