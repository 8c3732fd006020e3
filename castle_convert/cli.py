"""`castle-convert` command line: a thin layer over the Python API."""

from __future__ import annotations

import json
import sys
from typing import Optional

import click

from castle_convert.config import ConfigError
from castle_convert.convert import ConversionError, FinalizeError
from castle_convert.models import ModelLoadError

USER_ERRORS = (ModelLoadError, ConversionError, FinalizeError, ConfigError)


class _Group(click.Group):
    """Turns the library's user-facing errors into one-line messages instead of tracebacks."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="castle-convert")
def main() -> None:
    """Convert pretrained Vision Transformers to Castling-ViT linear-angular attention."""


@main.command("inspect")
@click.argument("model")
@click.option("--arch", help="timm architecture of a checkpoint file MODEL.")
@click.option("--img-size", type=int, default=None, help="Input resolution (default: the model's own).")
@click.option("--kind", default=None, help="Attention kind (default: linear_angular).")
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
