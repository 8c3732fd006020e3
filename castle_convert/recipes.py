"""Recipes: plain YAML -> validated, typed :class:`Recipe`; ``--set a.b=c`` overrides.

Unknown or mistyped keys are errors naming the key path and the valid keys.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from castle_convert.config import CastlingConfig, ConfigError

RECIPES_DIR = Path(__file__).parent / "_recipes"      # -> ../recipes in the repository; copied into wheels


class RecipeError(ConfigError):
    """A recipe cannot be found or has a bad key/value; the message names the key path."""


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages (a value may be a long list)."""
    text = repr(value) if not isinstance(value, str) else value
    text = text if len(text) <= limit else text[:limit] + "..."
    return repr(text) if isinstance(value, str) else text


@dataclass
class DataSection:
    name: Optional[str] = None          # dataset used when --data is not given (e.g. fashion-mnist)
    resolution: Optional[int] = None    # input size; None = the teacher's own
    mix_resolutions: str = ""           # e.g. "224,448": training steps cycle through these sizes (images are made
                                        # at `resolution`, the largest, and resized down per step); "" = resolution
    augmentation: str = "light"         # none | light (random crop/flip as timm's) | strong (rand-aug)
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    workers: int = 2

    def mix_list(self) -> list[int]:
        """``mix_resolutions`` as sizes ([] when unset); raises ValueError on a malformed value."""
        return parse_resolutions(self.mix_resolutions) if str(self.mix_resolutions).strip() else []


@dataclass
class OptimSection:
    lr: float = 5e-4                    # for the global batch
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    schedule: str = "cosine"            # cosine | constant
    batch_size: int = 256               # global batch (all processes, all accumulation steps)
    grad_accum: int = 1
    clip_grad: Optional[float] = 1.0
    min_lr: float = 1e-6


@dataclass
class DistillSection:
    loss: str = "soft"                  # soft (KL at temperature) | hard (CE on teacher argmax)
    temperature: float = 1.0
    alpha: float = 1.0                  # weight of the KD term; (1 - alpha) on label cross-entropy
    attn_transfer: float = 0.0          # weight of per-layer MSE(student attention out, teacher's)
    local_transfer: float = 0.0         # weight of per-layer MSE(linear branch, softmax of the same q,k,v)
    feature_loss: str = "cosine"        # headless backbones: cosine | mse on final embeddings
    feature_target: str = "pooled"      # headless backbones: pooled (CLS / pooled output) | tokens (every
                                        # final token, CLS included: a backbone's value is all its features)
    intermediate: float = 0.0           # weight of the token-wise cosine distance between every converted
                                        # layer's block output and the teacher's (the features dense heads read)


@dataclass
class TransferSection:
    """Stage 1: per-layer attention transfer on the teacher's hidden states (distill/transfer.py)."""

    steps: int = 0                      # optimizer steps (batches); 0 = no stage 1
    batch_size: int = 32                # images per step (per process)
    lr: float = 3e-4
    weight_decay: float = 0.0
    train: str = "attention"            # replacement | qk | attention: what learns besides the new parameters
    reuse: int = 1                      # optimizer steps each teacher forward's hidden states feed (see
                                        # distill/transfer.py: reuse² steps per chunk of `reuse` batches)
    load_from: str = ""                 # a finished stage 1 to reuse instead of running one: the stage1/ folder
                                        # of an earlier run (OUTPUT.run/stage1 or a copy); recorded in the report


@dataclass
class AnnealSection:
    start_epoch: float = 0.0            # g = 1 before this epoch
    end_epoch: float = 1.0              # g = 0 from this epoch on (the rest trains the inference form)
    curve: str = "cosine"               # cosine | linear
    threshold: float = 1.0              # τ at end_epoch, in units of uniform attention 1/N


@dataclass
class CastlingSection:
    kind: str = "linear_angular"
    combine: str = "blend"
    dw: str = "2d"
    dw_kernel: int = 3
    gamma_init: str = "calibrate"
    aux: str = "student"                # student | teacher: what the annealed softmax branch computes
                                        # (teacher: the source attention's frozen weights, so gate 1 is the
                                        # teacher even after stage 1 changed q/k/v)
    keep_softmax: str = ""              # hybrid: layers that stay softmax: "" (none), "0,11" (indices in
                                        # the model's attention order), "auto:K" (the K layers with the
                                        # largest stage-1 error; needs transfer.steps > 0)
    block: int = CastlingConfig.block   # local_global: the window (b×b blocks widened by halo), the pooled
    halo: int = CastlingConfig.halo     # regions (pool × pool), the CLS row's top-k tokens, and the token count
    pool: int = CastlingConfig.pool     # at or below which a layer is plain softmax (CastlingConfig)
    topk: int = CastlingConfig.topk
    exact_tokens: int = CastlingConfig.exact_tokens
    anneal: AnnealSection = field(default_factory=AnnealSection)

    def keep_softmax_spec(self) -> tuple[list[int], int]:
        """(explicit layer indices, K of ``auto:K``); raises RecipeError on a malformed value."""
        return parse_keep_softmax(self.keep_softmax)

    def to_config(self) -> CastlingConfig:  # noqa: D102
        return CastlingConfig(kind=self.kind, combine=self.combine, dw=self.dw, dw_kernel=self.dw_kernel,
                              gamma_init=self.gamma_init, aux=self.aux, gate=1.0, threshold=0.0, block=self.block,
                              halo=self.halo, pool=self.pool, topk=self.topk, exact_tokens=self.exact_tokens)


def parse_resolutions(text: str) -> list[int]:
    """'224,448,518' -> [224, 448, 518] (the fidelity block's and `castle-convert eval`'s resolutions)."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise ValueError(f"--resolutions {text!r}: give positive pixel sizes separated by commas, e.g. 224,448,518")
    return values


@dataclass
class FidelitySection:
    """The fidelity block at the end of the main job (castle_convert/fidelity.py)."""

    data: str = "natural"               # natural (held-out photos, castle_convert/natural.py) | val (the run's
                                        # validation split) | none (no block)
    resolutions: str = "224,448,518"    # px; each rounded to a multiple of the model's patch size
    max_images: Optional[int] = 12      # per resolution (natural: views ordered view by view, so 12 = the centre
                                        # square of each held-out photo; null: all 60); castle-convert eval's too
    latency: bool = True                # batch-1 latency of teacher and student beside the cosines

    def resolution_list(self) -> list[int]:
        try:
            return parse_resolutions(self.resolutions)
        except ValueError as e:
            raise RecipeError(str(e).replace("--resolutions", "fidelity.resolutions")) from None


@dataclass
class Recipe:
    name: str = "custom"
    model: Optional[str] = None         # default MODEL when none is given on the command line
    epochs: float = 1.0
    eval_every: float = 1.0             # epochs between evaluations (the end is always evaluated)
    save_every: int = 500               # optimizer steps between resumable checkpoints
    log_every: int = 10
    seed: int = 0
    mixed_precision: str = "no"         # no | bf16 | fp16
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    distill: DistillSection = field(default_factory=DistillSection)
    transfer: TransferSection = field(default_factory=TransferSection)
    castling: CastlingSection = field(default_factory=CastlingSection)
    fidelity: FidelitySection = field(default_factory=FidelitySection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> "Recipe":
        def bad(path: str, value: Any, fix: str) -> RecipeError:
            return RecipeError(f"recipe '{shown(self.name, 60)[1:-1]}': {path}={shown(value)} is invalid: {fix}")

        if not isinstance(self.name, str) or not self.name or len(self.name) > 100 or self.name.startswith(".") \
                or any(c in self.name for c in "/\\") or not self.name.isprintable():
            raise RecipeError(f"recipe name {shown(self.name, 60)} is invalid: the default --output is runs/MODEL-NAME, "
                              "so use a short file name (letters, digits, '-', '_'), e.g. name: my-recipe")
        choices = {"data.augmentation": ("none", "light", "strong"), "optim.schedule": ("cosine", "constant"),
                   "distill.loss": ("soft", "hard"), "distill.feature_loss": ("cosine", "mse"),
                   "castling.anneal.curve": ("cosine", "linear"), "mixed_precision": ("no", "bf16", "fp16"),
                   "distill.feature_target": ("pooled", "tokens"),
                   "transfer.train": ("replacement", "qk", "attention"),
                   "castling.aux": ("student", "teacher"), "fidelity.data": ("natural", "val", "none")}
        for path, allowed in choices.items():
            value = _get(self, path)
            if value not in allowed:
                raise bad(path, value, f"choose one of {list(allowed)}")
        for path, value in flatten(self.to_dict()).items():         # NaN / inf read from YAML (.nan, .inf, 1e999)
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(path, value, "use a finite number")
        if not self.epochs >= 0:
            raise bad("epochs", self.epochs, "use 0 (stage 1 only, no end-to-end distillation) or a positive number")
        positive = ["optim.lr", "optim.batch_size", "optim.grad_accum", "distill.temperature",
                    "save_every", "eval_every", "log_every", "transfer.batch_size", "transfer.lr", "transfer.reuse"]
        for path in positive:
            if not _get(self, path) > 0:
                raise bad(path, _get(self, path), "use a value > 0")
        non_negative = {"transfer.steps": "0 (no stage 1) or a positive number of steps",
                        "data.workers": "0 (load in the main process) or a number of worker processes",
                        "optim.weight_decay": "0 or a positive value", "optim.warmup_epochs": "0 or a positive value",
                        "optim.min_lr": "0 or a positive value", "distill.attn_transfer": "0 (off) or a positive weight",
                        "distill.intermediate": "0 (off) or a positive weight",
                        "distill.local_transfer": "0 (off) or a positive weight",
                        "transfer.weight_decay": "0 or a positive value", "seed": "0 or a positive integer",
                        "optim.clip_grad": "null or 0 (no clipping) or a positive max norm",
                        "castling.anneal.threshold": "0 or a positive value (units of 1/N)"}
        for path, fix in non_negative.items():
            value = _get(self, path)
            if value is not None and value < 0:
                raise bad(path, value, f"use {fix}")
        try:
            self.fidelity.resolution_list()
        except RecipeError as e:
            raise RecipeError(f"recipe '{self.name}': {e}") from None
        for path in ("data.max_train_samples", "data.max_eval_samples", "fidelity.max_images"):
            value = _get(self, path)
            if value is not None and value < 1:
                raise bad(path, value, "use null (every image) or a positive number of images")
        if self.data.resolution is not None and self.data.resolution < 1:
            raise bad("data.resolution", self.data.resolution,
                      "use null (the model's own input size) or a positive size in pixels, a multiple of its patch size")
        try:
            mix = self.data.mix_list()
        except ValueError:
            raise bad("data.mix_resolutions", self.data.mix_resolutions,
                      "give pixel sizes separated by commas, e.g. 224,448") from None
        if mix and (self.data.resolution is None or max(mix) != self.data.resolution):
            raise bad("data.mix_resolutions", self.data.mix_resolutions,
                      f"the largest size must be data.resolution ({self.data.resolution}): images are made at "
                      "data.resolution and resized down for the smaller sizes")
        if self.optim.min_lr > self.optim.lr:
            raise bad("optim.min_lr", self.optim.min_lr, f"must not exceed optim.lr ({self.optim.lr:g})")
        try:
            _, auto_k = self.castling.keep_softmax_spec()
        except RecipeError as e:
            raise RecipeError(f"recipe '{self.name}': {e}") from None
        if auto_k and not (self.transfer.steps or self.transfer.load_from):
            raise bad("castling.keep_softmax", self.castling.keep_softmax,
                      "auto:K ranks layers by their stage-1 error: set transfer.steps > 0 (or transfer.load_from) "
                      "too, or list indices")
        if not 0.0 <= self.distill.alpha <= 1.0:
            raise bad("distill.alpha", self.distill.alpha, "use a value in [0, 1]")
        a = self.castling.anneal
        if not 0.0 <= a.start_epoch <= a.end_epoch <= self.epochs:
            raise bad("castling.anneal", f"{a.start_epoch}..{a.end_epoch}",
                      f"need 0 <= start_epoch <= end_epoch <= epochs ({self.epochs})")
        if self.optim.batch_size % self.optim.grad_accum:
            raise bad("optim.batch_size", self.optim.batch_size,
                      f"must be a multiple of optim.grad_accum ({self.optim.grad_accum})")
        try:
            self.castling.to_config()
        except ConfigError as e:
            raise RecipeError(f"recipe '{self.name}': castling section: {e}") from e
        return self


def parse_keep_softmax(value: Any) -> tuple[list[int], int]:
    """``""`` → ([], 0); ``"0,11"`` / ``[0, 11]`` → ([0, 11], 0); ``"auto:2"`` → ([], 2)."""
    if value is None or value == "" or value == []:
        return [], 0
    text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value).strip()
    fix = "use layer indices such as '0,11', or 'auto:K' (K layers with the largest stage-1 error)"
    if text.startswith("auto:"):
        k = text[5:]
        if not k.isdigit() or int(k) < 1:
            raise RecipeError(f"castling.keep_softmax={shown(value)} is invalid: {fix}")
        return [], int(k)
    try:
        indices = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise RecipeError(f"castling.keep_softmax={shown(value)} is invalid: {fix}") from None
    if any(i < 0 for i in indices):
        raise RecipeError(f"castling.keep_softmax={shown(value)} is invalid: indices are >= 0; {fix}")
    return indices, 0


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Union:
        if value is None:
            return None
        return _coerce(path, value, args[0])
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):          # YAML reads "5e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is str and isinstance(value, str):
        return value
    if annotation is str and path.endswith(("keep_softmax", "resolutions")) and (value is None or isinstance(value, (list, int))) \
            and not isinstance(value, bool):                      # YAML [0, 11], a single index, or empty
        return ",".join(str(v) for v in (value if isinstance(value, list) else [] if value is None else [value]))
    if annotation is bool and isinstance(value, bool):
        return value
    name = getattr(annotation, "__name__", str(annotation))
    raise RecipeError(f"recipe key '{path}' must be {name}, got {shown(value)} ({type(value).__name__})")


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"recipe key '{path or '<top>'}' must be a mapping, got {shown(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"under '{path}'" if path else "at the top level"
        full = ", ".join(shown(f"{path}.{k}" if path else str(k), 60)[1:-1] for k in unknown[:3])
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise RecipeError(f"unknown recipe key '{full}'{more}; valid keys {where}: {', '.join(fields)}")
    kwargs = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else key
        hint = hints[key]
        kwargs[key] = _build(hint, value, sub) if dataclasses.is_dataclass(hint) else _coerce(sub, value, hint)
    return cls(**kwargs)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def available() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


RECIPE_SUFFIXES = (".yaml", ".yml")
MAX_RECIPE_BYTES = 1 << 20             # a recipe is a few hundred bytes; nothing bigger is read


def _recipe_file(name_or_path: str, used_as: str) -> Path:
    """The YAML file a recipe name (``recipes/NAME.yaml``) or path names: a regular ``.yaml``/``.yml`` file of at
    most :data:`MAX_RECIPE_BYTES` (not ``/etc/shadow`` or ``/dev/zero`` named in ``base:``). Errors quote none of
    the file's content."""
    import stat
    path = Path(name_or_path).expanduser()
    if not path.suffix and not path.exists():
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise RecipeError(f"no recipe '{name_or_path}'{used_as}: give a YAML file path or one of {available()}")
    if path.suffix.lower() not in RECIPE_SUFFIXES or path.resolve().suffix.lower() not in RECIPE_SUFFIXES:
        raise RecipeError(f"'{name_or_path}'{used_as} is not a YAML recipe: give a .yaml/.yml file or one of "
                          f"{available()}")
    try:
        info = path.stat()
    except OSError as e:
        raise RecipeError(f"recipe {path}{used_as} cannot be read ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISREG(info.st_mode):
        raise RecipeError(f"recipe {path}{used_as} is not a regular file: give a .yaml/.yml file")
    if info.st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {path}{used_as} is {info.st_size} bytes, more than a recipe can be "
                          f"({MAX_RECIPE_BYTES} bytes): give a recipe file")
    return path


MAX_RECIPE_VALUES = 10_000           # YAML nodes after expanding aliases: a recipe has about a hundred


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last one silently, so a
    second ``optim:`` dropped the first section) and documents whose aliases expand past :data:`MAX_RECIPE_VALUES`
    nodes (a 1 KB "billion laughs" recipe exhausted memory in validation and error messages)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            lines: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":        # '<<: *base' merges keys on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = lines.get(key)
                except TypeError:                                     # an unhashable key: PyYAML's own error
                    continue
                if first is not None:
                    raise _DuplicateKey(shown(str(key), 60)[1:-1], first, key_node.start_mark.line + 1)
                lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key: str, first: int, again: int):
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


class _TooLarge(Exception):
    pass


def _expanded_size(node, limit: int) -> int:
    """Nodes of ``node`` with every alias expanded, counted up to ``limit`` + 1 (a self-referencing alias too)."""
    count, stack = 0, [node]
    while stack:
        n = stack.pop()
        count += 1
        if count > limit:
            return count
        if isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                stack.extend((k, v))
    return count


def safe_yaml(text: str):
    """``yaml.safe_load(text)``, bounded: raises :class:`_DuplicateKey` for a key given twice in a mapping and
    :class:`_TooLarge` for a document larger than :data:`MAX_RECIPE_VALUES` nodes once aliases are expanded;
    YAML syntax errors as ``yaml.YAMLError``."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_RECIPE_VALUES) > MAX_RECIPE_VALUES:
            raise _TooLarge("aliases")
        return loader.construct_document(node)
    except RecursionError:                        # PyYAML composes and constructs recursively: '[[[[...'
        raise _TooLarge("nesting") from None
    finally:
        loader.dispose()


def _yaml_refusal(where: str, e: BaseException) -> Optional[str]:
    """The one-line refusal of a duplicate key / an oversized document (None for other errors)."""
    if isinstance(e, _DuplicateKey):
        return (f"{where} gives the key '{e.key}' twice in one mapping (lines {e.first} and {e.again}); YAML would "
                "keep only the last one: merge them into one")
    if isinstance(e, _TooLarge) and e.args and e.args[0] == "nesting":
        return f"{where} nests lists or mappings too deeply for a recipe (two or three levels): write it flat"
    if isinstance(e, _TooLarge):
        return (f"{where} expands to more than {MAX_RECIPE_VALUES} values (YAML anchors and aliases '&a' / '*a' "
                "repeated); a recipe needs about a hundred: write the values out")
    return None


def _read(name_or_path: str, _seen: tuple = (), used_as: str = "") -> tuple[str, dict]:
    path = _recipe_file(name_or_path, used_as)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
        if len(raw) > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe {path}{used_as} is more than {MAX_RECIPE_BYTES} bytes: give a recipe file")
        data = safe_yaml(raw.decode("utf-8")) or {}
    except (_DuplicateKey, _TooLarge) as e:
        raise RecipeError(_yaml_refusal(f"recipe {path}{used_as}", e)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe {path}{used_as} cannot be read ({type(e).__name__}"
                          f"{': ' + e.strerror if isinstance(e, OSError) and e.strerror else ''})") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise RecipeError(f"recipe {path} is not valid YAML{line} ({getattr(e, 'problem', None) or e}): "
                          "fix the file (indentation, a missing ':' or quote)") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping")
    base = data.pop("base", None)                   # a recipe may extend another one
    if base:
        if str(base) in _seen:
            raise RecipeError(f"recipe {path}: 'base: {base}' makes a cycle ({' -> '.join(map(str, _seen + (base,)))})")
        _, parent = _read(str(base), _seen + (str(base),), used_as=f" (base: of recipe {path})")
        parent.pop("name", None)                    # a recipe's name is its own, never its base's
        data = _deep_merge(parent, data)
    data.setdefault("name", path.stem)              # `name:` in the file, else the file name
    return path.stem, data


def parse_set(items: list[str]) -> dict:
    """``["optim.lr=1e-4", "castling.dw=1d"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise RecipeError(f"--set needs KEY=VALUE (e.g. optim.lr=1e-4), got {shown(item)}")
        key, raw = item.split("=", 1)
        try:
            value = safe_yaml(raw) if raw.strip() else None
        except (_DuplicateKey, _TooLarge) as e:
            raise RecipeError(_yaml_refusal(f"--set {key.strip()}=...", e)) from None
        except yaml.YAMLError:
            raise RecipeError(f"--set {item}: the value is not a valid YAML scalar (quote it)") from None
        node = out
        parts = key.strip().split(".")
        if not all(parts):
            raise RecipeError(f"--set {item}: the key must be a dotted recipe key such as optim.lr")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_recipe(name_or_path: str = "quick", overrides: Optional[list[str] | dict] = None) -> Recipe:
    """Load a recipe by name (``recipes/NAME.yaml``) or path, apply overrides, validate."""
    _, data = _read(name_or_path)
    if overrides:
        data = _deep_merge(data, parse_set(overrides) if isinstance(overrides, list) else overrides)
    return _build(Recipe, data, "").validate()
