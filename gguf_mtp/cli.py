"""The ``gguf-mtp`` command line: parsing and printing only; the work is in the library modules.

Conventions (docs/contracts.md): ``-o`` names outputs, ``--force`` overwrites, ``--json`` prints machine
output, ``--mmproj PATH`` names a projector file (except ``convert SRC --mmproj``), quant names are
spelled as llama.cpp spells them (Q4_K_M). Errors print one line to stderr and exit non-zero; set
GGUF_MTP_DEBUG=1 for a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import GgufMtpError

console = Console()
err_console = Console(stderr=True)


class Group(click.Group):
    """Turns our errors (and a few common ones) into one ``error:`` line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GgufMtpError as e:
            if os.environ.get("GGUF_MTP_DEBUG"):
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
            if os.environ.get("GGUF_MTP_DEBUG"):
                raise
            click.echo(f"error: {e.strerror}: {e.filename}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(str(v) for v in r))
    console.print(table)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gguf-mtp")
def main() -> None:
    """Gemma 4 + MTP drafters on llama.cpp: export, quantize, plan, run."""


# Commands are added below as their modules land (no placeholders).
