"""The ``treeplay`` command line (typer + rich).

    treeplay version
    treeplay db upgrade [--url URL]

Commands import their heavy dependencies lazily so ``treeplay --help`` stays fast.
"""

from __future__ import annotations

import typer

from orchestrator import __version__

app = typer.Typer(
    name="treeplay",
    help="Agentic self-improvement of language models: self-play loops, preference trees, learners.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The SQL store: migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")

DEFAULT_DB = "sqlite:///runs/treeplay.db"


@app.command()
def version() -> None:
    """Print the treeplay version."""
    typer.echo(f"treeplay {__version__}")


@db_app.command("upgrade")
def db_upgrade(
    url: str = typer.Option(DEFAULT_DB, "--url", help="Database URL (sqlite:///path or postgresql://...)."),
) -> None:
    """Create or migrate the store's schema to the newest version (Alembic)."""
    from store.database import StoreError, upgrade

    try:
        rev = upgrade(url)
    except StoreError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(f"store at {url} is at revision {rev}")


envs_app = typer.Typer(help="Environments: what can be named in a run config.", no_args_is_help=True)
app.add_typer(envs_app, name="envs")


@envs_app.command("list")
def envs_list() -> None:
    """List the environments that can be made by name (built-ins and installed entry points)."""
    from rich.console import Console
    from rich.table import Table

    from agents.registry import list_environments

    table = Table(title="treeplay environments")
    for column in ("name", "target", "source"):
        table.add_column(column)
    for entry in list_environments():
        table.add_row(entry.name, entry.target, entry.source)
    Console(width=120).print(table)
    typer.echo("Any 'package.module:Class' implementing the Environment protocol works too.")


if __name__ == "__main__":
    app()
