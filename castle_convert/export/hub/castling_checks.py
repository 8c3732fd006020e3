"""The one validation of a published castle-convert ``config.json`` (and of the copy of it in the weights' metadata):
untrusted input, checked on every load route before anything is allocated or looked up.

This file is copied verbatim into every published output directory (``castling_checks.py``, imported by the
transformers remote code); castle-convert's own routes (``castle_convert.load``, the timm ``castle_<arch>`` entry
point) import it from the package. It uses only the standard library.

:func:`check_config` raises :class:`ConfigCheckError` (a ``ValueError``) naming the field, its value and the fix:

* ``format_version`` an integer ≥ 1; ``converted_modules`` a list of distinct module paths;
* ``castling``: every field by :data:`CASTLING_FIELDS` (add a rule there with a new ``CastlingConfig`` field);
* sizes (:data:`SIZE_FIELDS`) wherever they appear (``source.model_args``, ``timm_vit``, a transformers source's
  fields): integers in range, and no larger than the weights file can hold (:func:`read_header`): a layer count at
  most its tensor count, a width at most its element count — an edited 2 KB ``config.json`` must not allocate
  gigabytes for a 100 KB weights file; normalisation epsilons finite and positive;
* ``source``: ``timm`` or ``transformers``, no loader argument (:data:`LOADER_KEYS`) anywhere and no model name that
  would read other files (:func:`names_other_files`, read the way ``timm.create_model`` parses names).
"""

import json
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

FORMAT_VERSION = 2
MAX_PIXELS = 1 << 16              # img_size / image_size / patch_size: 65 536 px
MAX_COUNT = 1 << 16               # a layer / module count without a weights file to bound it
MAX_WIDTH = 1 << 24               # a width without a weights file to bound it
MAX_HEADER = 100 << 20            # bytes of a safetensors JSON header


class ConfigCheckError(ValueError):
    """A published config.json (or its copy in the weights' metadata) has a value castle-convert cannot use."""


# -- the weights file's header: shapes without reading a tensor -------------------------------------

class Header:
    """Names and shapes of a safetensors file's tensors (its JSON header only)."""

    def __init__(self, shapes: Dict[str, Tuple[int, ...]], metadata: Optional[Dict[str, str]] = None):
        self.shapes = shapes
        self.metadata = dict(metadata or {})
        self.tensors = len(shapes)
        self.elements = sum(math.prod(s) for s in shapes.values())


def read_header(file: Any) -> Header:
    """The header of the safetensors ``file`` (8-byte length, JSON), bounded: a ``ConfigCheckError`` when it is not
    one, or when a tensor's bytes lie beyond the end of the file (truncated)."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, MAX_HEADER):
            raise ConfigCheckError(f"{file} is not a safetensors file (or is truncated): its header length is {n}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as e:
            raise ConfigCheckError(f"{file} has a damaged safetensors header ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise ConfigCheckError(f"{file} has a damaged safetensors header (not a JSON object)")
    shapes, end = {}, 0
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ConfigCheckError(f"{file} has a damaged safetensors header (its metadata is not a map of strings)")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        info = info if isinstance(info, dict) else {}
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape) and isinstance(offsets, list)
                and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise ConfigCheckError(f"{file} has a damaged safetensors header (tensor {str(name)[:80]!r})")
        shapes[name] = tuple(shape)
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise ConfigCheckError(f"{file} is truncated: its tensors need {8 + n + end} bytes, the file has {size}")
    return Header(shapes, metadata)


# -- rules ------------------------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _shown(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:60] + "..."


def _choice(*allowed: str):
    def rule(v: Any, kinds: Optional[Iterable[str]] = None) -> Optional[str]:
        return None if isinstance(v, str) and v in allowed else f"choose one of {list(allowed)}"
    return rule


def _kind(v: Any, kinds: Optional[Iterable[str]] = None) -> Optional[str]:
    """An attention kind this code implements (``kinds``; any name when not given)."""
    if kinds is None:
        return None if isinstance(v, str) and v else "use an attention kind name"
    kinds = sorted(kinds)
    return None if v in kinds else f"this code implements the kinds {kinds}: load it with a castle-convert version " \
                                   "that knows this kind (pip install -U castle-convert)"


def _odd_kernel(v: Any, kinds=None) -> Optional[str]:
    return None if _is_int(v) and 1 <= v <= 63 and v % 2 == 1 else "use a positive odd integer up to 63, such as 3"


def _small_positive(v: Any, kinds=None) -> Optional[str]:
    return None if _is_number(v) and math.isfinite(v) and 0.0 < v < 1e-2 else "use a small positive number such as 1e-6"


def _unit(v: Any, kinds=None) -> Optional[str]:
    return None if _is_number(v) and 0.0 <= v <= 1.0 else "use a number in [0, 1]"


def _non_negative(v: Any, kinds=None) -> Optional[str]:
    return None if _is_number(v) and math.isfinite(v) and v >= 0 else "use a finite number >= 0"


def _tokens(v: Any, kinds=None) -> Optional[str]:
    return None if v is None or (_is_int(v) and 0 <= v <= MAX_WIDTH) else "use null, 0 or a positive token count"


def _int_range(low: int, high: int):
    def rule(v: Any, kinds=None) -> Optional[str]:
        return None if _is_int(v) and low <= v <= high else f"use an integer from {low} to {high}"
    return rule


# Every field of the ``castling`` section (castle_convert.config.CastlingConfig's fields): a rule returning None when
# the value is good, else the fix. A new CastlingConfig field needs its rule here (tests/test_hostile_round4.py checks).
CASTLING_FIELDS = {
    "kind": _kind,
    "combine": _choice("blend", "sum"),
    "dw": _choice("2d", "1d", "none"),
    "dw_kernel": _odd_kernel,
    "eps": _small_positive,
    "ref_tokens": _tokens,
    "gate": _unit,                        # training-only fields: older directories have them
    "threshold": _non_negative,
    "gamma_init": _choice("calibrate", "one"),
    "aux": _choice("student", "teacher"),
    "block": _int_range(1, 64),           # local_global's pattern (castle_convert.config.CastlingConfig's bounds)
    "halo": _int_range(0, 64),
    "pool": _int_range(1, 64),
    "topk": _int_range(0, 1024),
    "exact_tokens": _int_range(0, 1 << 20),
}

# Size fields, wherever they appear: (what bounds them, smallest value). "layers": a count of repeated layers (at most
# the weights' tensor count); "width": a width, head / class / token count (at most the weights' element count);
# "pixels": an image or patch side (at most MAX_PIXELS); "ratio": a positive finite multiplier.
SIZE_FIELDS = {
    "depth": ("layers", 1), "num_hidden_layers": ("layers", 1),
    "embed_dim": ("width", 1), "hidden_size": ("width", 1), "head_dim": ("width", 1), "mlp_hidden": ("width", 1),
    "intermediate_size": ("width", 1), "num_heads": ("width", 1), "num_attention_heads": ("width", 1),
    "in_chans": ("width", 1), "num_channels": ("width", 1), "num_classes": ("width", 0), "num_labels": ("width", 0),
    "reg_tokens": ("width", 0), "num_register_tokens": ("width", 0), "num_patches": ("width", 1),
    "num_features": ("width", 0), "vocab_size": ("width", 1), "max_position_embeddings": ("width", 1),
    "projection_dim": ("width", 1),
    "img_size": ("pixels", 1), "image_size": ("pixels", 1), "patch_size": ("pixels", 1),
    "mlp_ratio": ("ratio", 0),
}
EPS_FIELDS = ("norm_eps", "layer_norm_eps", "embed_norm_eps", "mlp_norm_eps", "eps")
_SKIP = ("id2label", "label2id", "castling", "timm_eva", "timm_naflex", "converted_modules")   # no sizes inside

# timm.create_model arguments that read or fetch weights: never taken from a config.json, anywhere in it
LOADER_KEYS = ("checkpoint_path", "pretrained", "pretrained_cfg_overlay", "pretrained_strict", "cache_dir")
NAME_KEYS = ("architecture", "model_name")


def names_other_files(name: Any) -> bool:
    """Whether the model name ``name`` would make ``timm.create_model`` read or fetch files: timm takes what precedes
    a ':' as a source (``hf-hub:``, ``local-dir:``, in any case, ``hf_hub:``), and refuses names with '/' or '\\'
    (Hub ids, paths) as ambiguous — so any of the three marks a name that is not a plain registry name."""
    return isinstance(name, str) and any(c in name for c in ":/\\")


def loader_arguments(source: Any, where: str = "source") -> List[str]:
    """Paths (``source.config.model_args.checkpoint_path``) of every loader argument with a value in ``source``, and
    of every model name that would read other files (:func:`names_other_files`)."""
    found: List[str] = []
    if isinstance(source, dict):
        for k, v in source.items():
            here = f"{where}.{k}"
            if (k in LOADER_KEYS and v) or (k in NAME_KEYS and names_other_files(v)):
                found.append(here)
            found += loader_arguments(v, here)
    elif isinstance(source, list):
        for i, v in enumerate(source):
            found += loader_arguments(v, f"{where}[{i}]")
    return found


def _size_problem(kind: str, minimum: int, v: Any, header: Optional[Header]) -> Optional[str]:
    if kind == "ratio":
        ok = _is_number(v) and math.isfinite(v) and 0 < v <= (header.elements if header else MAX_WIDTH)
        return None if ok else "use a positive finite number"
    values = v if kind == "pixels" and isinstance(v, list) and 1 <= len(v) <= 3 else [v]
    bound = {"pixels": MAX_PIXELS,
             "layers": header.tensors if header else MAX_COUNT,
             "width": max(header.elements, 1) if header else MAX_WIDTH}[kind]
    for x in values:
        if not _is_int(x) or x < minimum:
            return f"use an integer >= {minimum}"
        if x > bound:
            what = {"pixels": f"{MAX_PIXELS} px", "layers": "the weights file's tensor count",
                    "width": "the weights file's element count"}[kind]
            return f"it is larger than {what} ({bound}): config.json and the weights do not belong together"
    return None


def _walk_sizes(node: Any, where: str, header: Optional[Header], out: List[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            here = f"{where}.{k}" if where else str(k)
            if k in _SKIP:
                continue
            if k in SIZE_FIELDS and v is not None:
                problem = _size_problem(*SIZE_FIELDS[k], v, header)
                if problem:
                    out.append(f"{here}={_shown(v)} is invalid: {problem}")
            elif k in EPS_FIELDS and v is not None and not (_is_number(v) and math.isfinite(v) and 0 < v < 1):
                out.append(f"{here}={_shown(v)} is invalid: use a small positive number such as 1e-6")
            elif isinstance(v, (dict, list)):
                _walk_sizes(v, here, header, out)
    elif isinstance(node, list):
        for i, v in enumerate(node[:1000]):
            _walk_sizes(v, f"{where}[{i}]", header, out)


def config_problems(config: Any, header: Optional[Header] = None, kinds: Optional[Iterable[str]] = None) -> List[str]:
    """Every problem of ``config`` (a config.json, or the weights' metadata copy) as ``"field=value is invalid: fix"``
    lines; ``header``: the weights file's (bounds for sizes); ``kinds``: the attention kinds this code implements."""
    if not isinstance(config, dict):
        return ["the config is not a JSON object"]
    problems: List[str] = []
    version = config.get("format_version", 1)
    number = int(version) if _is_int(version) or (isinstance(version, str) and version.isdigit()) else 0
    if number < 1:
        problems.append(f"format_version={_shown(version)} is invalid: use a positive integer")
    castling = config.get("castling")
    if not isinstance(castling, dict):
        problems.append(f"castling={_shown(castling)} is invalid: it must be an object of attention settings")
    else:
        unknown = sorted(str(k) for k in castling if k not in CASTLING_FIELDS)
        if unknown:
            problems.append(f"castling has unknown fields {unknown[:5]}: written by a newer castle-convert? upgrade "
                            f"it (known: {sorted(CASTLING_FIELDS)})")
        for name, rule in CASTLING_FIELDS.items():
            if name in castling:
                fix = rule(castling[name], kinds)
                if fix:
                    problems.append(f"castling.{name}={_shown(castling[name])} is invalid: {fix}")
    modules = config.get("converted_modules", [])
    if not isinstance(modules, list) or not all(isinstance(m, str) and 0 < len(m) <= 500 for m in modules):
        problems.append("converted_modules is invalid: it must be a list of module paths")
    elif len(set(modules)) != len(modules):
        problems.append("converted_modules is invalid: a module path is listed twice")
    elif header is not None and len(modules) > header.tensors:
        problems.append(f"converted_modules lists {len(modules)} modules, more than the weights file's "
                        f"{header.tensors} tensors: config.json and the weights do not belong together")
    source = config.get("source")
    if not isinstance(source, dict) or source.get("library") not in ("timm", "transformers"):
        problems.append("source is invalid: it must be an object with library 'timm' or 'transformers'")
    else:
        if source.get("library") == "timm" and (not isinstance(source.get("architecture"), str)
                                                or not isinstance(source.get("model_args", {}), dict)):
            problems.append("source is invalid: a timm source needs an architecture name and model_args")
    named = loader_arguments(config, "config.json")
    if named:
        problems.append(f"{', '.join(n[len('config.json.'):] for n in named[:3])} names weights to load or fetch: a "
                        "castle-convert checkpoint's weights are its model.safetensors only (never a file or download "
                        "named in its config); remove the key(s)")
    _walk_sizes(config, "", header, problems)
    return problems


def check_config(config: Any, header: Optional[Header] = None, kinds: Optional[Iterable[str]] = None,
                 where: str = "config.json") -> None:
    """Raise :class:`ConfigCheckError` (one line: ``where``, the first problem, how many more) unless ``config`` passes
    :func:`config_problems`."""
    problems = config_problems(config, header, kinds)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigCheckError(f"{where}: {problems[0]}{more}")


def check_shapes(expected: Dict[str, Tuple[int, ...]], header: Header, where: str = "model.safetensors") -> None:
    """Raise :class:`ConfigCheckError` unless the weights file (``header``) holds exactly the tensors ``expected``
    (name -> shape, the architecture config.json describes, built without memory): checked before it is allocated."""
    missing = [k for k in expected if k not in header.shapes]
    unexpected = [k for k in header.shapes if k not in expected]
    bad = [k for k in expected if k in header.shapes and tuple(expected[k]) != tuple(header.shapes[k])]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if bad:
            k = bad[0]
            parts.append(f"{len(bad)} with another shape (e.g. {k}: {tuple(header.shapes[k])} in the file, "
                         f"{tuple(expected[k])} in the model)")
        raise ConfigCheckError(f"{where} does not fit the architecture in its config: " + "; ".join(parts) +
                               ". The file and config.json come from different models, or the installed "
                               "timm/transformers builds this architecture differently.")
