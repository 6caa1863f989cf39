"""The inspector's web page: a read-only FastAPI JSON API over the store and one static page.

    treeplay serve --db sqlite:///runs/treeplay.db          # http://127.0.0.1:8765/

    app = create_app("sqlite:///runs/treeplay.db")          # for uvicorn or a TestClient

Only GET routes exist; the store is opened without creating or migrating anything. The page
(``static/index.html``, ``app.js``, ``style.css``; plain JS, no build step, nothing from a CDN) loads
a tree's children only when a node is expanded, so large trees stay responsive.

Model text is untrusted. The page inserts it only as DOM text (``textContent``/``createTextNode``),
and every response carries a strict Content-Security-Policy (scripts and styles from this server
only, no inline script, no plugins, no framing), so a step such as ``<script>…</script>`` or
``<img onerror=…>`` shows as text and runs nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from orchestrator import inspector
from store import queries
from store.database import Store, StoreError
from store.records import PAIR_SOURCES

STATIC_DIR = Path(__file__).resolve().parent / "static"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
MAX_PAGE = 1000


def create_app(url: str) -> FastAPI:
    """The inspector app over the store at ``url`` (opened now, so a bad URL fails before serving).

    Raises:
        StoreError: The store cannot be opened.
    """
    store = inspector.open_for_reading(url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # noqa: ANN202 - FastAPI's lifespan protocol
        yield
        store.close()

    app = FastAPI(title="treeplay inspector", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.store = store

    @app.middleware("http")
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    _add_api(app, store)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    return app


def _read(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a store reader; a missing run/tree/node is a 404, any other store failure a 500 with the
    store's one-line message."""
    try:
        return fn(*args)
    except StoreError as e:
        status = 404 if str(e).startswith("no ") else 500
        raise HTTPException(status_code=status, detail=str(e)) from None


def _page(items: list[Any], offset: int, limit: int) -> dict[str, Any]:
    return {"total": len(items), "offset": offset, "limit": limit, "items": items[offset : offset + limit]}


def _add_api(app: FastAPI, store: Store) -> None:
    @app.get("/api/runs")
    def runs() -> list[dict[str, Any]]:
        """Every run with its iteration count and latest greedy accuracy."""
        return _read(inspector.list_runs, store)

    @app.get("/api/runs/{run}")
    def run(run: str) -> dict[str, Any]:
        """A run: config, iterations, per-iteration metric series, run-wide metrics, row counts."""
        return _read(inspector.run_detail, store, run)

    @app.get("/api/runs/{run}/iterations")
    def iterations(run: str) -> list[dict[str, Any]]:
        """A run's iterations with their metrics and timings."""
        info = _read(inspector.find_run, store, run)
        return [inspector.iteration_row(it) for it in _read(queries.list_iterations, store, info.id)]

    @app.get("/api/runs/{run}/metrics")
    def metrics(run: str) -> dict[str, Any]:
        """Per metric name, its [iteration, value] points."""
        info = _read(inspector.find_run, store, run)
        series = _read(queries.metric_series, store, info.id)
        return {name: [[i, v] for i, v in points] for name, points in inspector.jsonable(series).items()}

    @app.get("/api/runs/{run}/trees")
    def trees(
        run: str,
        iteration: int | None = None,
        offset: int = Query(0, ge=0),
        limit: int = Query(200, ge=1, le=MAX_PAGE),
    ) -> dict[str, Any]:
        """A page of a run's tree summaries (no nodes), optionally of one iteration."""
        info = _read(inspector.find_run, store, run)
        summaries = _read(queries.list_trees, store, info.id, iteration)
        return _page([inspector.tree_summary(t) for t in summaries], offset, limit)

    @app.get("/api/runs/{run}/pairs")
    def pairs(
        run: str,
        iteration: int | None = None,
        source: str | None = Query(None, description=f"one of {', '.join(PAIR_SOURCES)}"),
        offset: int = Query(0, ge=0),
        limit: int = Query(100, ge=1, le=MAX_PAGE),
    ) -> dict[str, Any]:
        """A page of a run's preference pairs, with the tree node ids they came from."""
        if source is not None and source not in PAIR_SOURCES:
            raise HTTPException(
                status_code=422, detail=f"unknown source {source!r}; known: {', '.join(PAIR_SOURCES)}"
            )
        return _page(_read(inspector.list_pairs, store, run, iteration, source), offset, limit)

    @app.get("/api/trees/{tree_id}")
    def tree(tree_id: int) -> dict[str, Any]:
        """A tree's summary, its root and the root's direct children."""
        return _read(inspector.tree_head, store, tree_id)

    @app.get("/api/nodes/{node_id}")
    def node(node_id: int) -> dict[str, Any]:
        """A node and its direct children (each with its child count): one level of a tree."""
        return _read(inspector.node_children, store, node_id)

    @app.get("/api/nodes/{node_id}/detail")
    def node_detail(node_id: int) -> dict[str, Any]:
        """A node's full text, path from the root, info, rubric, judgments, and pairs."""
        return _read(inspector.node_detail, store, node_id)


def is_local(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    return host in LOCAL_HOSTS


def serve(url: str, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Run the inspector with uvicorn until interrupted (blocks).

    Raises:
        StoreError: The store cannot be opened.
    """
    import uvicorn

    uvicorn.run(create_app(url), host=host, port=port, log_level="warning")
