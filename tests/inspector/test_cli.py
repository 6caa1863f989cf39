"""``treeplay runs / tree show / pairs / export`` (typer CliRunner) over a store from a real small search."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import networkx as nx
import pytest
from typer.testing import CliRunner

from tests.inspector.inspect_store import BIDI_STEP, ESC_STEP, MARKUP_STEP, XSS_STEP, build_inspect_store
from treeplay.orchestrator.cli import app
from treeplay.search.tree import PreferenceTree
from treeplay.store import queries
from treeplay.store.database import open_store


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model_dir):
    return build_inspect_store(tmp_path_factory.mktemp("inspect"), tiny_model_dir)


def cli(*args: str, code: int = 0):
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})  # no wrapping mid-step
    assert result.exit_code == code, (args, result.output, result.stderr)
    return result


def test_runs_json_and_table(data):
    rows = json.loads(cli("runs", "--db", data.url, "--json").stdout)
    assert [(r["name"], r["status"], r["iterations"]) for r in rows] == [(data.run_name, "done", 2)]
    assert data.run_name in cli("runs", "--db", data.url).stdout


def test_tree_show_json_matches_the_store_and_depth_cuts(data):
    nested = json.loads(cli("tree", "show", str(data.xss_tree), "--db", data.url, "--json").stdout)
    store = open_store(data.url, create=False)
    try:
        stored = PreferenceTree.from_record(queries.load_tree(store, data.xss_tree))
    finally:
        store.close()

    def flatten(d):
        yield d
        for c in d.get("children", []):
            yield from flatten(c)

    nodes = {d["id"]: d for d in flatten(nested["root"])}
    assert set(nodes) == set(stored.nodes())
    assert all(
        d["step"] == stored[i]["step"] and d["visits"] == stored[i]["visits"] for i, d in nodes.items()
    )
    assert {i for i, d in nodes.items() if d["selected"]} == set(stored.selected_path())
    assert nodes[data.xss_node]["rejected"] == 1 and nodes[data.xss_node]["step"] == XSS_STEP

    cut = json.loads(
        cli("tree", "show", str(data.xss_tree), "--depth", "1", "--db", data.url, "--json").stdout
    )
    assert max(d["depth"] for d in flatten(cut["root"])) == 1
    assert any("children" not in d and d["n_children"] for d in flatten(cut["root"]))


def test_tree_show_draws_model_text_literally(data):
    out = cli("tree", "show", str(data.xss_tree), "--db", data.url).stdout
    assert XSS_STEP in out  # not eaten as markup
    assert MARKUP_STEP in out  # rich markup in a step is printed, not applied
    assert "\x1b" not in out and "\x07" not in out  # terminal escapes are shown, not sent
    assert ESC_STEP.replace("\x1b", "\\x1b").replace("\x07", "\\x07") in out
    # bidi controls would reorder the line: shown as escapes, never sent
    assert not any(ch in out for ch in "\u202e\u202c\u2067\u2069")
    assert "The answer is \\u202e24\\u202c, checked \\u2067twice\\u2069" in out
    assert BIDI_STEP.startswith("The answer is \u202e")
    assert "✗rejected" in out and "✓chosen" in out and "●" in out
    assert "more below" in cli("tree", "show", str(data.xss_tree), "--depth", "0", "--db", data.url).stdout


def test_pairs_json_filters(data):
    everything = json.loads(cli("pairs", data.run_name, "--db", data.url, "--json").stdout)
    assert {p["source"] for p in everything} == {"mcts", "panel"}
    panel = json.loads(cli("pairs", str(data.run_id), "--source", "panel", "--db", data.url, "--json").stdout)
    assert [(p["id"], p["rejected_node"]) for p in panel] == [(data.panel_pair, data.xss_node)]
    it1 = json.loads(cli("pairs", data.run_name, "--iteration", "1", "--db", data.url, "--json").stdout)
    assert it1 and {p["iteration"] for p in it1} == {1} and len(it1) < len(everything)
    assert "pairs" in cli("pairs", data.run_name, "--db", data.url).stdout


def test_trees_lists_the_ids_tree_show_takes(data):
    listed = json.loads(cli("trees", data.run_name, "--db", data.url, "--json").stdout)
    assert [t["id"] for t in listed] == data.tree_ids
    with open_store(data.url, create=False) as store:
        stored = {t.id: t for t in queries.list_trees(store, data.run_id)}
    for t in listed:
        s = stored[t["id"]]
        assert (t["iteration"], t["task_id"], t["policy_version"], t["n_nodes"]) == (
            s.iteration, s.task_id, s.policy_version, s.n_nodes)
    by_id = json.loads(cli("trees", str(data.run_id), "--iteration", "1", "--db", data.url, "--json").stdout)
    assert [t["id"] for t in by_id] == [t["id"] for t in listed if t["iteration"] == 1] and by_id
    table = cli("trees", data.run_name, "--iteration", "0", "--db", data.url).stdout
    assert "3 trees of run inspect-test iteration 0" in table
    assert [c.strip() for c in _header(table)] == ["tree", "iteration", "task", "version", "nodes", "depth"]
    first_cells = [line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│")]
    assert first_cells == [str(t["id"]) for t in listed if t["iteration"] == 0]
    assert str(data.xss_tree) in first_cells
    shown = json.loads(cli("tree", "show", str(listed[0]["id"]), "--db", data.url, "--json").stdout)
    assert shown["tree"]["id"] == listed[0]["id"]


def test_pairs_say_which_tree_they_came_from(data):
    rows = json.loads(cli("pairs", data.run_name, "--db", data.url, "--json").stdout)
    with open_store(data.url, create=False) as store:
        for p in rows:
            assert p["tree_id"] == queries.get_node(store, p["chosen_node"]).tree_id
    assert {p["tree_id"] for p in rows} <= set(data.tree_ids)
    assert next(p["tree_id"] for p in rows if p["id"] == data.panel_pair) == data.xss_tree
    table = cli("pairs", data.run_name, "--source", "panel", "--db", data.url).stdout
    assert [c.strip() for c in _header(table)][:4] == ["id", "it", "tree", "source"]
    row = next(line for line in table.splitlines() if line.startswith("│"))
    assert [c.strip() for c in row.split("│")[1:4]] == [str(data.panel_pair), "0", str(data.xss_tree)]


def _header(table: str) -> list[str]:
    """The cells of a rich table's header line."""
    line = next(line for line in table.splitlines() if line.startswith("┃"))
    return line.strip("┃ ").split("┃")


def test_trees_errors_are_one_line_and_exit_2(data):
    for args in [("trees", "no-such-run", "--db", data.url), ("trees", data.run_name, "--db", "nosuchscheme://x")]:
        lines = cli(*args, code=2).stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), args


def test_errors_are_one_line_and_exit_2(data, tmp_path):
    cases = [
        ("pairs", "no-such-run", "--db", data.url),
        ("pairs", data.run_name, "--source", "vibes", "--db", data.url),
        ("tree", "show", "99999", "--db", data.url),
        ("tree", "show", "abc", "--db", data.url),
        ("runs", "--db", f"sqlite:///{tmp_path / 'missing.db'}"),
        ("runs", "--db", "nosuchscheme://x"),
        ("export", "tree", "1", "--format", "png", "--db", data.url),
        ("export", "pairs", data.run_name, "--format", "hf-dataset", "--db", data.url),
    ]
    for args in cases:
        result = cli(*args, code=2)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
    assert not (tmp_path / "missing.db").exists()


def test_export_tree_formats_round_trip(data, tmp_path):
    as_json = cli("export", "tree", str(data.xss_tree), "--format", "json", "--db", data.url).stdout
    back = PreferenceTree.from_json(as_json)
    assert back[data.xss_node]["step"] == XSS_STEP and back[data.markup_node]["step"] == MARKUP_STEP
    out = tmp_path / "t.graphml"
    cli("export", "tree", str(data.xss_tree), "--format", "graphml", "--out", str(out), "--db", data.url)
    g = nx.read_graphml(out)
    assert g.number_of_nodes() == len(back) and g.nodes[str(data.xss_node)]["step"] == XSS_STEP
    dot = cli("export", "tree", str(data.xss_tree), "--format", "dot", "--db", data.url).stdout
    assert dot.startswith("digraph preference_tree {") and dot.count("->") == len(back) - 1


def test_export_pairs_trl_jsonl_and_hf_dataset(data, tmp_path):
    from datasets import load_from_disk

    expected = json.loads(cli("pairs", data.run_name, "--db", data.url, "--json").stdout)
    text = cli("export", "pairs", data.run_name, "--format", "trl-jsonl", "--db", data.url).stdout
    rows = [json.loads(line) for line in text.splitlines()]
    assert rows == [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in expected]
    out = tmp_path / "panel.jsonl"
    cli(
        "export",
        "pairs",
        data.run_name,
        "--format",
        "trl-jsonl",
        "--source",
        "panel",
        "--out",
        str(out),
        "--db",
        data.url,
    )
    assert [json.loads(line)["rejected"] for line in out.read_text().splitlines()] == [XSS_STEP + "\n"]
    folder = tmp_path / "ds"
    cli(
        "export",
        "pairs",
        data.run_name,
        "--format",
        "hf-dataset",
        "--iteration",
        "0",
        "--out",
        str(folder),
        "--db",
        data.url,
    )
    ds = load_from_disk(str(folder))
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert ds.to_list() == [r for r, p in zip(rows, expected, strict=True) if p["iteration"] == 0]


def test_serve_binds_localhost_and_warns_for_other_hosts(data, tmp_path):
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "treeplay.orchestrator.cli", "serve", "--db", data.url, "--port", str(port)]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                runs = httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=2).json()
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, "treeplay serve did not come up"
                time.sleep(0.2)
        assert [r["name"] for r in runs] == [data.run_name]
    finally:
        server.terminate()
        _, err = server.communicate(timeout=20)
    assert f"http://127.0.0.1:{port}/" in err and "warning" not in err

    # another host: a warning first; a bad store then fails with exit 2 before anything is bound
    result = cli("serve", "--host", "0.0.0.0", "--db", f"sqlite:///{tmp_path / 'none.db'}", code=2)
    assert result.stderr.startswith("warning: binding 0.0.0.0") and "readable" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: no store at")


def test_regression_serve_on_a_non_local_host_asks_for_a_token_and_checks_host(data):
    """127.0.0.2 is loopback but not one of the local names: it stands in for a network interface."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "treeplay.orchestrator.cli", "serve", "--db", data.url, "--host", "127.0.0.2",
           "--port", str(port), "--allow-host", "inspect.example"]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        lines = [server.stderr.readline() for _ in range(3)]
        assert lines[0].startswith("warning: binding 127.0.0.2") and "token" in lines[0]
        shown = next(line for line in lines if "?token=" in line)
        token = shown.split("?token=", 1)[1].split()[0]
        assert len(token) >= 16 and "inspect.example" in shown
        base = f"http://127.0.0.2:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                first = httpx.get(f"{base}/api/runs", timeout=2)
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, "treeplay serve did not come up"
                time.sleep(0.2)
        assert first.status_code == 401 and data.run_name not in first.text
        assert httpx.get(f"{base}/", timeout=5).status_code == 401
        with httpx.Client(base_url=base, timeout=5) as c:
            assert c.get(f"/?token={token}", follow_redirects=True).status_code == 200
            assert [r["name"] for r in c.get("/api/runs").json()] == [data.run_name]  # by cookie now
            assert c.get("/api/runs", headers={"Host": "attacker.example"}).status_code == 400
            assert c.get("/api/runs", headers={"Host": f"inspect.example:{port}"}).status_code == 200
        authed = httpx.get(f"{base}/api/runs", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert authed.status_code == 200
    finally:
        server.terminate()
        server.communicate(timeout=20)


def test_serve_rejects_a_bad_token_or_allowed_host(data):
    result = cli("serve", "--db", data.url, "--token", "short", code=2)
    assert result.stderr.strip().startswith("error: --token must be at least 16 characters")
    result = cli("serve", "--db", data.url, "--allow-host", "http://x/", code=2)
    assert result.stderr.strip() == "error: --allow-host 'http://x/' is not a host name (give a name or address, no scheme or path)"


def test_status_shows_which_weights_versions_each_iterations_data_came_from(tmp_path):
    """A pipelined run's iterations train on data from more than one version; ``treeplay status``
    (table and JSON) and the inspector's iteration rows say which, with their task counts."""
    from treeplay.orchestrator import inspector

    url = f"sqlite:///{tmp_path}/store.db"
    with open_store(url) as store:
        run_id = queries.start_run(store, "piped", {})
        for index, versions in enumerate([{"0": 48}, {"0": 40, "1": 8}, {"1": 30, "2": 2, "kept": 16}]):
            queries.start_iteration(store, run_id, index, index)
            queries.finish_iteration(store, run_id, index, metrics={"rollout/data_versions": versions})
        queries.start_iteration(store, run_id, 3, 2)  # still running: nothing to say yet
        rows = [inspector.iteration_row(it) for it in queries.list_iterations(store, run_id)]
    assert [r["data_versions"] for r in rows] == [{"0": 48}, {"0": 40, "1": 8}, {"1": 30, "2": 2, "kept": 16}, {}]
    shown = json.loads(cli("status", "piped", "--db", url, "--json").stdout)
    assert [it["data_versions"] for it in shown["iterations"]] == [r["data_versions"] for r in rows]
    table = cli("status", "piped", "--db", url).stdout
    assert "data from" in table and "v0:40 v1:8" in table and "v1:30 v2:2 kept:16" in table
