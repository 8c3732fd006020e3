"""timm registry: ``castle_<arch>`` only for architectures that convert, and every listed name can be created.

Creating all ~230 names takes about a minute on one core, so the stored classification
(castle_convert/export/timm_archs.json, rebuilt with ``python -m castle_convert.export.timm_archs``) is
checked here on a sample: one architecture per distinct refusal reason, every 12th converting architecture,
and the RoPE / attention-pool families by name. ``CASTLE_REGISTRY_FULL=1`` checks every name.
"""

from __future__ import annotations

import os

import pytest
import torch

import castle_convert  # noqa: F401 - registers castle_<arch>
from castle_convert.export import timm_archs

timm = pytest.importorskip("timm")

DATA = timm_archs.load()
NAMED = ["eva02_tiny_patch14_224", "vit_base_patch16_rope_mixed_224", "vit_small_patch16_dinov3",
         "vit_pe_core_tiny_patch16_384", "vit_base_patch16_siglip_224", "test_vit3", "deit_tiny_distilled_patch16_224"]


def _sample() -> list[str]:
    if os.environ.get("CASTLE_REGISTRY_FULL"):
        return sorted(DATA["convert"]) + sorted(DATA["refused"])
    by_reason: dict[str, str] = {}
    for arch, why in sorted(DATA["refused"].items()):
        by_reason.setdefault(why, arch)
    return sorted(set(DATA["convert"][::12]) | set(by_reason.values()) | {a for a in NAMED if a in DATA["convert"]})


def test_classification_is_for_this_timm_and_complete():
    assert DATA["timm"] == timm.__version__, "rebuild it: python -m castle_convert.export.timm_archs"
    known = set(DATA["convert"]) | set(DATA["refused"])
    assert set(timm.list_models(list(timm_archs.PATTERNS))) == known
    assert not set(DATA["convert"]) & set(DATA["refused"])
    assert all(DATA["refused"].values())


def test_only_converting_architectures_are_registered():
    listed = {n.removeprefix("castle_") for n in timm.list_models("castle_*")}
    assert listed == set(DATA["convert"]), "every listed name creates (castle_transformers is a directory's entry)"
    assert "castle_transformers" not in timm.list_models() and timm.is_model("castle_transformers")
    assert set(NAMED) <= listed, "the RoPE / attention-pool families are listed"
    for arch in ("vit_relpos_base_patch16_224", "vit_dlittle_patch16_reg1_gap_256", "vit_5b_patch16_sapiens2"):
        assert arch in DATA["refused"] and f"castle_{arch}" not in timm.list_models("castle_*")
    assert not timm.list_models("castle_beit*"), "BEiT (relative position bias) is outside the patterns"


@pytest.mark.parametrize("arch", _sample())
def test_sampled_names_create_and_refusals_hold(arch):
    why = timm_archs.classify(arch)
    if arch in DATA["convert"]:
        assert why is None
        with torch.device("meta"):
            model = timm.create_model(f"castle_{arch}")
        assert model.castling_converted
    else:
        assert why == DATA["refused"][arch]


def test_castle_transformers_is_reached_through_directories_not_by_name():
    from castle_convert.export.load import CheckpointError
    with pytest.raises(CheckpointError, match=r"castle_transformers is not a model to create by name: .*castle_convert"
                                              r"\.load\(DIR\)"):
        timm.create_model("castle_transformers")
