"""The timm route: ``castle_<arch>`` model names in timm's registry.

After ``import castle_convert`` (before or after ``import timm``)::

    timm.create_model("castle_deit_small_patch16_224", pretrained=True,
                      pretrained_cfg_overlay=dict(file="out/model.safetensors"))
    timm.create_model("local-dir:out", pretrained=True)     # config.json names castle_<arch>
    timm.create_model("hf-hub:me/deit-small-castling", pretrained=True)

The entry point reads the base architecture's arguments and the castling settings from the
``model.safetensors`` metadata (timm hands it only the file), builds the base architecture,
converts it to the inference form (no calibration) and loads the weights (safetensors only).

Registration costs nothing at import: timm is not imported by castle_convert; if it is not
loaded yet, a one-shot import hook registers the names right after timm finishes importing.
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

from castle_convert.export.source import (_NO_WEIGHTS, CFG_KEY, PREFIX, TRANSFORMERS_ENTRY,  # noqa: F401
                                          castle_config, converted_pretrained_cfg)

from castle_convert.export.timm_archs import PATTERNS, convertible  # noqa: E402
default_cfgs: dict[str, dict] = {}           # read by timm's register_model
# key of the config.json embedded (as pretrained_cfg[CFG_KEY]) in the timm equivalent of a transformers source: that
# model's weights, as timm's save_for_hf writes them, carry timm's names (no renaming on load)
TIMM_NAMES = "castle_timm_names"
_registered = False
_FEATURE_ARGS = ("out_indices", "feature_cls")      # what timm's ViT features_only takes


def _caller_checkpoint_path() -> Optional[str]:
    """``checkpoint_path=`` of the ``timm.create_model`` call that is building this model, if any.

    timm loads that file only after the entry point has built the model, so the entry point reads the
    castle-convert config out of it (safetensors metadata; nothing is unpickled) to build the right kind.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "create_model" and frame.f_globals.get("__name__") == "timm.models._factory":
            path = frame.f_locals.get("checkpoint_path")
            return str(path) if path else None
        frame = frame.f_back
    return None


def _castle_metadata(file: Path) -> bool:
    """Whether ``file`` is a safetensors file with castle-convert's config in its metadata (header only)."""
    if not str(file).endswith(".safetensors") or not Path(file).is_file():
        return False
    from safetensors import safe_open

    from castle_convert.export.load import METADATA_KEY
    try:
        with safe_open(str(file), framework="pt") as f:
            return METADATA_KEY in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - not ours to judge: timm's load_checkpoint reports it
        return False


def _features(model, kwargs: dict):
    """timm's ``features_only`` wrapper of a ViT (``FeatureGetterNet``), as ``build_model_with_cfg`` makes it."""
    from timm.models._builder import pretrained_cfg_for_features
    from timm.models._features import FeatureGetterNet

    cfg = dict(kwargs)
    feature_cls = cfg.pop("feature_cls", "getter")
    if feature_cls not in ("getter", FeatureGetterNet):
        from castle_convert.export.load import CheckpointError
        raise CheckpointError(f"features_only with feature_cls={feature_cls!r}: castle_<arch> models give features "
                              "through timm's getter (feature_cls='getter', the ViT default)")
    cfg.setdefault("out_indices", 3)
    castle = {k: getattr(model, k) for k in ("castling_config", "castling_converted", "castle_source")
              if hasattr(model, k)}
    net = FeatureGetterNet(model, **cfg)
    net.pretrained_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    net.default_cfg = net.pretrained_cfg
    for k, v in castle.items():
        setattr(net, k, v if k != "castling_converted" else [f"model.{p}" for p in v])
    return net


def _weights_file(cfg: dict, cache_dir: Any = None) -> Optional[Path]:
    from castle_convert.export.load import WEIGHTS_NAME
    if cfg.get("file"):
        p = Path(cfg["file"]).expanduser()
        return p / WEIGHTS_NAME if p.is_dir() else p
    if cfg.get("hf_hub_id"):
        from huggingface_hub import hf_hub_download
        return Path(hf_hub_download(cfg["hf_hub_id"], WEIGHTS_NAME, cache_dir=cache_dir))
    return None


def create_castle_model(arch: str, pretrained: bool = False, pretrained_cfg: Any = None,
                        pretrained_cfg_overlay: Optional[dict] = None, cache_dir: Any = None, **kwargs: Any):
    """Entry point behind every ``castle_<arch>`` name."""
    import timm
    from timm.models import PretrainedCfg
    from timm.models._builder import resolve_pretrained_cfg

    from castle_convert.config import CastlingConfig
    from castle_convert.convert import convert, finalize
    from castle_convert.export.load import (METADATA_KEY, CheckpointError, build_checked, check_format,
                                            checked_config, config_from_metadata, load_into, read_safetensors,
                                            weights_header)

    name = PREFIX + arch
    kwargs.pop("pretrained_model_args", None)
    features = kwargs.pop("features_only", False)
    feature_kwargs = {k: kwargs.pop(k) for k in _FEATURE_ARGS if k in kwargs}
    embedded = None
    if isinstance(pretrained_cfg, dict):       # local-dir / hf-hub: the whole flat config.json
        embedded = pretrained_cfg.get(CFG_KEY)   # timm's save_for_hf of a converted model
        fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
        pretrained_cfg = {k: v for k, v in pretrained_cfg.items() if k in fields}
    cfg = resolve_pretrained_cfg(name, pretrained_cfg, pretrained_cfg_overlay).to_dict()
    checkpoint = _caller_checkpoint_path()
    if not pretrained and checkpoint and _castle_metadata(Path(checkpoint)):
        # timm.create_model(name, checkpoint_path=FILE): build what FILE holds (its kind, hybrid layers, settings);
        # timm then loads FILE into it
        pretrained, cfg = True, {**cfg, "file": checkpoint}
    if not pretrained:
        base = timm.create_model(arch, pretrained=False, **kwargs)
        model = finalize(convert(base, inplace=True, gamma_init="one"), inplace=True, check=False, force=True)
        model.castling_config = dataclasses.replace(CastlingConfig(), ref_tokens=model.castling_config.ref_tokens)
        model.pretrained_cfg = converted_pretrained_cfg({**model.pretrained_cfg, **cfg}, arch, None)
        model.default_cfg = model.pretrained_cfg
        return _features(model, feature_kwargs) if features else model
    file = _weights_file(cfg, cache_dir)
    _refuse_pickled_directory(file)
    if file is None:
        raise CheckpointError(
            f"{name} has no weights of its own: pass the model.safetensors of a castle-convert output directory, "
            f"timm.create_model('{name}', pretrained=True, pretrained_cfg_overlay=dict(file='out/model.safetensors'))"
            ", or timm.create_model('local-dir:out', pretrained=True) / ('hf-hub:REPO', pretrained=True)")
    header = weights_header(file)              # names, shapes, metadata: nothing is built or read before the checks
    if METADATA_KEY not in header.metadata and embedded:
        config = embedded                      # timm's save_for_hf: the config travels in pretrained_cfg
        if not isinstance(config, dict) or not isinstance(config.get("source"), dict):
            raise CheckpointError(f"{file}: its config.json's '{CFG_KEY}' is not a castle-convert config")
        check_format(config.get("format_version", 1), file)
    else:
        config = config_from_metadata(header.metadata, file)
    checked_config(config, header, f"{file} (its castle-convert config)")
    src = config["source"]
    num_classes = kwargs.pop("num_classes", None)
    img_size = kwargs.pop("img_size", None)
    if src.get("library") == "transformers":          # the equivalent timm ViT, weights renamed
        model, stored, data_cfg, config = _from_transformers(arch, file, cfg, header, config, cache_dir)
    else:
        if src.get("library") != "timm" or src.get("architecture") != arch:
            raise CheckpointError(f"{file} holds a converted {src.get('library')} {src.get('architecture') or '?'}, "
                                  f"not {arch}: load it with castle_{src.get('architecture')}")
        stored, data_cfg = dict(src.get("model_args") or {}), src.get("pretrained_cfg") or {}
    changed = {k: v for k, v in kwargs.items() if _norm(stored.get(k)) != _norm(v)}
    if changed:
        raise CheckpointError(f"{name}: {', '.join(f'{k}={v!r}' for k, v in changed.items())} differs from the "
                              f"checkpoint {file} ({', '.join(f'{k}={stored.get(k)!r}' for k in changed)}); only "
                              "num_classes (new head) and img_size (resampled position embedding) can change")
    if src.get("library") != "transformers":
        model = build_checked(config, header, file, f"{file}'s metadata")
        state, _ = read_safetensors(file)
        load_into(model, state, file)
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    if img_size is not None and _norm(img_size) != _norm(stored.get("img_size")):
        model.set_input_size(img_size=img_size if not isinstance(img_size, list) else tuple(img_size))
    model.pretrained_cfg = converted_pretrained_cfg(
        {**model.pretrained_cfg, **{k: v for k, v in cfg.items() if v is not None},
         **{k: tuple(v) if isinstance(v, list) else v for k, v in data_cfg.items()}},
        arch, castle_config(config) if src.get("library") == "timm" else {**config, TIMM_NAMES: True})
    if num_classes is not None:
        model.pretrained_cfg["num_classes"] = num_classes
    model.default_cfg = model.pretrained_cfg
    model.castle_source = dict(src)
    if features:
        model = _features(model, feature_kwargs)
    return model.train()                      # timm.create_model returns models in train mode


def _directory_file(file: Path, cfg: dict, name: str, cache_dir: Any) -> Optional[Path]:
    """``name`` (config.json, preprocessor_config.json) beside ``file`` in its directory or Hub repo, or None."""
    local = Path(file).parent / name
    if local.is_file() or not cfg.get("hf_hub_id"):
        return local if local.is_file() else None
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(cfg["hf_hub_id"], name, cache_dir=cache_dir))
    except Exception:  # noqa: BLE001 - not every repo has every file
        return None


def _refuse_pickled_directory(file: Optional[Path]) -> None:
    """A directory whose weights are a pickle (timm's ``save_for_hf`` writes ``pytorch_model.bin`` unless told
    otherwise): one line naming the call that writes safetensors; castle-convert never unpickles weights."""
    from castle_convert.export.load import PICKLE_NAMES, WEIGHTS_NAME, CheckpointError
    if file is None or Path(file).is_file() or Path(file).name != WEIGHTS_NAME:
        return
    pickle = next((Path(file).parent / n for n in PICKLE_NAMES if (Path(file).parent / n).is_file()), None)
    if pickle is not None:
        raise CheckpointError(f"{Path(file).parent} holds {pickle.name}, a pickle, and no {WEIGHTS_NAME}: castle_* "
                              "models load weights only from safetensors (never unpickled). timm's save_for_hf writes a "
                              "pickle by default: save with timm.models.save_for_hf(model, DIR, "
                              "safe_serialization=True), or cc.save_pretrained(model, DIR)")


def _from_transformers(arch: str, file: Path, cfg: dict, header, meta_config: dict, cache_dir: Any):
    """(model, its constructor arguments, data config, the directory's config) of the timm model equivalent to a
    transformers-source file (:mod:`castle_convert.export.timm_equivalent`), or a one-line error naming the routes
    that load it. ``meta_config`` with :data:`TIMM_NAMES` is that config embedded in a ``pretrained_cfg`` (timm's
    ``save_for_hf`` of such a model): its weights carry timm's names already. The config.json beside the weights is
    checked, and the equivalent built on the meta device and compared with the file's (renamed) tensor shapes,
    before it is built for real."""
    import json

    import timm
    import torch

    from castle_convert.config import CastlingConfig
    from castle_convert.convert import convert, finalize
    from castle_convert.export.hub.castling_checks import ConfigCheckError, Header, check_shapes
    from castle_convert.export.load import CheckpointError, checked_config, load_into, read_config, read_safetensors
    from castle_convert.export.timm_equivalent import hf_data_config, plan, set_norm_eps, timm_state

    where = cfg.get("file") or cfg.get("hf_hub_id") or str(file)
    timm_names = bool(meta_config.get(TIMM_NAMES))
    if timm_names:
        config = {k: v for k, v in meta_config.items() if k != TIMM_NAMES}
    else:
        config_file = _directory_file(file, cfg, "config.json", cache_dir)
        config = read_config(config_file.parent) if config_file is not None else None
        if config is not None:
            checked_config(config, header, config_file)
    eq = plan(config) if config is not None else "its config.json is not beside the weights"
    if isinstance(eq, str):
        raise _no_timm(where, eq)
    if eq.architecture != arch:
        raise CheckpointError(f"{where} holds a converted transformers {eq.hf_class}, whose timm equivalent is "
                              f"castle_{eq.architecture}, not castle_{arch}: load it with castle_{eq.architecture}")
    castling = CastlingConfig.from_dict({"ref_tokens": 0, **meta_config["castling"]})
    converted = set(eq.converted_modules)

    def build(device: str):
        base = timm.create_model(arch, pretrained=False, device=device, **eq.model_args)
        set_norm_eps(base, eq.norm_eps)
        model = convert(base, castling, inplace=True, gamma_init="one",
                        filter_fn=(lambda m, fqn: fqn in converted) if converted else None)
        return finalize(model, inplace=True, check=False, force=True)

    def renamed(state: dict) -> dict:
        if timm_names:
            return state
        try:
            return timm_state(state, eq, config)
        except KeyError as e:
            raise CheckpointError(f"{file}: {e.args[0]}: load it with castle_convert.load({str(where)!r})") from None
    try:                                        # shapes first: nothing of the config's sizes is allocated before
        meta = {k: tuple(v.shape) for k, v in build("meta").state_dict().items()}
        shapes = {k: tuple(v.shape) for k, v in renamed({k: torch.empty(s, device="meta")
                                                         for k, s in header.shapes.items()}).items()}
        check_shapes(meta, Header(shapes), where=str(file))
    except ConfigCheckError as e:
        raise CheckpointError(str(e)) from None
    model = build("cpu")
    model.castling_config = castling
    state, _ = read_safetensors(file)
    load_into(model, renamed(state), file)
    if timm_names:                            # saved by timm from this very model: its own names, its own data config
        return model.eval(), eq.model_args, {}, config
    processor = _directory_file(file, cfg, "preprocessor_config.json", cache_dir)
    data = hf_data_config(json.loads(processor.read_text()) if processor else None, eq.resolution)
    return model.eval(), eq.model_args, data, config


def _norm(v: Any) -> Any:
    """Compare JSON-stored and passed arguments: lists and tuples alike."""
    return tuple(_norm(x) for x in v) if isinstance(v, (list, tuple)) else v


def _named(fn, name: str):
    def entry(pretrained: bool = False, **kwargs: Any):
        return fn(pretrained, **kwargs)
    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = fn.__doc__
    return entry


def _entrypoint(arch: str):
    fn = _named(lambda pretrained, **kwargs: create_castle_model(arch, pretrained, **kwargs), PREFIX + arch)
    fn.__doc__ = f"timm {arch} converted by castle-convert (load a castle-convert model.safetensors)."
    return fn


def transformers_source(pretrained: bool = False, pretrained_cfg: Any = None, **kwargs: Any):
    """timm entry of a directory converted from a transformers model: timm has no model class for its weights
    (their names are transformers'), so this stops with the routes that do load it."""
    from castle_convert.export.load import CheckpointError, read_config
    from castle_convert.export.timm_equivalent import plan
    cfg = pretrained_cfg if isinstance(pretrained_cfg, dict) else {}
    where = cfg.get("file") or cfg.get("hf_hub_id")
    if not where:
        raise CheckpointError(f"{TRANSFORMERS_ENTRY} is not a model to create by name: it is what timm's local-dir: / "
                              "hf-hub: read from a castle-convert directory converted from a transformers class without "
                              "a timm equivalent; load such a directory with castle_convert.load(DIR) or transformers "
                              "(AutoModel.from_pretrained(DIR, trust_remote_code=True))")
    try:
        reason = plan(read_config(Path(where)))
    except CheckpointError as e:
        reason = str(e)
    raise _no_timm(where, reason if isinstance(reason, str) else "it was written for another castle-convert version")


def _no_timm(where: Any, reason: str):
    """The one-line error of a transformers-source directory timm cannot build."""
    from castle_convert.export.load import CheckpointError
    return CheckpointError(f"{where} holds a converted transformers model that timm cannot build ({reason}): load it "
                           f"with castle_convert.load({str(where)!r}) or transformers (AutoModel.from_pretrained(..., "
                           "trust_remote_code=True))")


def _unlisted(name: str) -> None:
    """Keep ``name`` out of ``timm.list_models()`` while ``timm.create_model`` still finds it: timm lists every
    registered entry point except its deprecated names. :data:`TRANSFORMERS_ENTRY` is the entry of a directory's
    config.json (``local-dir:`` / ``hf-hub:`` reach it, and it names the routes that load the directory), not a
    model anyone builds by name, so no listed ``castle_*`` name fails to create. A timm without that private table
    lists it; nothing else changes."""
    from timm.models import _registry
    hidden = getattr(_registry, "_deprecated_models", None)
    if isinstance(hidden, dict):
        hidden[name] = None


def register() -> int:
    """Register ``castle_<arch>`` for every timm ViT/DeiT/Eva architecture that converts (the stored
    classification of :mod:`castle_convert.export.timm_archs`) and :data:`TRANSFORMERS_ENTRY`; returns how
    many were added."""
    global _registered
    import timm
    from timm.models import get_pretrained_cfg
    from timm.models._registry import is_model, register_model

    added = 0
    if not is_model(TRANSFORMERS_ENTRY):
        default_cfgs[TRANSFORMERS_ENTRY] = {}
        fn = globals()[TRANSFORMERS_ENTRY] = _named(transformers_source, TRANSFORMERS_ENTRY)
        register_model(fn)
        _unlisted(TRANSFORMERS_ENTRY)
        added += 1
    converts = convertible()
    for arch in timm.list_models(list(PATTERNS)):
        name = PREFIX + arch
        if is_model(name) or arch not in converts:
            continue
        base = get_pretrained_cfg(arch)
        cfg = {k: v for k, v in (base.to_dict() if base is not None else {}).items() if k not in _NO_WEIGHTS}
        default_cfgs[name] = cfg
        fn = _entrypoint(arch)
        globals()[name] = fn
        register_model(fn)
        added += 1
    _registered = True
    return added


def _register_quietly() -> None:
    try:
        register()
    except Exception as e:  # noqa: BLE001 - never break `import timm`
        warnings.warn(f"castle_convert could not register its timm models: {type(e).__name__}: {e}", stacklevel=2)


class _PostImportLoader(importlib.abc.Loader):
    """Runs timm's own loader, then registers; anything else is delegated to the real loader."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        for finder in [f for f in sys.meta_path if isinstance(f, _TimmImportHook)]:
            sys.meta_path.remove(finder)                      # timm is being imported: the hook is done
        self._loader.exec_module(module)
        _register_quietly()

    def __getattr__(self, item):
        return getattr(self._loader, item)


class _TimmImportHook(importlib.abc.MetaPathFinder):
    """Wraps timm's loader so that registration runs when timm is *imported*. Another library probing
    with ``importlib.util.find_spec("timm")`` (transformers does, at import) gets the same spec and
    imports nothing; the hook stays until timm is actually executed (then it removes itself)."""

    _searching = False

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm" or self._searching:
            return None
        self._searching = True                                # the real finders answer the inner lookup
        try:
            spec = importlib.util.find_spec("timm")
        finally:
            self._searching = False
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _PostImportLoader(spec.loader)
        return spec


def install() -> None:
    """Register now if timm is loaded, else when it is imported."""
    if _registered:
        return
    if "timm" in sys.modules and hasattr(sys.modules["timm"], "create_model"):
        _register_quietly()
    elif not any(isinstance(f, _TimmImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TimmImportHook())
