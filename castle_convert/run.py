"""The main job: teacher → convert → distil (anneal) → finalize → output directory → table.

``castle-convert deit_small --recipe distill-30ep --data DIR --output runs/x`` calls :func:`run`.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from castle_convert.api import convert
from castle_convert.convert import inspect
from castle_convert.data import DataError, build_data
from castle_convert.distill.checkpoint import check_resume, resumable
from castle_convert.distill.evaluate import head_classes
from castle_convert.distill.loop import DistillResult, ResumeError, distill, process_state
from castle_convert.export.save import (ExportError, check_output_dir, check_savable, check_writable, output_lock,
                                         report_versions, save_pretrained)
from castle_convert.models import load_model, teacher_record
from castle_convert.recipes import Recipe


@dataclass
class RunResult:
    output: Optional[Path]
    report: dict
    distill: DistillResult


def default_output(model_spec: str, recipe: Recipe) -> Path:
    return Path("runs") / f"{Path(model_spec).name.replace('.', '_')}-{recipe.name}"


def public_name(spec: Optional[str]) -> Optional[str]:
    """What a published file may say about a model / data / stage-1 spec: a local path becomes its last component
    (``/home/me/data/imagenet`` → ``imagenet``); names (timm, built-in, ``natural``, ``hf:NAME``) stay as they are."""
    if not spec or str(spec).startswith("hf:"):
        return spec
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_absolute() or "/" in text or "\\" in text or text.startswith("~") or path.exists():
        return path.name or text
    return text


def public_recipe(recipe: Recipe) -> str:
    """The resolved recipe as published (recipe.yaml, the weights' metadata, the model card): local paths in it
    (``model``, ``data.name``, ``transfer.load_from``) cut to their last component."""
    import yaml
    data = recipe.to_dict()
    data["model"] = public_name(data.get("model"))
    data["data"]["name"] = public_name(data["data"].get("name"))
    data["transfer"]["load_from"] = public_name(data["transfer"].get("load_from")) or ""
    return yaml.safe_dump(data, sort_keys=False)


def _source(model_spec: str, arch: Optional[str], teacher: Optional[dict] = None) -> dict:
    """Provenance recorded next to what save_pretrained derives from the model itself; ``teacher``: the
    :func:`castle_convert.models.teacher_record` that ``castle-convert eval`` identifies the teacher by."""
    from castle_convert import zoo
    extra = {"teacher": teacher} if teacher else {}
    if model_spec in zoo.BUILTINS:
        return {"builtin": model_spec, "model": model_spec, **extra}
    name = public_name(model_spec)                              # no local paths in the card
    return {"model": name if not arch else f"{name} (--arch {arch})", **extra}


def _calibration_batch(dataset, n: int = 32) -> torch.Tensor:
    """The first ``n`` training images (the same on every process)."""
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])


def run(model_spec: Optional[str], recipe: Recipe, *, data_spec: Optional[str] = None,
        output: Optional[Path] = None, arch: Optional[str] = None, resume: bool = False,
        overwrite: bool = False, progress: bool = True, on_step=None, image_size: Optional[int] = None) -> RunResult:
    """The main job. ``image_size``: the square size the published preprocessing produces (default: the teacher's
    own, whatever ``data.resolution`` the model is distilled at)."""
    model_spec = model_spec or recipe.model
    if not model_spec:
        raise DataError(f"no MODEL given and recipe '{recipe.name}' names none: e.g. castle-convert deit_small")
    data_spec = data_spec or recipe.data.name
    if not data_spec:
        raise DataError(f"no --data given and recipe '{recipe.name}' names no dataset: pass --data DIR "
                        "(train/ and val/ image folders), --data hf:NAME or --data fashion-mnist")
    output = Path(output) if output else default_output(model_spec, recipe)
    if not output.name or output.name in (".", ".."):
        raise ExportError(f"--output {str(output)!r} names no new directory: give one, e.g. --output runs/my-model")
    check_writable(output)
    state = process_state()
    # One run (or save) at a time per output: a second one is told which process holds it, before any work.
    with output_lock(output) if state.is_main_process else contextlib.nullcontext():
        return _run(model_spec, recipe, data_spec=data_spec, output=output, arch=arch, resume=resume,
                    overwrite=overwrite, progress=progress, on_step=on_step, state=state, image_size=image_size)


def _run(model_spec: str, recipe: Recipe, *, data_spec: str, output: Path, arch: Optional[str], resume: bool,
         overwrite: bool, progress: bool, on_step, state, image_size: Optional[int] = None) -> RunResult:
    work_dir = output.with_name(output.name + ".run")
    if not resume:
        check_output_dir(output, overwrite)                     # before any work
        if resumable(work_dir):                                 # a checkpoint, a finished or started stage 1
            if not overwrite:
                raise ResumeError(f"an interrupted run left a checkpoint in {work_dir}: pass --resume to "
                                  "continue it, or --overwrite to start over")
            if state.is_main_process:
                shutil.rmtree(work_dir)
        state.wait_for_everyone()
    else:
        check_resume(work_dir, recipe.to_dict())               # the run's recipe, before any work
    t0 = time.time()
    with state.main_process_first():                            # a built-in teacher trains once
        _check_convertible(model_spec, arch, recipe)
        teacher = load_model(model_spec, arch=arch, pretrained=True)
    teacher.eval()
    source = _source(model_spec, arch, teacher_record(model_spec, arch, teacher))
    d = recipe.data
    _check_resolution(teacher, d.resolution, recipe)
    if image_size:                                              # the published size, before any training
        from castle_convert.export.save import check_image_size
        check_image_size(teacher, image_size)
    data = build_data(data_spec, teacher, resolution=d.resolution, augmentation=d.augmentation,
                      max_train_samples=d.max_train_samples, max_eval_samples=d.max_eval_samples,
                      seed=recipe.seed)
    keep, _ = recipe.castling.keep_softmax_spec()
    student = convert(teacher, recipe.castling.to_config(), calibration_inputs=_calibration_batch(data.train),
                      keep_softmax=keep)
    # what the end needs, checked now: no trained model is lost to a check that could have run first
    labels = data.classes if head_classes(teacher) and data.classes else None   # unlabelled data: the model's own
    check_savable(student, output, labels=labels, source=source,
                  resolution=int(d.resolution) if d.resolution else None, image_size=image_size)
    result = distill(teacher, student, data, recipe, work_dir=work_dir, resume=resume, progress=progress,
                     on_step=on_step)
    size = data.val[0][0].shape[-2:]
    kept = set(result.kept_softmax)
    costs = inspect(teacher, recipe.castling.to_config(), img_size=tuple(size),
                    filter_fn=(lambda m, fqn: fqn not in kept) if kept else None)
    stage1 = dict(result.transfer) if result.transfer else result.transfer
    if stage1 and stage1.get("loaded_from"):
        stage1["loaded_from"] = public_name(stage1["loaded_from"])
    report = {                                                  # published (push uploads it): no local paths
        "model": public_name(model_spec),
        "dataset": public_name(data_spec),
        "recipe": recipe.name,
        "teacher": result.teacher_eval,
        "student_start": result.student_start_eval,
        "student_train_form_g0": result.student_train_form_eval,
        "student": result.student_final_eval,
        "params": {"teacher": costs.params_before, "student": costs.params_after},
        "macs": {"teacher": costs.macs_before, "student": costs.macs_after, "input_size": list(costs.input_size),
                 "tokens": costs.tokens},
        "steps": result.steps,
        "epochs": result.epochs,
        "keep_softmax": result.kept_softmax,
        "stage1": stage1,
        "stage1_time_s": (result.transfer or {}).get("wall_time_s", 0.0),
        "train_time_s": result.wall_time_s,
        "total_time_s": time.time() - t0,
        "train_images_per_s": result.images_per_s,
        "processes": state.num_processes,
        "versions": report_versions(),
    }
    if state.is_main_process:
        report["latency"] = _latency(teacher, result.student, int(size[0]))
        report["fidelity"] = _fidelity(teacher, result.student, recipe, data_spec, progress)
        pictures = _pictures(report, work_dir / "pictures", model_spec)
        try:
            save_pretrained(result.student, output, recipe=public_recipe(recipe), report=report,
                            source=source, labels=labels,
                            extra_files={"logs": work_dir / "tensorboard", **pictures}, overwrite=overwrite or resume,
                            resolution=int(size[0]) if d.resolution else None, image_size=image_size)
        except ExportError as e:                # e.g. disk full: the run's checkpoints stay for --resume
            kept = f"; the run's last checkpoint is kept in {work_dir}: continue with --resume" \
                if resumable(work_dir) else ""
            raise ExportError(f"{e}{kept}") from None
        shutil.rmtree(work_dir, ignore_errors=True)            # checkpoints are done with
    state.wait_for_everyone()
    return RunResult(output=output, report=report, distill=result)


def _check_convertible(model_spec: str, arch: Optional[str], recipe: Recipe) -> None:
    """The architecture alone (no weights read or downloaded): a model with nothing to convert, or a
    recipe that does not fit it, is named before its weights are looked for."""
    from castle_convert import zoo
    from castle_convert.convert import ConversionError
    if model_spec in zoo.BUILTINS:
        return
    keep, _ = recipe.castling.keep_softmax_spec()
    report = inspect(load_model(model_spec, arch=arch, pretrained=False), recipe.castling.to_config(),
                     keep_softmax=keep)
    if report.error:
        raise ConversionError(f"cannot convert {model_spec}: {report.error}")


def _check_resolution(teacher: nn.Module, resolution: Optional[int], recipe: Recipe) -> None:
    """The recipe's ``data.resolution`` must be one the teacher accepts (a fixed-size timm / transformers
    ViT takes only its own): one probe forward, a one-line error before any work."""
    if resolution is None:
        return
    from castle_convert import adapters, fidelity
    off = adapters.off_patch_grid(teacher, resolution)
    if off:
        raise DataError(f"recipe '{recipe.name}': data.resolution={resolution} px is not a multiple of the model's "
                        f"patch size ({off[0]} px), so the border pixels would be dropped: use e.g. --set "
                        f"data.resolution={off[1]}")
    device = str(next(teacher.parameters()).device)
    try:                                 # one image must fit before the probe below makes one
        fidelity.check_memory(teacher, teacher, [resolution], device, name="data.resolution",
                              fix="use at most --set data.resolution={px}")
    except fidelity.FidelityError as e:
        raise DataError(f"recipe '{recipe.name}': {e}") from None
    x = adapters.example_inputs(teacher, batch=1, img_size=(resolution, resolution))
    try:
        with torch.no_grad():
            teacher(x)
    except Exception as e:  # noqa: BLE001 - each family words its size check differently
        _, h, w = adapters.adapter_for(teacher).input_size(teacher) if adapters.adapter_for(teacher) else (3, "?", "?")
        raise DataError(f"recipe '{recipe.name}' distils at data.resolution={resolution} px but this model takes only "
                        f"{h}x{w} inputs ({type(e).__name__}): add --set data.resolution=null to use its own size, "
                        "or build it for any size (timm: dynamic_img_size=True)") from None


def _fidelity(teacher: nn.Module, student: nn.Module, recipe: Recipe, data_spec: str, progress: bool) -> Optional[dict]:
    """The fidelity block (castle_convert/fidelity.py) at the recipe's resolutions, on held-out natural photos or
    the run's validation split; a failure here is reported, not fatal to the run (the model is trained)."""
    from castle_convert import fidelity
    f = recipe.fidelity
    if f.data == "none":
        return None
    spec = "natural" if f.data == "natural" else data_spec
    device = next(teacher.parameters()).device
    try:
        report = fidelity.measure(teacher, student.to(device), spec, fidelity.on_grid(teacher, f.resolution_list()),
                                  max_images=f.max_images, latency=f.latency, progress=progress)
        report.data = public_name(report.data)
    except Exception as e:                       # noqa: BLE001 - the trained model must still be written
        from castle_convert.config import error_line
        warnings.warn(f"the fidelity block was not measured ({error_line(e)}); measure it later with "
                      "castle-convert eval OUTPUT")
        return {"error": error_line(e)}
    finally:
        student.cpu()
    return report.to_dict()


def _pictures(report: dict, folder: Path, model_spec: str) -> dict[str, Path]:
    """The PNGs the output directory and its model card show (castle_convert/plots.py): ``fidelity.png`` (fidelity
    and latency against resolution) and ``stage1.png`` (per-layer error before / after stage 1). Without matplotlib,
    or on any failure, none: the trained model is written all the same."""
    from castle_convert import plots
    if not plots.available():
        warnings.warn("no pictures in the output (fidelity.png, stage1.png): pip install matplotlib")
        return {}
    out: dict[str, Path] = {}
    name = Path(model_spec).name
    block, stage1 = report.get("fidelity"), report.get("stage1")
    try:
        if block and block.get("rows"):
            out["fidelity.png"] = Path(plots.fidelity_plot(block, str(folder / "fidelity.png"),
                                                           title=f"{name}: converted vs teacher"))
        if stage1 and stage1.get("errors"):
            out["stage1.png"] = Path(plots.stage1_plot({**stage1, "kept_softmax": report.get("keep_softmax")},
                                                       str(folder / "stage1.png")))
    except Exception as e:                       # noqa: BLE001 - the trained model must still be written
        from castle_convert.config import error_line
        warnings.warn(f"pictures not drawn ({error_line(e)})")
    return out


def format_fidelity(block: Optional[dict]) -> str:
    """The report's fidelity block as the table :class:`castle_convert.fidelity.FidelityReport` prints."""
    if not block or "rows" not in block:
        return f"fidelity block: not measured ({block['error']})" if block else ""
    from castle_convert.fidelity import FidelityReport, FidelityRow
    rows = [FidelityRow(**{k: v for k, v in r.items() if k != "latency_ratio"}) for r in block["rows"]]
    return FidelityReport(data=block["data"], rows=rows, device=block["device"], threads=block["threads"]).format()


def _latency(teacher: nn.Module, student: nn.Module, resolution: int) -> dict:
    """Batch-1 latency of teacher and finalized student at the training resolution, interleaved
    in this process (castle_convert.bench); a failure here is recorded, not fatal to the run."""
    from castle_convert.bench import benchmark
    try:
        device = next(student.parameters()).device.type
        r = benchmark(teacher, converted=student, resolutions=[resolution], batches=[1], device=device,
                      repeats=20, warmup=3, time_budget_s=10.0, progress=False)
    except Exception as e:                       # noqa: BLE001 - the trained model must still be written
        warnings.warn(f"latency measurement failed, report.json records it as not measured: {e}")
        return {"error": f"{type(e).__name__}: {e}"}
    c = r.cells[0]
    return {"teacher": {"median_ms": c.original_ms, "iqr_ms": list(c.original_spread_ms)},
            "student": {"median_ms": c.castling_ms, "iqr_ms": list(c.castling_spread_ms)},
            "ratio": round(c.ratio, 3), "device": r.device, "threads": r.threads, "batch": 1,
            "resolution": resolution, "repeats": c.repeats}


def format_table(report: dict) -> str:
    """The teacher-vs-student table printed at the end of a run."""
    def acc(ev: dict) -> str:
        if not ev:
            return "-"
        if "top1" in ev:
            return f"{ev['top1']:.2f}%"
        return f"agree {ev['agree']:.1f}%" if "agree" in ev else f"cos {ev['cosine']:.4f}"

    rows = [("teacher (softmax)", report["teacher"], report["params"]["teacher"], report["macs"]["teacher"]),
            ("student after stage 1" if report.get("stage1") else "student at start", report["student_start"],
             report["params"]["student"], None),
            ("student, training form g=0", report["student_train_form_g0"], report["params"]["student"], None),
            ("student, finalized", report["student"], report["params"]["student"], report["macs"]["student"])]
    metric = "top-1" if "top1" in report["teacher"] else "agreement" if "agree" in report["teacher"] else "cosine"
    lines = [f"{'model':<28}{metric:>10}{'params':>10}{'MACs':>10}", "-" * 58]
    for name, ev, params, macs in rows:
        m = f"{macs / 1e6:.1f}M" if macs else ""
        lines.append(f"{name:<28}{acc(ev):>10}{params / 1e6:>9.2f}M{m:>10}")
    if report.get("keep_softmax"):
        lines.append(f"kept softmax (hybrid): {', '.join(report['keep_softmax'])}")
    if report.get("stage1"):
        errs = report["stage1"]["errors"]
        lines.append(f"stage 1: mean per-layer error {sum(report['stage1']['errors_before'].values()) / len(errs):.3f} "
                     f"→ {sum(errs.values()) / len(errs):.3f} ({report['stage1']['wall_time_s']:.0f}s); "
                     f"stage 2: {report['train_time_s']:.0f}s")
    lat = report.get("latency") or {}
    if "ratio" in lat:
        lines.append(f"latency, batch 1, {lat['resolution']} px, {lat['device']}: teacher "
                     f"{lat['teacher']['median_ms']:.2f} ms, finalized student {lat['student']['median_ms']:.2f} ms "
                     f"(ratio {lat['ratio']:.3f})")
    t, s = report["teacher"], report["student"]
    if "top1" in t and "top1" in s:
        lines.append(f"Δ top-1 finalized vs teacher: {s['top1'] - t['top1']:+.2f} points; "
                     f"agreement with teacher {s.get('agree', float('nan')):.2f}%")
    fid = format_fidelity(report.get("fidelity"))
    if fid:                                          # what the user gets where linear attention pays: first
        lines = [fid, ""] + lines
    return "\n".join(lines)
