"""The ``treeplay`` command line (typer + rich).

    treeplay demo [KEY=VALUE ...]              the demo run (configs/demo.yaml = the defaults)
    treeplay run CONFIG [KEY=VALUE ...]        a run from a YAML config, with overrides
    treeplay resume RUN [--db URL]             carry on an interrupted run from the store
    treeplay status [RUN] [--db URL]           runs, or one run's iterations and metrics
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


def _fail(e: Exception) -> typer.Exit:
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(2)


def _launch(config: str | None, overrides: list[str]) -> None:
    from orchestrator.config import ConfigError, load_config
    from orchestrator.loop import final_line, start_run
    from store.database import StoreError

    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        raise _fail(e) from None
    try:
        report = start_run(cfg)
    except (StoreError, ValueError) as e:
        raise _fail(e) from None
    _after_run(report, cfg.store.url)
    typer.echo(final_line(report))


def _after_run(report, url: str) -> None:
    from rich.console import Console

    c = Console(stderr=True)
    c.print(f"[bold]run '{report.name}'[/] (id {report.run_id}): held-out greedy accuracy "
            f"{report.accuracy_before:.3f} -> [bold green]{report.accuracy_after:.3f}[/] in {report.seconds:.0f}s")
    if report.plot:
        c.print(f"learning curve: {report.plot}")
    c.print(f"inspect it: treeplay status {report.name} --db {url}   |   treeplay serve --db {url}")


@app.command(context_settings={"allow_extra_args": False})
def demo(overrides: list[str] = typer.Argument(None, help="KEY=VALUE overrides, e.g. iterations=3.")) -> None:
    """Build a tiny model, warm-start it, and self-improve it with MCTS-DPO (the default config)."""
    _launch(None, list(overrides or []))


@app.command()
def run(
    config: str = typer.Argument(..., help="YAML run config (see configs/)."),
    overrides: list[str] = typer.Argument(None, help="KEY=VALUE overrides, e.g. learner.dpo.beta=0.2."),
    address: str = typer.Option(None, "--address", help="Ray cluster address ('auto' joins the running one)."),
) -> None:
    """Start a self-improvement run from a config file."""
    extra = list(overrides or [])
    if address:
        extra.append(f"ray.address={address}")
    _launch(config, extra)


@app.command()
def resume(
    run: str = typer.Argument(..., help="Run name or id."),
    db: str = typer.Option(DEFAULT_DB, "--db", help="Store URL."),
) -> None:
    """Finish an interrupted run: finished iterations are kept, the rest are run."""
    from orchestrator.loop import final_line, resume_run
    from store.database import StoreError

    try:
        report = resume_run(int(run) if run.isdigit() else run, db)
    except (StoreError, ValueError) as e:
        raise _fail(e) from None
    _after_run(report, db)
    typer.echo(final_line(report))


@app.command()
def status(
    run: str = typer.Argument(None, help="Run name or id; omitted: list runs."),
    db: str = typer.Option(DEFAULT_DB, "--db", help="Store URL."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show runs, or one run's iterations with their key metrics."""
    import json

    from rich.console import Console
    from rich.table import Table

    from store import queries
    from store.database import StoreError, open_store

    try:
        store = open_store(db, create=False)
        if run is None:
            runs = queries.list_runs(store)
            rows = [{"id": r.id, "name": r.name, "status": r.status, "created": str(r.created)} for r in runs]
            if as_json:
                typer.echo(json.dumps(rows))
                return
            t = Table("id", "name", "status", "created", title="runs")
            for r in rows:
                t.add_row(str(r["id"]), r["name"], r["status"], r["created"])
            Console().print(t)
            return
        info = queries.get_run(store, int(run) if run.isdigit() else run)
        its = queries.list_iterations(store, info.id)
    except StoreError as e:
        raise _fail(e) from None
    rows = [{"iteration": i.index, "status": i.status, "policy_version": i.policy_version,
             "accuracy": (i.metrics or {}).get("eval/accuracy_greedy"),
             "sample_accuracy": (i.metrics or {}).get("eval/accuracy_sample"),
             "pairs": (i.metrics or {}).get("rollout/pairs"), "loss": (i.metrics or {}).get("learn/loss")}
            for i in its]
    if as_json:
        typer.echo(json.dumps({"run": info.name, "id": info.id, "status": info.status, "iterations": rows}))
        return
    t = Table("iter", "status", "version", "greedy acc", "T=1 acc", "pairs", "loss",
              title=f"run {info.name} ({info.status})")
    fmt = lambda v: "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    for r in rows:
        t.add_row(*(fmt(r[k]) for k in ("iteration", "status", "policy_version", "accuracy", "sample_accuracy", "pairs", "loss")))
    Console().print(t)


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
