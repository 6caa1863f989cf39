"""The ``treeplay`` command line (typer + rich).

    treeplay demo [KEY=VALUE ...]              the demo run (configs/demo.yaml = the defaults)
    treeplay run CONFIG [KEY=VALUE ...] [--address ADDR]   a run from a YAML config, with overrides
    treeplay resume RUN [--db URL] [KEY=VALUE ...]   carry on an interrupted run from the store
    treeplay study STUDY [KEY=VALUE ...]       every method x seed of a study, with intervals
    treeplay status [RUN] [--db URL] [--json]  runs, or one run's iterations and metrics
    treeplay envs list                         environments that can be named (built-ins, entry points)
    treeplay runs [--db URL] [--json]          the runs in a store (the inspector's view)
    treeplay trees RUN [--iteration I]         a run's trees, with the ids `tree show` takes
    treeplay tree show TREE [--depth N]        a preference tree drawn in the terminal
    treeplay pairs RUN [--iteration I] [--source S]   a run's preference pairs (with their tree ids)
    treeplay export pairs RUN --format trl-jsonl|hf-dataset [--out PATH]
    treeplay export tree TREE --format json|graphml|dot [--out FILE]
    treeplay serve [--host H] [--port P] [--allow-host NAME] [--token T]   the web inspector
    treeplay version
    treeplay db upgrade [--url URL]

The store-reading commands (runs, trees, tree, pairs, export, serve) are docs/inspector.md.

Commands import their heavy dependencies lazily so ``treeplay --help`` stays fast. Every ``--db`` /
``--url`` falls back to ``$TREEPLAY_STORE_URL``, so a password need not appear on a command line, and
a store URL is printed only without its password.
"""

from __future__ import annotations

import typer

from treeplay import __version__

app = typer.Typer(
    name="treeplay",
    help="Agentic self-improvement of language models: self-play loops, preference trees, learners.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The SQL store: migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")

DEFAULT_DB = "sqlite:///runs/treeplay.db"
# Read by every --db/--url option, and by `run`/`demo` as the store.url of the run.
STORE_ENV = "TREEPLAY_STORE_URL"


@app.command()
def version() -> None:
    """Print the treeplay version."""
    typer.echo(f"treeplay {__version__}")


@db_app.command("upgrade")
def db_upgrade(
    url: str = typer.Option(DEFAULT_DB, "--url", envvar=STORE_ENV, help="Database URL (sqlite:///path or postgresql://...)."),
) -> None:
    """Create or migrate the store's schema to the newest version (Alembic)."""
    from treeplay.store.database import StoreError, upgrade

    try:
        rev = upgrade(url)
    except StoreError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    from treeplay.store.redact import redact_url

    typer.echo(f"store at {redact_url(url)} is at revision {rev}")


def _fail(e: Exception) -> typer.Exit:
    typer.echo(f"error: {e}", err=True)
    return typer.Exit(2)


def _launch(config: str | None, overrides: list[str]) -> None:
    import os

    from treeplay.agents.registry import RegistryError
    from treeplay.orchestrator.config import ConfigError, load_config
    from treeplay.orchestrator.loop import final_line, launch_run
    from treeplay.store.database import StoreError

    if os.environ.get(STORE_ENV):
        # The environment overrides the config file; the command line overrides the environment.
        overrides = [f"store.url={os.environ[STORE_ENV]}", *overrides]
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        raise _fail(e) from None
    try:
        report = launch_run(cfg)
    except (StoreError, ValueError, RegistryError) as e:  # nothing was written for the run
        raise _fail(e) from None
    _after_run(report, cfg.store.url)
    typer.echo(final_line(report))


def _after_run(report, url: str) -> None:
    from rich.console import Console

    from treeplay.store.redact import redact_url

    c = Console(stderr=True)
    url = redact_url(url)  # the hint is printed, so never with the password
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
    """Start a self-improvement run from a config file.

    Experimental (run and tested, not shown to beat rejection-sampling fine-tuning in
    docs/evidence.md): rollout.mode mcts, react, panel, multi_agent and agent; learner.algorithm
    tpo and slhf. A run that uses one says so when it starts.
    """
    extra = list(overrides or [])
    if address:
        extra.append(f"ray.address={address}")
    _launch(config, extra)


@app.command()
def study(
    config: str = typer.Argument(..., help="YAML study file (see configs/studies/)."),
    overrides: list[str] = typer.Argument(None, help="KEY=VALUE applied to every run of the study."),
    name: str = typer.Option(None, "--name", help="Another name for the study (its runs and runs/<name>/), "
                             "e.g. for a validation pass: --name react-validation eval.split=validation."),
) -> None:
    """Run every cell of a study over its seeds (resuming what is unfinished), then print the table.

    Writes runs/<study>/results.json, table.md and curves.png and ends with one JSON line.
    """
    import os

    from rich.console import Console
    from rich.table import Table

    from treeplay.orchestrator.config import ConfigError
    from treeplay.orchestrator.study import TABLE_HEADER, final_line, load_study, run_study, table_rows

    extra = list(overrides or [])
    if os.environ.get(STORE_ENV):
        extra = [f"store.url={os.environ[STORE_ENV]}", *extra]
    from treeplay.store.database import StoreError, open_store

    try:
        spec, runs = load_study(config, extra, name=name)
        for url in dict.fromkeys(cfg.store.url for cfg in runs.values()):
            with open_store(url):  # every store the study writes to, checked before anything runs
                pass
        results = run_study(spec, runs)  # refuses runs stored with another config before anything runs
    except (ConfigError, StoreError) as e:
        raise _fail(e) from None
    table = Table(title=f"study {spec.name} (accuracy %, gains in points, 95% CI over seeds)")
    for col in TABLE_HEADER:
        table.add_column(col, overflow="fold")
    for row in table_rows(results):
        table.add_row(*row)
    console = Console(stderr=True)
    if not console.is_terminal:
        console.width = 180  # logs and CI: the full table, not one folded to 80 columns
    console.print(table)
    typer.echo(final_line(results))
    if results["failed_runs"]:
        raise typer.Exit(1)


@app.command()
def resume(
    run: str = typer.Argument(..., help="Run name or id."),
    overrides: list[str] = typer.Argument(
        None, help="KEY=VALUE for values redacted from the stored config (e.g. env.kwargs.api_key=...)."),
    db: str = typer.Option(DEFAULT_DB, "--db", envvar=STORE_ENV, help="Store URL."),
) -> None:
    """Finish an interrupted run: finished iterations are kept, the rest are run.

    The stored config holds no credentials: the store is the one --db names (its password from the
    URL, $TREEPLAY_STORE_URL, $PGPASSWORD or ~/.pgpass), and redacted values are given again here.
    """
    from treeplay.agents.registry import RegistryError
    from treeplay.orchestrator.loop import final_line, resume_run
    from treeplay.store.database import StoreError

    try:
        report = resume_run(int(run) if run.isdigit() else run, db, list(overrides or []))
    except (StoreError, ValueError, RegistryError) as e:
        raise _fail(e) from None
    _after_run(report, db)
    typer.echo(final_line(report))


@app.command()
def status(
    run: str = typer.Argument(None, help="Run name or id; omitted: list runs."),
    db: str = typer.Option(DEFAULT_DB, "--db", envvar=STORE_ENV, help="Store URL."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show runs, or one run's iterations with their key metrics."""
    import json

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from treeplay.store import queries
    from treeplay.store.database import StoreError, open_store

    try:
        store = open_store(db, create=False)
        if run is None:
            runs = queries.list_runs(store)
            rows = [{"id": r.id, "name": r.name, "status": r.status, "created": str(r.created), "reason": r.reason}
                    for r in runs]
            if as_json:
                typer.echo(json.dumps(rows))
                return
            t = Table("id", "name", "status", "created", "reason", title="runs")
            for r in rows:
                t.add_row(str(r["id"]), r["name"], r["status"], r["created"], escape(r["reason"] or ""))
            Console().print(t)
            return
        info = queries.get_run(store, int(run) if run.isdigit() else run)
        its = queries.list_iterations(store, info.id)
    except StoreError as e:
        raise _fail(e) from None
    from treeplay.orchestrator.inspector import data_versions, data_versions_text

    rows = [{"iteration": i.index, "status": i.status, "policy_version": i.policy_version,
             "data_versions": data_versions(i), "data": data_versions_text(i),
             "accuracy": (i.metrics or {}).get("eval/accuracy_greedy"),
             "sample_accuracy": (i.metrics or {}).get("eval/accuracy_sample"),
             "pairs": (i.metrics or {}).get("rollout/pairs"), "loss": (i.metrics or {}).get("learn/loss")}
            for i in its]
    if as_json:
        typer.echo(json.dumps({"run": info.name, "id": info.id, "status": info.status, "reason": info.reason,
                               "iterations": [{k: v for k, v in r.items() if k != "data"} for r in rows]}))
        return
    state = escape(f"{info.status}: {info.reason}") if info.reason else info.status
    t = Table("iter", "status", "version", "data from", "greedy acc", "T=1 acc", "pairs", "loss",
              title=f"run {info.name} ({state})")
    def fmt(v: object) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return str(int(v)) if v.is_integer() and abs(v) >= 1 else f"{v:.3f}"
        return str(v)

    for r in rows:
        t.add_row(*(fmt(r[k]) for k in ("iteration", "status", "policy_version", "data", "accuracy", "sample_accuracy",
                                        "pairs", "loss")))
    Console().print(t)


envs_app = typer.Typer(help="Environments: what can be named in a run config.", no_args_is_help=True)
app.add_typer(envs_app, name="envs")


@envs_app.command("list")
def envs_list() -> None:
    """List the environments that can be made by name (built-ins and installed entry points)."""
    from rich.console import Console
    from rich.table import Table

    from treeplay.agents.registry import list_environments

    table = Table(title="treeplay environments")
    for column in ("name", "target", "source"):
        table.add_column(column)
    for entry in list_environments():
        table.add_row(entry.name, entry.target, entry.source)
    Console(width=120).print(table)
    typer.echo("Any 'package.module:Class' implementing the Environment protocol works too.")


# ----------------------------------------------------------------------------------------------
# The inspector (orchestrator/inspector.py, orchestrator/web/): read-only views of the store.

tree_app = typer.Typer(help="Preference trees in the store.", no_args_is_help=True)
app.add_typer(tree_app, name="tree")
export_app = typer.Typer(help="Export pairs (TRL) and trees (JSON, GraphML, DOT).", no_args_is_help=True)
app.add_typer(export_app, name="export")


def _print_json(value) -> None:
    import json

    typer.echo(json.dumps(value, ensure_ascii=False))


@app.command()
def runs(
    db: str = typer.Option(DEFAULT_DB, "--db", envvar=STORE_ENV, help="Store URL."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the runs in the store."""
    from rich.console import Console

    from treeplay.orchestrator import inspector
    from treeplay.store.database import StoreError

    try:
        rows = inspector.list_runs(inspector.open_for_reading(db))
    except StoreError as e:
        raise _fail(e) from None
    if as_json:
        _print_json(rows)
        return
    from treeplay.store.redact import redact_url

    Console().print(inspector.runs_table(rows, title=f"runs in {redact_url(db)}"))


@app.command()
def trees(
    run: str = typer.Argument(..., help="Run name or id."),
    iteration: int = typer.Option(None, "--iteration", help="Only this iteration."),
    db: str = typer.Option(DEFAULT_DB, "--db", envvar=STORE_ENV, help="Store URL."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List a run's preference trees: the tree ids `treeplay tree show` and `export tree` take."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from treeplay.orchestrator import inspector
    from treeplay.store import queries
    from treeplay.store.database import StoreError

    try:
        store = inspector.open_for_reading(db)
        info = inspector.find_run(store, run)
        rows = [inspector.tree_summary(t) for t in queries.list_trees(store, info.id, iteration)]
    except StoreError as e:
        raise _fail(e) from None
    if as_json:
        _print_json([{k: v for k, v in r.items() if k != "prompt"} for r in rows])
        return
    where = f" iteration {iteration}" if iteration is not None else ""
    table = Table("tree", "iteration", "task", "version", "nodes", "depth",
                  title=f"{len(rows)} trees of run {inspector.terminal_safe(info.name)}{where}")
    for r in rows:
        table.add_row(str(r["id"]), str(r["iteration"]), Text(inspector.terminal_safe(r["task_id"])),
                      f"v{r['policy_version']}", str(r["n_nodes"]), str(r["max_depth"]))
    Console().print(table)


@tree_app.command("show")
def tree_show(
    tree: str = typer.Argument(..., help="Tree id (listed by `treeplay trees RUN` and `treeplay pairs RUN`)."),
    depth: int = typer.Option(None, "--depth", min=0, help="Show nodes down to this depth only."),
    db: str = typer.Option(DEFAULT_DB, "--db", envvar=STORE_ENV, help="Store URL."),
    as_json: bool = typer.Option(False, "--json", help="Print the tree as nested JSON."),
) -> None:
    """Draw a preference tree: step, N, Q, reward; ● selected path, ✓/✗ chosen/rejected sides of pairs."""
    from rich.console import Console

    from treeplay.orchestrator import inspector
    from treeplay.store.database import StoreError

    try:
        store = inspector.open_for_reading(db)
        nested = inspector.tree_nested(store, inspector.parse_id(tree, "tree id"), depth)
    except StoreError as e:
        raise _fail(e) from None
    if as_json:
        _print_json(nested)
        return
    Console().print(inspector.tree_renderable(nested))


@app.command()
def pairs(
    run: str = typer.Argument(..., help="Run name or id."),
    iteration: int = typer.Option(None, "--iteration", help="Only this iteration."),
    source: str = typer.Option(None, "--source", help="mcts, panel, credit, rubric, slhf or sample."),
    db: str = typer.Option(DEFAULT_DB, "--db", envvar=STORE_ENV, help="Store URL."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List a run's preference pairs with the tree and the tree nodes they came from."""
    from rich.console import Console

    from treeplay.orchestrator import inspector
    from treeplay.store.database import StoreError

    try:
        rows = inspector.list_pairs(inspector.open_for_reading(db), run, iteration, source)
    except StoreError as e:
        raise _fail(e) from None
    if as_json:
        _print_json(rows)
        return
    Console().print(inspector.pairs_table(rows))


@export_app.command("pairs")
def export_pairs(
    run: str = typer.Argument(..., help="Run name or id."),
    fmt: str = typer.Option(..., "--format", help="trl-jsonl or hf-dataset (datasets.save_to_disk folder)."),
    out: str = typer.Option(None, "--out", help="Output file (trl-jsonl: stdout if omitted) or folder."),
    iteration: int = typer.Option(None, "--iteration", help="Only this iteration."),
    source: str = typer.Option(None, "--source", help="Only this pair source."),
    db: str = typer.Option(DEFAULT_DB, "--db", envvar=STORE_ENV, help="Store URL."),
) -> None:
    """Export a run's pairs as TRL preference data: {"prompt", "chosen", "rejected"}."""
    from treeplay.orchestrator import inspector
    from treeplay.store.database import StoreError

    try:
        n, text = inspector.export_pairs(inspector.open_for_reading(db), run, fmt, out, iteration, source)
    except (StoreError, OSError) as e:
        raise _fail(e) from None
    if text is not None:
        typer.echo(text, nl=False)
    else:
        typer.echo(f"wrote {n} pairs to {out}", err=True)


@export_app.command("tree")
def export_tree(
    tree: str = typer.Argument(..., help="Tree id."),
    fmt: str = typer.Option(..., "--format", help="json (node-link), graphml or dot."),
    out: str = typer.Option(None, "--out", help="Output file; stdout if omitted."),
    db: str = typer.Option(DEFAULT_DB, "--db", envvar=STORE_ENV, help="Store URL."),
) -> None:
    """Export a stored tree as node-link JSON, GraphML or Graphviz DOT."""
    from pathlib import Path

    from treeplay.orchestrator import inspector
    from treeplay.store.database import StoreError

    try:
        text = inspector.export_tree(inspector.open_for_reading(db), inspector.parse_id(tree, "tree id"), fmt)
        if out:
            Path(out).write_text(text, encoding="utf-8")
    except (StoreError, OSError) as e:
        raise _fail(e) from None
    if out:
        typer.echo(f"wrote tree {tree} to {out}", err=True)
    else:
        typer.echo(text, nl=False)


@app.command()
def serve(
    db: str = typer.Option(DEFAULT_DB, "--db", envvar=STORE_ENV, help="Store URL."),
    port: int = typer.Option(8765, "--port", help="TCP port."),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Interface to bind; anything but 127.0.0.1/localhost/::1 exposes the store "
                             "and needs a token."),
    allow_host: list[str] = typer.Option(None, "--allow-host",
                                         help="Also answer requests whose Host header names this host "
                                         "(repeatable); e.g. the name a non-local bind is reached by."),
    token: str = typer.Option(None, "--token", envvar="TREEPLAY_INSPECTOR_TOKEN",
                              help="Require this token (?token= or a bearer header once, then a cookie); "
                              "a non-local bind without one gets a generated token, printed here."),
) -> None:
    """Serve the read-only inspector page and JSON API (http://127.0.0.1:8765/ by default)."""
    from treeplay.orchestrator.web import app as web
    from treeplay.store.database import StoreError
    from treeplay.store.redact import redact_url

    generated = token is None and not web.is_local(host)
    try:
        token = web.new_token() if generated else (web.check_token(token) if token is not None else None)
        hosts = web.accepted_hosts(host, allow_host or [])
    except ValueError as e:
        raise _fail(e) from None
    if not web.is_local(host):
        typer.echo(f"warning: binding {host}: everything in the store (prompts, model outputs, configs) "
                   "becomes readable by anyone who can reach this port on the network and holds the token; "
                   "SSH port forwarding keeps it local (docs/inspector.md)", err=True)
    where = f"[{host}]" if ":" in host else host
    typer.echo(f"treeplay inspector on http://{where}:{port}/ reading {redact_url(db)} (Ctrl+C to stop)", err=True)
    if token is not None:
        shown = token if generated else "<the --token value>"
        typer.echo(f"it asks for its token: open http://{where}:{port}/?token={shown} ; it answers to Host "
                   f"{', '.join(sorted(hosts))} (add names with --allow-host)", err=True)
    try:
        web.serve(db, host, port, allow_hosts=allow_host or [], token=token)
    except (StoreError, ValueError) as e:
        raise _fail(e) from None


if __name__ == "__main__":
    app()
