"""Which timm architectures convert: the ``castle_<arch>`` names the timm route registers.

timm's registry holds every ViT-like architecture; ``castle_<arch>`` is registered only for those whose
attention castle-convert converts (so every ``timm.list_models("castle_*")`` name can be created).
Deciding means building the architecture and scanning it, too slow for ``import castle_convert``
(about a minute for timm's ~300 names), so the answer for the installed timm is stored in
``timm_archs.json`` next to this file, with the reason for each refused architecture::

    python -m castle_convert.export.timm_archs          # rebuild timm_archs.json for the installed timm

Architectures the file does not know (a newer timm) are not registered until it is rebuilt.
tests/test_registry.py checks the file against the installed timm.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Optional

PATTERNS = ("vit_*", "deit*", "test_vit*", "eva*", "naflexvit*")
FILE = Path(__file__).with_name("timm_archs.json")


def classify(arch: str) -> Optional[str]:
    """None when ``arch`` converts (built on the meta device, converted and finalized as ``castle_<arch>``
    builds it), else why not, in one line."""
    import timm
    import torch

    from castle_convert.convert import convert, finalize
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = timm.create_model(arch, pretrained=False)
            finalize(convert(base, inplace=True, gamma_init="one"), inplace=True, check=False, force=True)
    except Exception as e:  # noqa: BLE001 - every refusal is recorded with its reason
        lines = [ln.strip(" -") for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines[1:] if ":" in ln), lines[0] if lines else type(e).__name__)
        return detail.split("]: ", 1)[-1].replace(f"({arch})", "(…)")[:200]
    return None


def load() -> dict:
    """The stored classification: ``{"timm": version, "convert": [arch, ...], "refused": {arch: reason}}``."""
    try:
        return json.loads(FILE.read_text())
    except (OSError, ValueError):
        return {"timm": None, "convert": [], "refused": {}}


def convertible() -> set[str]:
    return set(load().get("convert", []))


def build(names: Optional[list[str]] = None) -> dict:
    import timm
    names = names if names is not None else timm.list_models(list(PATTERNS))
    refused = {}
    ok = []
    for i, arch in enumerate(names):
        why = classify(arch)
        if why is None:
            ok.append(arch)
        else:
            refused[arch] = why
        print(f"[{i + 1}/{len(names)}] {arch}: {why or 'converts'}", file=sys.stderr)
    return {"timm": timm.__version__, "convert": sorted(ok), "refused": dict(sorted(refused.items()))}


if __name__ == "__main__":
    data = build()
    FILE.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(f"{FILE}: {len(data['convert'])} architectures convert, {len(data['refused'])} refused")
