"""The inspector's web page: a read-only FastAPI JSON API over the store and one static page.

    treeplay serve --db sqlite:///runs/treeplay.db          # http://127.0.0.1:8765/

    app = create_app("sqlite:///runs/treeplay.db")          # for uvicorn or a TestClient

Only GET routes exist; the store is opened without creating or migrating anything. The page
(``static/index.html``, ``app.js``, ``style.css``; plain JS, no build step, nothing from a CDN) loads
a tree's children only when a node is expanded, so large trees stay responsive.

Model text is untrusted. The page inserts it only as DOM text (``textContent``/``createTextNode``),
and every response carries a strict Content-Security-Policy (scripts and styles from this server
only, no inline script, no plugins, no framing), so a step such as ``<script>…</script>`` or
``<img onerror=…>`` shows as text and runs nothing. Unicode bidirectional controls (U+202E and the
like), which could reorder what a line appears to say, are shown as visible ``\u202e`` marks, and
every element holding model text is laid out in isolation (``dir="auto"``, ``unicode-bidi: isolate``).

Who may ask:

- Every request must name, in its ``Host`` header, a host the server was started for: 127.0.0.1,
  localhost, ::1, the bound host, and any ``allow_hosts``; anything else is answered 400 with no
  data. A page on another site can make the browser's name for it resolve to 127.0.0.1 (DNS
  rebinding), but it cannot make the browser send one of these names.
- With a ``token`` (required by ``serve`` for a non-local bind), every route answers 401 unless the
  request carries it: ``?token=...`` or ``Authorization: Bearer ...`` once, after which an HttpOnly,
  SameSite=Strict cookie carries it. Opening ``/?token=...`` sets the cookie and redirects to ``/``
  so the token does not stay in the address bar.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from treeplay.orchestrator import inspector
from treeplay.store import queries
from treeplay.store.database import Store, StoreError
from treeplay.store.records import PAIR_SOURCES

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
MIN_TOKEN_CHARS = 16


def host_name(value: str) -> str | None:
    """The host of a ``Host`` header or of an ``--allow-host`` value, lower-cased, without port,
    brackets or trailing dot; None when it is not a well-formed host[:port]."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not re.fullmatch(r":[0-9]+", rest)):
            return None
    else:
        name, colon, port = value.partition(":")
        if colon and not port.isdigit():
            return None
    name = name.rstrip(".")
    if not name or not re.fullmatch(r"[a-z0-9._:%-]+", name):
        return None
    return name


def _configured_host(value: str) -> str | None:
    """Like ``host_name``, but also takes a bare IPv6 address (as ``--host ::1`` is written)."""
    if value.count(":") >= 2 and not value.strip().startswith("["):
        try:
            return str(ipaddress.IPv6Address(value.strip()))
        except ValueError:
            return None
    return host_name(value)


def accepted_hosts(host: str, allow_hosts: Iterable[str] = ()) -> frozenset[str]:
    """The Host names a server bound to ``host`` answers: the local names, ``host``, ``allow_hosts``
    (a port in them is ignored: the Host check is about names).

    Raises:
        ValueError: An ``allow_hosts`` entry that is not a host name.
    """
    names = set(LOCAL_HOSTS)
    bound = _configured_host(host)
    if bound is not None:
        names.add(bound)
    for extra in allow_hosts:
        name = _configured_host(extra)
        if name is None:
            raise ValueError(f"--allow-host {extra!r} is not a host name (give a name or address, no scheme or path)")
        names.add(name)
    return frozenset(names)


def new_token() -> str:
    """A fresh random token for a non-local bind (192 bits, URL-safe)."""
    return secrets.token_urlsafe(24)


def check_token(token: str) -> str:
    """``token`` if it is usable as an inspector token.

    Raises:
        ValueError: Too short, or holding characters a URL or cookie would mangle.
    """
    if len(token) < MIN_TOKEN_CHARS or not re.fullmatch(r"[A-Za-z0-9._~-]+", token):
        raise ValueError(
            f"--token must be at least {MIN_TOKEN_CHARS} characters of A-Z a-z 0-9 . _ ~ - "
            f"(got {len(token)} characters)"
        )
    return token


def _given_tokens(request: Request, cookie: str) -> tuple[list[str], bool]:
    """The tokens a request carries, and whether one came by query or header (not by cookie)."""
    explicit = []
    if (query := request.query_params.get("token")) is not None:
        explicit.append(query)
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() in ("bearer", "token") and value.strip():
        explicit.append(value.strip())
    from_cookie = request.cookies.get(cookie)
    return explicit + ([from_cookie] if from_cookie else []), bool(explicit)


def create_app(
    url: str, *, host: str = "127.0.0.1", allow_hosts: Iterable[str] = (), token: str | None = None
) -> FastAPI:
    """The inspector app over the store at ``url`` (opened now, so a bad URL fails before serving).

    Args:
        url: The store's URL.
        host: The host the server is bound to; its name is accepted in ``Host`` headers.
        allow_hosts: More host names to accept in ``Host`` headers (e.g. the name a remote user
            reaches a non-local bind by).
        token: When given, every request must carry it (query parameter, bearer header or cookie).

    Raises:
        StoreError: The store cannot be opened.
        ValueError: A malformed ``allow_hosts`` entry or ``token``.
    """
    hosts = accepted_hosts(host, allow_hosts)
    if token is not None:
        check_token(token)
    # The cookie's name is derived from the token, so inspectors on other ports of the same host
    # (cookies ignore ports) do not overwrite each other's.
    cookie = "treeplay_token_" + hashlib.sha256((token or "").encode()).hexdigest()[:12]
    store = inspector.open_for_reading(url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # noqa: ANN202 - FastAPI's lifespan protocol
        yield
        store.close()

    app = FastAPI(title="treeplay inspector", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.store = store

    def refusal(request: Request) -> Response | None:
        """400 for a Host this server was not started for, 401 without the token; None: go on."""
        name = host_name(request.headers.get("host", ""))
        if name not in hosts:
            return JSONResponse(
                {"detail": f"this inspector does not answer to Host {name or '(none)'!r}; it answers to "
                           f"{', '.join(sorted(hosts))} (add names with treeplay serve --allow-host)"},
                status_code=400,
            )
        if token is None:
            return None
        given, explicit = _given_tokens(request, cookie)
        if not any(hmac.compare_digest(g.encode(), token.encode()) for g in given):
            return JSONResponse(
                {"detail": "this inspector needs its token: open the URL treeplay serve printed "
                           "(/?token=...) or send 'Authorization: Bearer TOKEN'"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        if explicit and request.url.path == "/" and "token" in request.query_params:
            # Keep the token in the cookie, not in the address bar or the history.
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(cookie, token, httponly=True, samesite="strict", path="/")
            return response
        return None

    @app.middleware("http")
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = refusal(request)
        if response is None:
            response = await call_next(request)
            if token is not None and _given_tokens(request, cookie)[1]:
                response.set_cookie(cookie, token, httponly=True, samesite="strict", path="/")
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


def serve(
    url: str,
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    allow_hosts: Iterable[str] = (),
    token: str | None = None,
) -> None:
    """Run the inspector with uvicorn until interrupted (blocks).

    Raises:
        StoreError: The store cannot be opened.
        ValueError: A non-local ``host`` without a ``token``, or a malformed host name or token.
    """
    import uvicorn

    if token is None and not is_local(host):
        raise ValueError(f"binding {host} exposes the store to the network: it needs a token")
    app = create_app(url, host=host, allow_hosts=allow_hosts, token=token)
    uvicorn.run(app, host=host, port=port, log_level="warning")
