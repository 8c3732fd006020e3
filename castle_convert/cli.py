"""`castle-convert` command line: a thin layer over the Python API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click

from castle_convert.config import ConfigError
from castle_convert.convert import ConversionError, FinalizeError
from castle_convert.data import DataError
from castle_convert.distill.loop import ResumeError
from castle_convert.export.save import OutputExistsError
from castle_convert.models import ModelLoadError

USER_ERRORS = (ModelLoadError, ConversionError, FinalizeError, ConfigError, DataError, ResumeError,
               OutputExistsError)


class _Group(click.Group):
    """``castle-convert MODEL ...`` (no sub-command) runs ``distill``; the library's user-facing
    errors become one-line messages instead of tracebacks."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help", "--version"):
            args = ["distill", *args]
        elif not args:
            args = ["distill"]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="castle-convert")
def main() -> None:
    """Convert pretrained Vision Transformers' softmax attention to linear attention.

    Attention kinds (--attention / --kind, recipe castling.kind): linear_angular (Castling-ViT,
    default), separable (MobileViTv2 separable self-attention).

    \b
    castle-convert [MODEL] --recipe quick|distill-10ep|distill-30ep [--data ...] [--output ...]
        runs the main job (the `distill` command, the default when no command is named).
    castle-convert inspect MODEL
        dry run: what would be converted, MACs before/after.
    """


@main.command("distill")
@click.argument("model", required=False)
@click.option("--recipe", "recipe_name", default="quick", show_default=True,
              help="Recipe name (recipes/NAME.yaml) or path to a YAML file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, e.g. --set optim.lr=1e-4 --set castling.dw=1d.")
@click.option("--data", "data_spec", help="DIR (train/ + val/ image folders), hf:NAME[:CONFIG], or fashion-mnist.")
@click.option("--output", type=click.Path(path_type=Path), help="Output directory (default runs/MODEL-RECIPE).")
@click.option("--arch", help="timm architecture of a checkpoint file MODEL.")
@click.option("--attention", "kind", metavar="KIND",
              help="Attention kind: linear_angular or separable (overrides castling.kind).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def distill_cmd(model: Optional[str], recipe_name: str, overrides: tuple[str, ...], data_spec: Optional[str],
                output: Optional[Path], arch: Optional[str], kind: Optional[str], resume: bool, overwrite: bool,
                no_progress: bool) -> None:
    """Convert MODEL, distil it against the original, write the inference-only checkpoint.

    MODEL: a timm name or alias, a local Hugging Face model directory, a checkpoint file (with
    --arch), or the built-in fmnist_vit (default of the quick recipe; trained and cached on first use).
    """
    from castle_convert.recipes import load_recipe
    from castle_convert.run import format_table, run

    sets = list(overrides) + ([f"castling.kind={kind}"] if kind else [])
    recipe = load_recipe(recipe_name, sets)
    result = run(model, recipe, data_spec=data_spec, output=output, arch=arch, resume=resume,
                 overwrite=overwrite, progress=not no_progress)
    from castle_convert.distill.loop import process_state
    if process_state().is_main_process:
        click.echo("\n" + format_table(result.report))
        click.echo(f"\nwrote {result.output}/ (model.safetensors, config.json, recipe.yaml, report.json)")


@main.command("inspect")
@click.argument("model")
@click.option("--arch", help="timm architecture of a checkpoint file MODEL.")
@click.option("--img-size", type=int, default=None, help="Input resolution (default: the model's own).")
@click.option("--kind", default=None, metavar="KIND",
              help="Attention kind: linear_angular (default) or separable.")
@click.option("--dw", type=click.Choice(["2d", "1d", "none"]), default=None, help="Depthwise-conv branch.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect_cmd(model: str, arch: Optional[str], img_size: Optional[int], kind: Optional[str],
                dw: Optional[str], as_json: bool) -> None:
    """Dry run: which attention modules of MODEL would be converted, and MACs before/after.

    MODEL is a timm name (aliases deit_tiny, deit_small, deit_base), a local Hugging Face model
    directory, or a local timm checkpoint file (with --arch). Only the architecture is built:
    no weights are loaded or downloaded.
    """
    from castle_convert.convert import inspect
    from castle_convert.models import load_model

    net = load_model(model, arch=arch, pretrained=False, img_size=img_size)
    report = inspect(net, kind=kind, dw=dw)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.format())
    if report.error:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
