"""The inspector's JSON API (FastAPI TestClient) over a store filled by a real small search; who it
answers (Host names, the token of a non-local bind) and what it never shows (credentials)."""

from __future__ import annotations

import json
import re

import pytest

from tests.inspector.inspect_store import XSS_RATIONALE, XSS_STEP, build_inspect_store
from treeplay.orchestrator.web.app import STATIC_DIR, create_app, new_token, serve
from treeplay.search.tree import PreferenceTree
from treeplay.store import queries
from treeplay.store.database import StoreError, open_store


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model_dir):
    return build_inspect_store(tmp_path_factory.mktemp("inspect"), tiny_model_dir)


@pytest.fixture(scope="module")
def client(data):
    from fastapi.testclient import TestClient

    # The server answers only to the names it was started for; TestClient's own is "testserver".
    with TestClient(create_app(data.url), base_url="http://127.0.0.1:8765") as c:
        yield c


@pytest.fixture(scope="module")
def store(data):
    s = open_store(data.url, create=False)
    yield s
    s.close()


def get(client, path: str, status: int = 200):
    r = client.get(path)
    assert r.status_code == status, (path, r.text)
    return r.json()


def test_runs_and_run_detail(client, data):
    runs = get(client, "/api/runs")
    assert [(r["id"], r["name"], r["status"], r["iterations"]) for r in runs] == [
        (data.run_id, data.run_name, "done", 2)
    ]
    by_name = get(client, f"/api/runs/{data.run_name}")
    by_id = get(client, f"/api/runs/{data.run_id}")
    assert by_name == by_id
    assert by_id["config"]["tasks"] == 3
    assert [it["index"] for it in by_id["iterations"]] == [0, 1]
    assert all(it["tasks"] == 3 and it["status"] == "done" for it in by_id["iterations"])
    assert by_id["counts"]["trees"] == 6 and by_id["counts"]["judgments"] == 1
    # learning-curve points: [iteration, value] with integer iterations
    solved = by_id["metrics"]["rollout/solved"]
    assert [p[0] for p in solved] == [0, 1] and all(0.0 <= p[1] <= 1.0 for p in solved)
    assert get(client, f"/api/runs/{data.run_id}/metrics") == by_id["metrics"]
    assert get(client, f"/api/runs/{data.run_id}/iterations") == by_id["iterations"]


def test_trees_are_listed_per_run_and_iteration_with_paging(client, data):
    page = get(client, f"/api/runs/{data.run_id}/trees")
    assert page["total"] == 6 and [t["id"] for t in page["items"]] == data.tree_ids
    first = get(client, f"/api/runs/{data.run_id}/trees?iteration=1&limit=2")
    assert first["total"] == 3 and [t["iteration"] for t in first["items"]] == [1, 1]
    rest = get(client, f"/api/runs/{data.run_id}/trees?iteration=1&limit=2&offset=2")
    assert [t["id"] for t in first["items"] + rest["items"]] == data.tree_ids[3:]
    get(client, f"/api/runs/{data.run_id}/trees?limit=0", 422)


def test_walking_the_tree_a_level_at_a_time_rebuilds_the_stored_tree(client, store, data):
    """The on-demand endpoints return exactly the stored tree: same nodes, parents, stats, counts."""
    for tree_id in data.tree_ids[:4]:
        stored = queries.load_tree(store, tree_id)
        head = get(client, f"/api/trees/{tree_id}")
        assert head["tree"]["id"] == tree_id and head["tree"]["n_nodes"] == len(stored.nodes)
        seen = {head["node"]["id"]: head["node"]}
        todo = [head["node"]] if head["node"]["n_children"] else []
        while todo:
            node = todo.pop()
            level = get(client, f"/api/nodes/{node['id']}")
            assert level["tree_id"] == tree_id and level["node"]["id"] == node["id"]
            assert len(level["children"]) == node["n_children"]
            for child in level["children"]:
                assert child["parent"] == node["id"] and child["depth"] == node["depth"] + 1
                seen[child["id"]] = child
                todo += [child] if child["n_children"] else []
        assert {n.db_id: (n.parent_key, n.step, n.visits, n.value, n.selected) for n in stored.nodes} == {
            i: (d["parent"], d["step"], d["visits"], d["value"], d["selected"]) for i, d in seen.items()
        }


def test_node_detail_has_full_text_path_judgments_rubric_and_pairs(client, store, data):
    tree = PreferenceTree.from_record(queries.load_tree(store, data.tree_ids[1]))
    deepest = max(tree.nodes(), key=lambda n: tree[n]["depth"])
    d = get(client, f"/api/nodes/{deepest}/detail")
    assert d["text"] == tree.text(deepest)
    assert d["path"] == tree.path(deepest) and d["tree"]["id"] == data.tree_ids[1]

    x = get(client, f"/api/nodes/{data.xss_node}/detail")
    assert x["node"]["step"] == XSS_STEP and x["node"]["rejected"] == 1
    assert x["rubric"] == "<ul><li>1. answer is a number</li></ul>"
    assert [(j["judge"], j["rationale"]) for j in x["judgments"]] == [("exact", XSS_RATIONALE)]
    assert [p["id"] for p in x["pairs"]] == [data.panel_pair]
    # the root "produced" the panel pair: both its sides are children of the root
    root = get(client, f"/api/trees/{data.xss_tree}")["node"]["id"]
    assert data.panel_pair in [p["id"] for p in get(client, f"/api/nodes/{root}/detail")["child_pairs"]]


def test_pairs_filter_page_and_link_to_their_nodes(client, data):
    everything = get(client, f"/api/runs/{data.run_id}/pairs?limit=1000")
    assert everything["total"] >= 2
    sources = {p["source"] for p in everything["items"]}
    assert sources == {"mcts", "panel"}
    panel = get(client, f"/api/runs/{data.run_name}/pairs?source=panel")
    assert [p["id"] for p in panel["items"]] == [data.panel_pair]
    it1 = get(client, f"/api/runs/{data.run_id}/pairs?iteration=1&limit=1000")["items"]
    assert it1 and all(p["iteration"] == 1 for p in it1)
    for p in everything["items"]:
        for side in ("chosen", "rejected"):
            node = get(client, f"/api/nodes/{p[side + '_node']}/detail")
            # the linked node is where that side of the pair starts: its text extends the pair's prompt
            assert (p["prompt"] + p[side]).startswith(node["text"]) and node["text"].startswith(p["prompt"])
    one = get(client, f"/api/runs/{data.run_id}/pairs?limit=1&offset=1")
    assert one["items"] == everything["items"][1:2]
    get(client, f"/api/runs/{data.run_id}/pairs?source=nope", 422)


def test_unknown_things_are_404_with_a_message(client):
    assert "no run" in get(client, "/api/runs/no-such-run", 404)["detail"]
    assert get(client, "/api/trees/99999", 404)["detail"] == "no tree with id 99999"
    assert get(client, "/api/nodes/99999", 404)["detail"] == "no tree node with id 99999"
    assert get(client, "/api/nodes/99999/detail", 404)["detail"] == "no tree node with id 99999"
    get(client, "/api/nodes/abc", 422)


def test_read_only_and_security_headers(client, data):
    for path in ("/", "/static/app.js", "/api/runs", "/api/trees/99999"):
        r = client.get(path)
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
    for method in ("post", "put", "delete", "patch"):
        assert getattr(client, method)("/api/runs").status_code == 405
    assert client.get("/api/runs").headers["cache-control"] == "no-store"
    # model text comes back as JSON strings, never as HTML
    r = client.get(f"/api/nodes/{data.xss_node}")
    assert r.headers["content-type"] == "application/json" and json.loads(r.text)["node"]["step"] == XSS_STEP


def test_page_is_static_local_and_never_writes_markup():
    html = (STATIC_DIR / "index.html").read_text()
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, flags=re.S)
    assert scripts and all('src="/static/' in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"\son\w+=", html) and "style=" not in html  # no inline handlers or styles
    assert not re.search(r"https?://", html)  # nothing from a CDN
    lines = (STATIC_DIR / "app.js").read_text().splitlines()
    js = "\n".join(line for line in lines if not line.lstrip().startswith("//"))  # code, not comments
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js, sink
    assert re.findall(r"https?://[^\"' ]+", js) == ["http://www.w3.org/2000/svg"]  # a namespace, not a fetch


def test_bad_store_url_fails_before_serving(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        create_app(f"sqlite:///{tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(StoreError, match="scheme"):
        create_app("mysql://x/y")


# ----------------------------------------------------------------------------------------------
# Who may ask: Host names and tokens


def test_regression_foreign_host_gets_400_and_no_data(client, data):
    """DNS rebinding: a page on attacker.example whose name now resolves to 127.0.0.1 makes the
    browser send ``Host: attacker.example``; the server must not answer it with the store."""
    for path in ("/", "/static/app.js", "/api/runs", f"/api/runs/{data.run_id}", f"/api/nodes/{data.xss_node}"):
        for host in ("attacker.example", "attacker.example:8765", "127.0.0.1.attacker.example", ""):
            r = client.get(path, headers={"Host": host})
            assert r.status_code == 400, (path, host, r.status_code)
            assert data.run_name not in r.text and "<html" not in r.text.lower()
            assert r.headers["content-security-policy"]  # refusals carry the same headers
    for host in ("127.0.0.1:8765", "localhost", "LOCALHOST.:8765", "[::1]:8765", "localhost:1"):
        assert client.get("/api/runs", headers={"Host": host}).status_code == 200, host


def test_allow_host_and_bound_host_are_accepted(data):
    from fastapi.testclient import TestClient

    app = create_app(data.url, host="box.lan", allow_hosts=["inspect.example.org", "10.0.0.7:8765"])
    with TestClient(app, base_url="http://box.lan:8765") as c:
        for host in ("box.lan", "inspect.example.org:8765", "10.0.0.7", "localhost"):
            assert c.get("/api/runs", headers={"Host": host}).status_code == 200, host
        assert c.get("/api/runs", headers={"Host": "other.lan"}).status_code == 400
    with pytest.raises(ValueError, match="--allow-host 'http://x/y' is not a host name"):
        create_app(data.url, allow_hosts=["http://x/y"])


def test_regression_token_is_required_on_every_route_and_accepted_when_given(data):
    from fastapi.testclient import TestClient

    token = new_token()
    app = create_app(data.url, host="0.0.0.0", allow_hosts=["inspect.example"], token=token)
    base = "http://inspect.example:8765"
    with TestClient(app, base_url=base) as c:
        for path in ("/", "/static/app.js", "/api/runs", f"/api/runs/{data.run_id}", f"/api/trees/{data.xss_tree}"):
            for headers in ({}, {"Authorization": "Bearer wrong-token-000000000"}, {"Cookie": "treeplay_token=x"}):
                r = c.get(path, headers=headers)
                assert r.status_code == 401 and data.run_name not in r.text, (path, headers)
            wrong = token[:-1] + ("x" if token[-1] != "x" else "y")
            assert c.get(f"{path}?token={wrong}").status_code == 401
        # the header, on every route
        runs = c.get("/api/runs", headers={"Authorization": f"Bearer {token}"})
        assert runs.status_code == 200 and runs.json()[0]["name"] == data.run_name
        # a foreign Host is refused even with the token
        assert c.get("/api/runs", headers={"Authorization": f"Bearer {token}", "Host": "evil.example"}).status_code == 400
    with TestClient(app, base_url=base) as c:
        # the query parameter once: the page redirects to drop it and leaves an HttpOnly cookie
        r = c.get(f"/?token={token}", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and token.lower() in cookie
        assert c.get("/").status_code == 200 and "<script" in c.get("/").text  # the cookie now suffices
        assert c.get("/api/runs").status_code == 200 and c.get("/static/app.js").status_code == 200
        assert c.get(f"/api/runs?token={token}").status_code == 200  # API clients may use the query too
    with TestClient(app, base_url=base) as c:
        # the header once on an API route leaves the same cookie; later calls need no header
        r = c.get("/api/runs", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and "httponly" in r.headers["set-cookie"].lower()
        assert c.get(f"/api/runs/{data.run_id}").status_code == 200 and c.get("/").status_code == 200


def test_non_local_bind_needs_a_token_and_tokens_are_checked(data):
    with pytest.raises(ValueError, match="needs a token"):
        serve(data.url, "0.0.0.0", 0)
    with pytest.raises(ValueError, match="--token must be at least 16 characters"):
        create_app(data.url, token="short")
    with pytest.raises(ValueError, match="--token must be"):
        create_app(data.url, token="has space and is long enough")
