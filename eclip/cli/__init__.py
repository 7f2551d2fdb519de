"""`eclip` command line: parses options, calls one library function per subcommand, prints.

Each subcommand lives in its own module and imports heavy libraries inside its
function, so `eclip --help` never imports torch or open_clip.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import click
import typer
from typer.core import TyperGroup
from typing_extensions import Annotated

from eclip import __version__


class Commands(TyperGroup):
    """The subcommands; a mistyped one gets the nearest names ("did you mean 'match'?")."""

    def resolve_command(self, ctx, args):
        import difflib
        name = click.utils.make_str(args[0]) if args else None
        if name is not None and not name.startswith("-") and self.get_command(ctx, name) is None:
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=2, cutoff=0.5)
            if close:
                ctx.fail(f"No such command '{name}'; did you mean " + " or ".join(f"'{c}'" for c in close) + "?")
        return super().resolve_command(ctx, args)


app = typer.Typer(
    cls=Commands,
    name="eclip",
    help="Entity-centric image-text matching with EntityCLIP: explain, train, embed, match, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        typer.echo(f"eclip {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None):
    pass


from eclip.cli import explain, train, embed, match, evaluate, serve, export  # noqa: E402,F401  (registers the commands)


def main():
    try:
        app()
    except SystemExit:
        raise
    except Exception as e:  # a bug, not bad input: one line unless the user asks for the traceback
        if os.environ.get("ECLIP_DEBUG"):
            raise
        sys.stderr.write(f"eclip: internal error: {type(e).__name__}: {e} (set ECLIP_DEBUG=1 for the traceback)\n")
        sys.exit(1)
