"""The ``t2r`` command (installed as ``t2r.cli``): a thin typer shell over the library functions."""

from __future__ import annotations

import typer

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Turn pretrained Transformer LLMs into linear-time Gated Slot Attention RNNs.",
)


@app.callback()
def _root() -> None:
    """Turn pretrained Transformer LLMs into linear-time Gated Slot Attention RNNs."""


@app.command()
def version() -> None:
    """Print the t2r version."""
    from t2r import __version__

    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
