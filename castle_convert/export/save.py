"""``save_pretrained``: a converted model as a complete, publishable directory, written atomically.

Files (DESIGN.md §4):

* ``model.safetensors`` — inference-only weights; metadata embeds the config fields the timm route
  needs (``castle_convert``) and the resolved recipe.
* ``config.json`` — castling settings, converted modules, how to rebuild the source architecture;
  ``model_type: castling_vit`` + ``auto_map`` for transformers; timm-style ``architecture`` /
  ``num_classes`` / mean / std fields (``timm.create_model("local-dir:DIR", pretrained=True)``).
* ``configuration_castling.py``, ``modeling_castling.py`` (+ ``modeling_castling_timm.py``,
  ``castling_layers.py``), ``castling_functional.py`` — the transformers remote code (torch + transformers;
  timm-built sources: timm too).
* ``preprocessor_config.json``, ``README.md`` (model card), ``recipe.yaml``, ``report.json``.

Before the directory appears, it is loaded back (castle_convert route and remote-code model) and
compared with the in-memory model.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from castle_convert.export.load import CONFIG_NAME, FORMAT_VERSION, METADATA_KEY, WEIGHTS_NAME
from castle_convert.export.source import (RemoteCodeUnsupported, describe_source, is_timm, is_timm_eva, is_timm_naflex,
                                          timm_eva_spec, timm_naflex_spec, timm_vit_spec)

logger = logging.getLogger(__name__)

HUB_DIR = Path(__file__).parent / "hub"
HUB_FILES = {
    "configuration_castling.py": HUB_DIR / "configuration_castling.py",
    "modeling_castling.py": HUB_DIR / "modeling_castling.py",
    "modeling_castling_timm.py": HUB_DIR / "modeling_castling_timm.py",
    "castling_layers.py": HUB_DIR / "castling_layers.py",
    "castling_checks.py": HUB_DIR / "castling_checks.py",
    "castling_functional.py": Path(__file__).parents[1] / "attention" / "functional.py",
}
# Keys of ``source`` that describe provenance (kept from a loaded model / the caller).
_PROVENANCE = ("builtin", "model", "base_model", "license", "teacher")
TRAINING_ONLY = ("gate", "threshold", "gamma_init", "aux")       # CastlingConfig fields the inference form does not use
_HF_BASE = {"vit": "ViTModel", "deit": "DeiTModel", "dinov2": "Dinov2Model",
            "dinov2_with_registers": "Dinov2WithRegistersModel"}


class OutputExistsError(FileExistsError):
    """The output directory exists and is not empty, and --overwrite was not given."""


class ExportError(ValueError):
    """The model cannot be written as a publishable directory; the message says why and what to do."""


class OutputBusyError(OutputExistsError):
    """Another process (a run or a save) is writing the same output directory: it holds the output's lock."""


_HELD_LOCKS: dict[str, object] = {}        # lock file -> the filelock.FileLock this process holds (re-entrant)


def _lock_file(path: Path) -> Path:
    path = Path(path).absolute()
    return path.with_name(f".{path.name}.lock")


def _write_pid(fd: int) -> None:
    """filelock's ``on_acquired``: the holder's PID in the lock file, for the message a second process gets."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


@contextlib.contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """Hold ``.NAME.lock`` next to the output ``path`` (``filelock.FileLock``, an OS lock; the file holds the PID)
    while a run or a save writes it. A second process gets an :class:`OutputBusyError` naming the holder's PID at
    once. Re-entrant in one process (the run holds it, its final save takes it again); the OS releases it if the
    holder is killed, so a lock file a killed run left behind is simply taken over, and the holder removes the file
    before releasing it (filelock notices a lock file unlinked under it and takes a new one). The parent folder is
    created if needed."""
    from filelock import FileLock, Timeout

    lock = _lock_file(path)
    held = _HELD_LOCKS.get(str(lock))
    if held is not None:
        with held:                              # FileLock counts nested acquisitions
            yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    _close_quietly(_open_lock(lock, path))      # a regular file with one name, never a link (checked, then locked)
    file_lock = FileLock(str(lock), timeout=0, on_acquired=_write_pid)
    try:
        file_lock.acquire()
    except Timeout:
        try:
            holder = lock.read_text(errors="replace").strip() or "?"
        except OSError:
            holder = "?"
        raise OutputBusyError(f"output {Path(path)} is being written by another castle-convert process (PID "
                              f"{holder}, lock {lock}): wait for it to finish, or choose another --output") from None
    _HELD_LOCKS[str(lock)] = file_lock
    try:
        yield
    finally:
        del _HELD_LOCKS[str(lock)]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)                     # while still holding it: a waiting process then takes a new file
        file_lock.release(force=True)


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _open_lock(lock: Path, path: Path) -> int:
    """The lock file's descriptor: a regular file with no other name, opened without following a link (the PID is
    written into it: through a link it overwrote the file the link points to)."""
    import errno
    import stat

    def refuse(what: str) -> OutputExistsError:
        return OutputExistsError(f"the output lock {lock} {what}: castle-convert never writes through it; remove "
                                 f"it (nothing of the output is in it), or choose another --output than {Path(path)}")
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(lock, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP or lock.is_symlink():
            raise refuse("is a symbolic link") from None
        raise refuse(f"cannot be opened ({e.strerror or type(e).__name__})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise refuse("is not a regular file" if not stat.S_ISREG(info.st_mode) else
                     f"is a hard link ({info.st_nlink} names of one file)")
    return fd


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse a non-empty output directory unless ``overwrite``, and with ``overwrite`` anything but a directory
    castle-convert wrote (:func:`written_by_castle_convert`): checked before any work."""
    path = Path(path)
    occupied = path.is_symlink() or (path.exists() and (not path.is_dir() or any(path.iterdir())))
    if occupied and not overwrite:
        raise OutputExistsError(f"output {path} exists and is not empty: choose another --output, or pass "
                                "--overwrite to replace it")
    if occupied and not written_by_castle_convert(path):
        what = ("a symbolic link" if path.is_symlink() else "a file" if not path.is_dir() else
                "a directory castle-convert did not write (no config.json with its castling/source fields)")
        raise OutputExistsError(f"output {path} is {what}: --overwrite replaces only a castle-convert output "
                                "directory, never other files; choose another --output (e.g. a new folder inside it)")
    check_writable(path)


def check_writable(path: Path) -> None:
    """An :class:`ExportError` when the output ``path`` cannot be created (see :func:`write_problem`)."""
    problem = write_problem(path)
    if problem:
        raise ExportError(f"cannot write output {path}: {problem}: choose another --output")


def written_by_castle_convert(path: Path) -> bool:
    """Whether ``path`` is an output directory of castle-convert (save_pretrained / the CLI): a real directory whose
    config.json is a JSON object with the ``castling`` and ``source`` sections it writes."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir() or not (path / CONFIG_NAME).is_file():
        return False
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("castling"), dict) and isinstance(config.get("source"),
                                                                                                dict)


def write_problem(path: Path) -> Optional[str]:
    """Why ``path`` cannot be created (its nearest existing ancestor is a file or not writable), or None."""
    ancestor = Path(path).absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable"
    return None


def report_versions() -> dict[str, Any]:
    import platform

    import accelerate
    import timm
    import transformers

    from castle_convert import __version__
    return {"castle_convert": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version()}


# -- pieces --------------------------------------------------------------------------------------

def _check_model(model: nn.Module) -> None:
    from castle_convert.convert import castling_modules
    peft = [n or type(model).__name__ for n, m in model.named_modules() if type(m).__module__.startswith("peft.")]
    if peft:
        raise ExportError(f"the model has un-merged PEFT/LoRA layers (e.g. '{peft[0]}'): call "
                          "model = model.merge_and_unload() first, then cc.save_pretrained(model, DIR)")
    mods = list(castling_modules(model))
    if not mods:
        raise ExportError(f"{type(model).__name__} has no castling attention: convert() and finalize() it first")
    if any(getattr(m, "is_training_form", False) for _, m in mods):
        raise ExportError("save_pretrained takes a finalized model (inference form): call "
                          "castle_convert.finalize() first")
    if getattr(model, "castling_config", None) is None:
        raise ExportError("the model has no castling_config: it was not made by castle_convert.convert()")


def _headless(model: nn.Module) -> bool:
    if is_timm(model):
        return int(getattr(model, "num_classes", 0) or 0) == 0
    return "ForImageClassification" not in type(model).__name__


def _labels(model: nn.Module, labels: Optional[list[str]]) -> Optional[list[str]]:
    if labels is not None:
        n = int(getattr(model, "num_classes", 0) or 0) if is_timm(model) else \
            int(getattr(getattr(model, "config", None), "num_labels", 0) or 0)
        if _headless(model) or len(labels) != n:
            raise ExportError(f"labels has {len(labels)} names but the model's head has "
                              f"{0 if _headless(model) else n} classes: pass one name per class (or none)")
        return [str(x) for x in labels]
    if is_timm(model):
        names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
        if names and len(names) == getattr(model, "num_classes", 0):
            return list(names)
        try:                       # ImageNet heads: timm knows the class descriptions
            from timm.data import ImageNetInfo, infer_imagenet_subset
            subset = infer_imagenet_subset(model)
            names = ImageNetInfo(subset).label_descriptions() if subset else None
        except Exception:  # noqa: BLE001 - labels are a nicety
            names = None
        return list(names) if names and len(names) == getattr(model, "num_classes", 0) else None
    id2label = getattr(model.config, "id2label", None) or {}
    names = [id2label.get(i, id2label.get(str(i))) for i in range(len(id2label))]
    if names and not all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return names
    return None


def _hub_classes(model: nn.Module, source: dict, headless: bool) -> tuple[str, dict]:
    """(architectures[0], auto_map) for config.json; raises RemoteCodeUnsupported."""
    from castle_convert.export.hub.modeling_castling import HF_CLASSES, HF_HEADS
    cfg = "configuration_castling.CastlingViTConfig"
    if source["library"] == "timm":
        # Eva, NaFlexVit: built with timm on the loading side
        family = "Eva" if is_timm_eva(model) else "NaFlexVit" if is_timm_naflex(model) else "ViT"
        # a backbone too: AutoModelForImageClassification(..., num_labels=N) puts a new head on it
        auto = {"AutoConfig": cfg, "AutoModel": f"modeling_castling_timm.CastlingTimm{family}Model",
                "AutoModelForImageClassification": f"modeling_castling_timm.CastlingTimm{family}ForImageClassification"}
        return f"CastlingTimm{family}{'Model' if headless else 'ForImageClassification'}", auto
    name = type(model).__name__
    if name not in HF_CLASSES:
        raise RemoteCodeUnsupported(f"transformers {name} is not one of the classes modeling_castling.py "
                                    f"wraps ({', '.join(HF_CLASSES)})")
    auto = {"AutoConfig": cfg}
    if headless:
        auto["AutoModel"] = f"modeling_castling.Castling{name}"
        if name in HF_HEADS:                 # AutoModelForImageClassification(..., num_labels=N): a new head
            auto["AutoModelForImageClassification"] = f"modeling_castling.Castling{HF_HEADS[name]}"
    else:
        auto["AutoModelForImageClassification"] = f"modeling_castling.Castling{name}"
        base = _HF_BASE.get(source.get("model_type"))
        if base in HF_CLASSES:
            auto["AutoModel"] = f"modeling_castling.Castling{base}"
    return f"Castling{name}", auto


def build_config(model: nn.Module, *, source: dict, labels: Optional[list[str]], remote_code: bool,
                 dtype: torch.dtype) -> dict:
    """The config.json of ``model``."""
    from castle_convert import __version__

    headless = _headless(model)
    config: dict[str, Any] = {}
    if source["library"] == "transformers":        # the base config's fields, for the transformers classes
        config.update({k: v for k, v in source["config"].items() if k not in (
            "model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype",
            "torch_dtype")})
    # the inference form's settings only: gate / threshold / gamma_init describe training (the loader's
    # CastlingConfig fills their defaults; older directories that have them still load)
    castling = {k: v for k, v in model.castling_config.to_dict().items() if k not in TRAINING_ONLY}
    # transformers sources: the base config's fields are the top level, not repeated under source.config
    src = {k: v for k, v in source.items() if k != "config"} if source["library"] == "transformers" else source
    config.update(model_type="castling_vit", format_version=FORMAT_VERSION, castle_convert_version=__version__,
                  castling=castling, converted_modules=list(getattr(model, "castling_converted", None) or []),
                  source=src, castle_headless=headless, dtype=str(dtype).replace("torch.", ""))
    if remote_code:
        arch, auto_map = _hub_classes(model, source, headless)
        config.update(architectures=[arch], auto_map=auto_map)
        if source["library"] == "timm" and is_timm_eva(model):
            config["timm_eva"] = timm_eva_spec(model)
        elif source["library"] == "timm" and is_timm_naflex(model):
            config["timm_naflex"] = timm_naflex_spec(model)
        elif source["library"] == "timm":
            config["timm_vit"] = timm_vit_spec(model)
    if source["library"] == "timm":
        # timm-style fields for timm.create_model("local-dir:DIR" / "hf-hub:ID"), in timm's flat layout:
        # a "pretrained_cfg" key would make transformers read the directory as a timm checkpoint.
        n = int(getattr(model, "num_classes", 0) or 0)        # 0: headless / features_only
        config.update({k: v for k, v in source.get("pretrained_cfg", {}).items() if k not in ("num_classes",)})
        config.update(architecture=f"castle_{source['architecture']}", num_classes=n,
                      num_features=int(getattr(model, "num_features", 0) or 0))
        if n > 0:
            names = labels or [f"LABEL_{i}" for i in range(n)]
            if labels:
                config["label_names"] = list(labels)
            config.update(id2label={str(i): names[i] for i in range(n)}, label2id={v: i for i, v in enumerate(names)})
    else:
        if labels and not headless:
            config.update(id2label={str(i): v for i, v in enumerate(labels)},
                          label2id={v: i for i, v in enumerate(labels)})
    return config


def timm_architecture_field(config: dict) -> Optional[str]:
    """config.json ``architecture`` of a transformers-source directory (timm's ``local-dir:`` / ``hf-hub:`` read it):
    ``castle_<arch>`` of the equivalent timm ViT, else ``castle_transformers``, whose entry point names the routes
    that load the directory. None for timm sources (they have their own)."""
    if config["source"].get("library") != "transformers":
        return None
    from castle_convert.export.timm_equivalent import plan
    from castle_convert.export.source import PREFIX, TRANSFORMERS_ENTRY
    eq = plan(config)
    return TRANSFORMERS_ENTRY if isinstance(eq, str) else PREFIX + eq.architecture


def _metadata(config: dict, recipe_yaml: Optional[str]) -> dict[str, str]:
    from castle_convert import __version__
    meta = {"format": "pt", "castle_convert_version": __version__, "format_version": str(FORMAT_VERSION),
            METADATA_KEY: json.dumps({k: config[k] for k in (
                "format_version", "castling", "converted_modules", "source")}, default=str)}
    if recipe_yaml:
        meta["recipe"] = recipe_yaml
    return meta


# -- verification --------------------------------------------------------------------------------

def _output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from castle_convert import adapters
    from castle_convert.convert import primary_output
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = adapters.forward(model, x)
            if isinstance(out, list) and out and all(isinstance(t, torch.Tensor) for t in out):
                return torch.cat([t.flatten(1).float() for t in out], 1)    # features_only: every feature map
            return primary_output(out).float()
    finally:
        model.train(was)


# config.json sections of timm sources' remote code (the self-contained ViT; the timm-built Eva and NaFlexVit)
TIMM_SPECS = ("timm_vit", "timm_eva", "timm_naflex")


def hub_model(config: dict, state: Optional[dict] = None) -> nn.Module:
    """The transformers remote-code model of a config.json (the package's copy of the hub files)."""
    from castle_convert.export.hub import configuration_castling, modeling_castling
    cfg = configuration_castling.CastlingViTConfig.from_dict(copy.deepcopy(config))
    cls = getattr(modeling_castling, config["architectures"][0])
    model = cls(cfg).eval()
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model


def _hub_output(hub: nn.Module, x: torch.Tensor, headless_timm: bool) -> torch.Tensor:
    with torch.no_grad():
        if any(getattr(hub.config, k, None) for k in TIMM_SPECS):
            out = hub(pixel_values=x)
            return (out.pooler_output if headless_timm else out.logits).float()
        from castle_convert.adapters import hf_siglip2
        from castle_convert.convert import primary_output
        naflex = hf_siglip2.tower(hub)                 # SigLIP2: patches + padding mask + grids, not images
        if naflex is not None:
            return primary_output(hub(*hf_siglip2.patchify(x, hf_siglip2.patch_size(naflex[1])[0]))).float()
        return primary_output(hub(pixel_values=x, interpolate_pos_encoding=False)).float()


def naflex_batch(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A padded NaFlex batch (timm's collator layout) of two of ``x``'s images (B, C, H, W), the second cropped to a
    smaller grid: what a timm naflexvit source is verified with besides images."""
    import torch.nn.functional as F
    from timm.data.naflex_transforms import patchify_image
    ph, pw = model.embeds.patch_size
    rows, cols = x.shape[-2] // ph, x.shape[-1] // pw
    crops = [x[0, :, :rows * ph, :cols * pw], x[1, :, :max(1, rows - 1) * ph, :max(1, cols - 2) * pw]]
    parts = [patchify_image(img.float().cpu(), (ph, pw)) for img in crops]   # (N, P·P·C), (N, 2), (N,) each
    n = max(part[0].shape[0] for part in parts)
    batch = {}
    for i, key in enumerate(("patches", "patch_coord", "patch_valid")):
        batch[key] = torch.stack([F.pad(part[i], (0, 0, 0, n - part[i].shape[0]) if part[i].dim() == 2
                                        else (0, n - part[i].shape[0])) for part in parts])   # (2, n, ...)
    return batch


def _naflex_output(model: nn.Module, batch: dict[str, torch.Tensor], hub_headless: Optional[bool] = None) -> torch.Tensor:
    """A timm naflexvit's (hub_headless None) or its remote-code model's output for a NaFlex batch, float32 on CPU."""
    p = next(model.parameters())
    batch = {k: v.to(p.device, p.dtype if k == "patches" else v.dtype) for k, v in batch.items()}
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(batch)
    finally:
        model.train(was)
    if hub_headless is not None:
        out = out.pooler_output if hub_headless else out.logits
    return out.float().cpu()


def verify_directory(model: nn.Module, path: Path, config: dict, *, remote_code: bool,
                     atol: Optional[float] = None) -> dict[str, float]:
    """Load ``path`` back (castle_convert route, and the remote-code model) and compare with ``model``."""
    from castle_convert import adapters
    from castle_convert.export.load import load, read_safetensors

    p = next(model.parameters())
    tol = atol if atol is not None else (1e-5 if p.dtype == torch.float32 else 2e-2)
    x = adapters.example_inputs(model, batch=2, generator=torch.Generator().manual_seed(0)).float()
    ref = _output(model, x.to(p.device, p.dtype)).cpu()
    diffs = {}
    loaded = load(path)
    diffs["castle_convert.load"] = (_output(loaded, x.to(next(loaded.parameters()).dtype)).cpu() - ref).abs().max().item()
    if remote_code:
        state, _ = read_safetensors(path / WEIGHTS_NAME)
        hub = hub_model(config, state).to(next(iter(state.values())).dtype)
        headless_timm = any(config.get(k) for k in TIMM_SPECS) and bool(config.get("castle_headless"))
        diffs["transformers remote code"] = (_hub_output(hub, x.to(next(hub.parameters()).dtype), headless_timm).cpu()
                                             - ref).abs().max().item()
    if is_timm_naflex(model):                      # a padded NaFlex batch through every route too
        batch = naflex_batch(model, x)
        ref = _naflex_output(model, batch)
        diffs["castle_convert.load, NaFlex batch"] = (_naflex_output(loaded, batch) - ref).abs().max().item()
        if remote_code:
            diffs["transformers remote code, NaFlex batch"] = (
                _naflex_output(hub, batch, bool(config.get("castle_headless"))) - ref).abs().max().item()
    bad = {k: v for k, v in diffs.items() if not v <= tol}
    if bad:
        raise ExportError("the written directory does not reproduce the model: " + ", ".join(
            f"{k} max |Δ| = {v:.3g}" for k, v in bad.items()) + f" (tolerance {tol:g}). Nothing was written.")
    return diffs


# -- save_pretrained -----------------------------------------------------------------------------

def check_image_size(model: nn.Module, size: int) -> None:
    """An :class:`ExportError` when ``model`` cannot take ``size``×``size`` images the way its loaders call it
    (``model(pixel_values)`` for transformers: ``pipeline()`` and ``AutoModel`` pass nothing else; a timm model as
    built): publishing a processor at that size would give every user a failing first call."""
    from castle_convert import adapters
    off = adapters.off_patch_grid(model, size)
    if off:
        raise ExportError(f"image_size={size} is not a multiple of the model's patch size ({off[0]} px): use e.g. "
                          f"{off[1]}")
    x = adapters.example_inputs(model, batch=1, img_size=(size, size))
    p = next(model.parameters())
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            from castle_convert.adapters import hf_siglip2
            if getattr(model, "config", None) is not None and not hasattr(model, "pretrained_cfg") \
                    and hf_siglip2.tower(model) is None:
                model(pixel_values=x.to(p.device, p.dtype))
            else:
                adapters.forward(model, x.to(p.device, p.dtype) if isinstance(x, torch.Tensor) else x)
    except Exception as e:  # noqa: BLE001 - each family words its size check differently
        native = adapters.adapter_for(model).input_size(model) if adapters.adapter_for(model) else ("?", "?", "?")
        raise ExportError(f"image_size={size}: {type(model).__name__} does not take {size}x{size} images as its "
                          f"loaders call it ({type(e).__name__}); publish at its own {native[1]}x{native[2]} "
                          "(image_size=None) and resize at call time where the model interpolates (transformers: "
                          "interpolate_pos_encoding=True)") from None
    finally:
        model.train(was)


def save_pretrained(model: nn.Module, path: Union[str, Path], *, recipe: Any = None, report: Optional[dict] = None,
                    overwrite: bool = False, labels: Optional[list[str]] = None, base_model: Optional[str] = None,
                    source: Optional[dict] = None, remote_code: Optional[bool] = None, verify: bool = True,
                    repo_id: Optional[str] = None, extra_files: Optional[dict[str, Path]] = None,
                    resolution: Optional[int] = None, image_size: Optional[int] = None) -> Path:
    """Write a finalized castling model to ``path`` as a publishable directory (atomically).

    Args:
        recipe: the resolved recipe (a ``Recipe`` or its YAML text): ``recipe.yaml`` + metadata.
        report: accuracy / MACs / params / latency (``report.json``, rendered in the model card).
        labels: class names (``id2label``); default: the model's own (HF config / timm label_names).
        base_model: Hub id of the model this was converted from (model card); default (None):
            timm's ``hf_hub_id`` when the architecture was not reshaped / the HF config's
            ``name_or_path`` when it is a Hub id; ``""``: none.
        source: extra provenance recorded in ``config.json`` ``source`` (e.g. ``{"builtin": ...}``).
        remote_code: write the transformers remote-code files (``True``: an architecture they do not
            implement is an error; ``False`` writes a directory for castle_convert.load / timm only).
            Default (None): written when the remote code implements the architecture (not for timm
            ``features_only`` models), else left out with a warning saying why.
        verify: load the directory back (castle_convert and remote code) and compare outputs
            with ``model`` before it appears (max |Δ| ≤ 1e-5 in fp32).
        repo_id: Hub repo id used in the model card's usage snippets.
        resolution: the square input size (px) the model was distilled at, when not the architecture's own:
            ``config.json`` records it as ``distilled_resolution`` and the model card says so. The published
            preprocessing does not change with it: the model is deployed at ``image_size``.
        image_size: the square input size (px) the published preprocessing produces (``preprocessor_config.json``,
            timm's ``input_size``, the timm route's equivalent of a transformers source); default: the source's own
            (its processor's, or timm's data config). A size the model cannot take as ``pipeline()`` calls it
            (transformers ViT / DeiT / CLIP / SigLIP interpolate only with ``interpolate_pos_encoding=True``) is an
            ``ExportError``.
    """
    path = Path(path)
    check_output_dir(path, overwrite)
    _check_model(model)
    config, remote_code, recipe_yaml, processor = _prepare(model, path, recipe=recipe, labels=labels,
                                                           base_model=base_model, source=source,
                                                           remote_code=remote_code, resolution=resolution,
                                                           image_size=image_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e} ({e.filename or path.parent}): choose an "
                          "--output in a writable directory") from None
    with output_lock(path):
        check_output_dir(path, overwrite)               # again, under the lock: another save may have finished
        _write_directory(model, path, config=config, recipe_yaml=recipe_yaml, processor=processor,
                         remote_code=remote_code, report=report, repo_id=repo_id, extra_files=extra_files,
                         verify=verify)
    return path


def _prepare(model: nn.Module, path: Path, *, recipe: Any, labels: Optional[list[str]], base_model: Optional[str],
             source: Optional[dict], remote_code: Optional[bool], resolution: Optional[int],
             image_size: Optional[int] = None, warn: bool = True) -> tuple[dict, bool, Optional[str], Any]:
    """``(config.json, remote_code, recipe YAML, preprocessor config)`` of ``model``: everything
    :func:`save_pretrained` decides before it writes (an :class:`ExportError` names what does not fit)."""
    from castle_convert.export.processor import image_processor, output_size, processor_dict
    from castle_convert.export.source import features_net

    auto_remote = remote_code is None
    if auto_remote:
        remote_code = features_net(model) is None
    recipe_yaml = recipe if (recipe is None or isinstance(recipe, str)) else recipe.to_yaml()
    src = describe_source(model)
    src.update({k: v for k, v in (getattr(model, "castle_source", None) or {}).items()
                if k in _PROVENANCE and k not in src})
    src.update(source or {})
    for name, value in (("resolution", resolution), ("image_size", image_size)):
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ExportError(f"{name}={value!r}: use a positive input size in pixels")
    if image_size:
        check_image_size(model, image_size)
        if src.get("library") == "timm":
            channels = (src.get("pretrained_cfg") or {}).get("input_size", (3,))[0]
            src["pretrained_cfg"] = {**(src.get("pretrained_cfg") or {}), "input_size": [channels, image_size, image_size]}
    if base_model:
        src["base_model"] = base_model
    elif base_model == "":                      # explicitly none (e.g. the weights are not the Hub model's)
        src.pop("base_model", None)
    first = next(model.parameters())
    try:
        try:
            config = build_config(model, source=src, labels=_labels(model, labels), remote_code=remote_code,
                                  dtype=first.dtype)
        except RemoteCodeUnsupported as e:
            if not (auto_remote and remote_code):
                raise
            if warn:
                warnings.warn(f"{path}: no transformers remote code for this architecture ({e}); castle_convert.load "
                              "and timm load the directory", stacklevel=3)
            remote_code = False
            config = build_config(model, source=src, labels=_labels(model, labels), remote_code=False,
                                  dtype=first.dtype)
    except RemoteCodeUnsupported as e:
        raise ExportError(f"this architecture cannot be exported as remote code: {e}. Pass remote_code=False "
                          "to write the directory without the transformers files (castle_convert.load and, "
                          "for timm, timm.create_model('castle_<arch>') still load it).") from e
    if resolution:
        config["distilled_resolution"] = resolution
    processor = image_processor(model, image_size)
    deployed = output_size(processor_dict(processor))
    if deployed and deployed[0] == deployed[1]:
        config["deploy_resolution"] = deployed[0]         # what the processor produces: the timm equivalent's size
    architecture = timm_architecture_field(config)        # transformers sources: timm's local-dir:/hf-hub: entry
    if architecture:
        config["architecture"] = architecture
    return config, remote_code, recipe_yaml, processor


def check_savable(model: nn.Module, path: Path, *, labels: Optional[list[str]] = None, source: Optional[dict] = None,
                  resolution: Optional[int] = None, image_size: Optional[int] = None) -> None:
    """What :func:`save_pretrained` will decide about ``model`` (converted, training form or finalized) — its
    source description, class names, config.json, image processor — decided now: the main job calls it before
    training, so a problem the end would meet is a one-line :class:`ExportError` before any work, not after it.
    The remote-code decision is left to the end (it only warns)."""
    from castle_convert.convert import castling_modules
    if not list(castling_modules(model)):
        raise ExportError(f"{type(model).__name__} has no castling attention: convert() it first")
    _prepare(model, Path(path), recipe=None, labels=labels, base_model=None, source=source, remote_code=False,
             resolution=resolution, image_size=image_size, warn=False)


def _write_directory(model: nn.Module, path: Path, *, config: dict, recipe_yaml: Optional[str],
                     processor: Any, remote_code: bool, report: Optional[dict], repo_id: Optional[str],
                     extra_files: Optional[dict[str, Path]], verify: bool) -> None:
    """Write the directory into a temp folder next to ``path``, verify it, swap it in (the caller holds the lock).
    An OSError (disk full, ...) is an :class:`ExportError` naming it; nothing is left behind."""
    from castle_convert.export.card import render_card
    from castle_convert.export.processor import processor_dict
    from safetensors.torch import save_file

    try:
        _remove_stale(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e} ({e.filename or path.parent}): choose an "
                          "--output in a writable directory") from None
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata=_metadata(config, recipe_yaml))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str) + "\n")
        if isinstance(processor, dict):          # a processor class this transformers lacks: its config as it is
            (tmp / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
        elif processor is not None:              # transformers writes what AutoImageProcessor reads
            processor.save_pretrained(tmp)
        if remote_code:
            for name, src_file in HUB_FILES.items():
                shutil.copyfile(src_file, tmp / name)
        if recipe_yaml:
            (tmp / "recipe.yaml").write_text(recipe_yaml)
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        for name, extra in (extra_files or {}).items():
            if Path(extra).is_dir():
                shutil.copytree(extra, tmp / name, symlinks=True)      # a link is copied as a link, never followed
            elif Path(extra).exists():
                shutil.copy2(extra, tmp / name)
        from castle_convert.export.card import PICTURES
        (tmp / "README.md").write_text(render_card(config, report, recipe_yaml, repo_id=repo_id,
                                                   processor=processor_dict(processor),
                                                   pictures=tuple(n for n in PICTURES if (tmp / n).is_file())))
        _publish_permissions(tmp)
        if verify:
            diffs = verify_directory(model, tmp, config, remote_code=remote_code)
            logger.info("save_pretrained %s: loaded back, max |Δ| %s", path, diffs)
            model.castle_export_check = diffs
        kept: list[str] = []
        if path.is_dir() and not path.is_symlink():     # an output castle-convert wrote (checked): keep the rest
            kept = _carry_other_files(path, tmp, own=set(OWN_NAMES) | set(extra_files or {}))
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.old")
            _remove(old)
            path.rename(old)
            tmp.rename(path)
            _remove(old)
        else:
            tmp.rename(path)
        if kept:
            warnings.warn(f"{path}: replaced castle-convert's files and kept the {len(kept)} it did not write: "
                          f"{', '.join(kept[:5])}{', ...' if len(kept) > 5 else ''}", stacklevel=3)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):              # e.g. ENOSPC: one line, nothing half-written
            raise ExportError(f"cannot write {path}: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}: "
                              "nothing was written; free space (or choose another output) and save again") from None
        raise


# What castle-convert writes into an output directory: ``--overwrite`` replaces these and keeps everything else.
OWN_NAMES = (WEIGHTS_NAME, CONFIG_NAME, "preprocessor_config.json", "README.md", "recipe.yaml", "report.json", "logs",
             *HUB_FILES)


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (no copy, the original untouched until the swap), else a copy of a regular file."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        if Path(src).is_file():
            shutil.copy2(src, dst)


def _carry_other_files(old: Path, new: Path, own: set[str]) -> list[str]:
    """Put every entry of the previous output ``old`` that castle-convert did not write (not in ``own``) into the new
    output ``new`` as it is (links as links); returns their names. The previous output stays intact until the swap."""
    kept = []
    for entry in sorted(old.iterdir(), key=lambda p: p.name):
        dst = new / entry.name
        if entry.name in own or dst.exists() or dst.is_symlink():
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), dst)
        elif entry.is_dir():
            shutil.copytree(entry, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(dst))
        kept.append(entry.name)
    return kept


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink(missing_ok=True)


def _remove_stale(path: Path) -> None:
    """What an earlier save of ``path`` left when it was killed: ``.NAME.old`` and ``.NAME.tmp-PID-*``
    folders whose process is gone (a save running now in another process is left alone)."""
    _remove(path.with_name(f".{path.name}.old"))
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name[len(f".{path.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        _remove(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _publish_permissions(root: Path) -> None:
    """mkdtemp makes a private (0700) directory: give the result the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def write_output_dir(path: Path, model: nn.Module, *, source: Optional[dict] = None, recipe_yaml: Optional[str] = None,
                     report: Optional[dict] = None, extra_files: Optional[dict[str, Path]] = None,
                     overwrite: bool = False, **kwargs: Any) -> Path:
    """The CLI's output directory: :func:`save_pretrained` (kept for callers of the old name)."""
    return save_pretrained(model, path, recipe=recipe_yaml, report=report, source=source, extra_files=extra_files,
                           overwrite=overwrite, **kwargs)
