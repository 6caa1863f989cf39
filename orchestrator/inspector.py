"""The inspector: what a run left in the store, read back for people and for other tools.

Everything here only reads the store. The same plain-dict views feed three front ends:

- the terminal (``treeplay runs``, ``treeplay tree show``, ``treeplay pairs``; ``--json`` prints the
  dicts, otherwise rich tables and trees are drawn),
- the web page (``orchestrator/web/app.py`` returns these dicts as its JSON API),
- exports (``treeplay export pairs`` in TRL's preference format or as a Hugging Face dataset on disk,
  ``treeplay export tree`` as node-link JSON, GraphML or DOT via ``PreferenceTree``).

Model text is untrusted: the terminal renders it as ``rich.text.Text`` (never parsed as markup), with
control characters and Unicode bidirectional controls shown as visible escapes, and the web page
inserts it only as DOM text. A run's config is shown only through ``store.redact`` (no credentials).

    from treeplay.orchestrator import inspector
    store = inspector.open_for_reading("sqlite:///runs/treeplay.db")
    inspector.node_detail(store, 42)["text"]     # prompt + steps from the root down to node 42
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from treeplay.agents.base import transcript
from treeplay.store import queries
from treeplay.store.database import Store, StoreError, open_store
from treeplay.store.records import PAIR_SOURCES, NodeRecord, PairRecord, jsonable
from treeplay.store.redact import redact

if TYPE_CHECKING:
    from rich.tree import Tree as RichTree

PAIR_FORMATS = ("trl-jsonl", "hf-dataset")
TREE_FORMATS = ("json", "graphml", "dot")


def open_for_reading(url: str) -> Store:
    """Open an existing store (never creates or migrates one).

    Raises:
        StoreError: A bad URL, a missing file, or a database without treeplay's schema.
    """
    if url.startswith("sqlite:///") and url != "sqlite://":
        path = Path(url[len("sqlite:///") :].split("?")[0])
        if str(path) not in ("", ":memory:") and not path.exists():
            raise StoreError(f"no store at {url} (the file {path} does not exist)")
    return open_store(url, create=False)


def find_run(store: Store, ref: str | int) -> queries.RunInfo:
    """A run by id (digits) or name.

    Raises:
        StoreError: No such run.
    """
    if isinstance(ref, str) and ref.isdigit():
        try:
            return queries.get_run(store, int(ref))
        except StoreError:
            pass  # a run may be *named* "7"
    return queries.get_run(store, ref)


def parse_id(text: str, what: str) -> int:
    """An integer id typed by a user, or a StoreError naming ``what``."""
    try:
        return int(text)
    except ValueError:
        raise StoreError(f"{what} must be a number, got {text!r}") from None


# ----------------------------------------------------------------------------------------------
# Runs


def run_summary(info: queries.RunInfo) -> dict[str, Any]:
    """A run without its config."""
    return jsonable(
        {
            "id": info.id,
            "name": info.name,
            "status": info.status,
            "created": info.created,
            "finished": info.finished,
        }
    )


def list_runs(store: Store) -> list[dict[str, Any]]:
    """Every run (oldest first), each with its iteration count and latest greedy accuracy."""
    out = []
    for info in queries.list_runs(store):
        iterations = queries.list_iterations(store, info.id)
        latest = next((it.metrics for it in reversed(iterations) if it.metrics), None) or {}
        row = run_summary(info)
        row.update(iterations=len(iterations), accuracy=jsonable(latest.get("eval/accuracy_greedy")))
        out.append(row)
    return out


# Where the loop records, in a finished iteration's row, which weights versions its data came from:
# {"<version>": tasks rolled out on it, "kept": tasks written before a resume} (orchestrator/loop.py).
DATA_VERSIONS = "rollout/data_versions"


def data_versions(it: queries.IterationInfo) -> dict[str, int]:
    """The weights versions an iteration's data came from, with their task counts ({} until the
    iteration is finished, or for a run written by an older treeplay)."""
    found = (it.metrics or {}).get(DATA_VERSIONS)
    return dict(found) if isinstance(found, dict) else {}


def data_versions_text(it: queries.IterationInfo) -> str:
    """``data_versions`` in a few characters: "v3", or "v3:80 v4:48" when the data is mixed."""
    found = data_versions(it)
    if len(found) == 1 and "kept" not in found:
        return f"v{next(iter(found))}"
    return " ".join(f"{'' if k == 'kept' else 'v'}{k}:{n}" for k, n in found.items())


def iteration_row(it: queries.IterationInfo) -> dict[str, Any]:
    """An iteration with its metrics and timings, and the weights versions its data came from."""
    return jsonable(
        {
            "index": it.index,
            "status": it.status,
            "policy_version": it.policy_version,
            "data_versions": data_versions(it),
            "tasks": it.n_tasks,
            "started": it.started,
            "finished": it.finished,
            "seconds": (it.finished - it.started).total_seconds() if it.finished else None,
            "metrics": it.metrics or {},
            "timings": it.timings or {},
        }
    )


def run_detail(store: Store, ref: str | int) -> dict[str, Any]:
    """A run with its config, iterations, per-iteration metric series, run-wide metrics and row counts."""
    info = find_run(store, ref)
    series = queries.metric_series(store, info.id)
    detail = run_summary(info)
    detail.update(
        # Stored configs are already redacted; redacting again costs nothing and keeps it so.
        config=jsonable(redact(info.config)),
        iterations=[iteration_row(it) for it in queries.list_iterations(store, info.id)],
        metrics={name: [[i, v] for i, v in points] for name, points in jsonable(series).items()},
        run_metrics=jsonable(queries.run_metrics(store, info.id)),
        counts=queries.counts(store, info.id),
    )
    return detail


def tree_summary(t: queries.TreeSummary) -> dict[str, Any]:
    """A tree without its nodes."""
    return jsonable(dataclasses.asdict(t))


# ----------------------------------------------------------------------------------------------
# Nodes and trees


def _pair_marks(pairs: list[PairRecord]) -> tuple[dict[int, int], dict[int, int]]:
    """How often each node id is the chosen / the rejected side of a pair."""
    chosen: dict[int, int] = {}
    rejected: dict[int, int] = {}
    for p in pairs:
        if p.chosen_node is not None:
            chosen[p.chosen_node] = chosen.get(p.chosen_node, 0) + 1
        if p.rejected_node is not None:
            rejected[p.rejected_node] = rejected.get(p.rejected_node, 0) + 1
    return chosen, rejected


def node_dict(
    node: NodeRecord,
    n_children: int | None = None,
    marks: tuple[dict[int, int], dict[int, int]] | None = None,
) -> dict[str, Any]:
    """A node's statistics and step text (the stats ``PreferenceTree`` keeps in ``info`` are lifted out)."""
    info = dict(node.info or {})
    chosen, rejected = marks or ({}, {})
    return jsonable(
        {
            "id": node.db_id,
            "parent": node.parent_key,
            "step": node.step,
            "observation": info.pop("observation", ""),
            "depth": node.depth,
            "visits": node.visits,
            "value": node.value,
            "prior": node.prior,
            "reward": node.reward,
            "terminal": node.terminal,
            "correct": node.correct,
            "selected": node.selected,
            "error": node.error,
            "policy_version": node.policy_version,
            "n_children": n_children,
            "chosen": chosen.get(node.db_id, 0),
            "rejected": rejected.get(node.db_id, 0),
            "info": info,
        }
    )


def pair_dict(p: PairRecord) -> dict[str, Any]:
    """A pair with its provenance (node ids link back into the tree it came from)."""
    return jsonable(
        {
            "id": p.db_id,
            "iteration": p.iteration,
            "task_id": p.task_id,
            "source": p.source,
            "prompt": p.prompt,
            "chosen": p.chosen,
            "rejected": p.rejected,
            "margin": p.margin,
            "weight": p.weight,
            "label_smoothing": p.label_smoothing,
            "chosen_node": p.chosen_node,
            "rejected_node": p.rejected_node,
            "chosen_visits": p.chosen_visits,
            "rejected_visits": p.rejected_visits,
            "info": p.info,
        }
    )


def node_children(store: Store, node_id: int) -> dict[str, Any]:
    """A node and its direct children (each with its own child count, so a viewer can expand lazily);
    nodes that are the chosen or rejected side of a pair say so."""
    view = queries.get_node(store, node_id)
    kids = queries.child_nodes(store, node_id)
    marks = _pair_marks(queries.pairs_of_nodes(store, [node_id, *(k.node.db_id for k in kids)]))
    return {
        "tree_id": view.tree_id,
        "node": node_dict(view.node, view.n_children, marks),
        "children": [node_dict(k.node, k.n_children, marks) for k in kids],
    }


def tree_head(store: Store, tree_id: int) -> dict[str, Any]:
    """A tree's summary, its root and the root's children (the first screen of a tree view)."""
    summary = tree_summary(queries.get_tree(store, tree_id))
    root = queries.tree_root(store, tree_id)
    return {"tree": summary, **node_children(store, root.node.db_id)}


def node_detail(store: Store, node_id: int) -> dict[str, Any]:
    """Everything about one node: the full text the policy continued there, the path to it, its
    children, the judgments of it, the pairs it takes part in and the pairs made among its children."""
    head = node_children(store, node_id)
    tree = queries.get_tree(store, head["tree_id"])
    path = queries.node_path(store, node_id)
    steps = [(n.step, (n.info or {}).get("observation", "")) for n in path[1:]]
    own = queries.pairs_of_nodes(store, [node_id])
    child_ids = {c["id"] for c in head["children"]}
    among = [
        p
        for p in queries.pairs_of_nodes(store, list(child_ids))
        if p.chosen_node in child_ids and p.rejected_node in child_ids
    ]
    info = head["node"]["info"]
    return {
        **head,
        "tree": tree_summary(tree),
        "path": [n.db_id for n in path],
        "text": transcript(tree.prompt, steps),
        "rubric": info.get("rubric"),
        "judgments": jsonable(queries.judgments_for(store, "node", node_id)),
        "pairs": [pair_dict(p) for p in own],
        "child_pairs": [pair_dict(p) for p in among],
    }


def tree_nested(store: Store, tree_id: int, depth: int | None = None) -> dict[str, Any]:
    """A whole tree as nested dicts (children under ``children``), cut below ``depth`` if given; a
    cut node keeps its ``n_children``."""
    record = queries.load_tree(store, tree_id)
    marks = _pair_marks(queries.tree_pairs(store, tree_id))
    kids: dict[int | None, list[NodeRecord]] = {}
    for n in record.nodes:
        kids.setdefault(n.parent_key, []).append(n)

    def nest(n: NodeRecord) -> dict[str, Any]:
        d = node_dict(n, len(kids.get(n.key, [])), marks)
        if depth is None or n.depth < depth:
            d["children"] = [nest(c) for c in kids.get(n.key, [])]
        return d

    return {"tree": tree_summary(queries.get_tree(store, tree_id)), "root": nest(kids[None][0])}


# C0/C1 controls, and the Unicode bidirectional controls (embeddings, overrides, isolates, marks) that
# can make a line display in an order other than the one it is read in.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def terminal_safe(text: str) -> str:
    """``text`` with newlines as ⏎ and other control characters (terminal escape sequences, bells,
    carriage returns) as visible ``\\xNN``, and bidirectional controls (U+202E...) as ``\\uNNNN``, so
    model text cannot move the cursor, restyle a terminal or reorder what a line shows.
    Use with ``rich.text.Text``, which is never parsed as markup."""
    return _CONTROL.sub(lambda m: _escape(m.group()), text.replace("\n", "⏎").replace("\t", " "))


def _node_label(d: dict[str, Any], root: bool) -> Any:
    from rich.text import Text

    label = Text()
    if d["selected"]:
        label.append("● ", style="bold cyan")
    if d["chosen"]:
        label.append("✓chosen ", style="bold green")
    if d["rejected"]:
        label.append("✗rejected ", style="bold red")
    step = "(prompt)" if root else terminal_safe(d["step"]) or "(empty step)"
    style = "bold" if d["selected"] else ""
    if d["error"]:
        style += " orange3"
    elif d["terminal"]:
        style += " green" if d["correct"] else " red"
    label.append(step, style=style.strip())  # Text: never parsed as markup
    label.append(f"  N={d['visits']} Q={_num(d['value'])} r={_num(d['reward'])}", style="dim")
    if d["terminal"]:
        label.append(" ✔" if d["correct"] else " ✘", style="green" if d["correct"] else "red")
    if d["error"]:
        label.append(f" error: {terminal_safe(d['error'])}", style="orange3")
    return label


def _num(v: float | None) -> str:
    return "nan" if v is None else f"{v:+.3f}"


def tree_renderable(nested: dict[str, Any]) -> RichTree:
    """A rich Tree of ``tree_nested``'s output: step text, N, Q, reward; ● the selected path,
    ✓/✗ the chosen/rejected sides of pairs, green/red correct/wrong terminals."""
    from rich.text import Text
    from rich.tree import Tree

    t = nested["tree"]
    head = Text.assemble(
        (f"tree {t['id']}", "bold"),
        f"  run {t['run_id']} iteration {t['iteration']} task ",
        (terminal_safe(t["task_id"]), "italic"),
        f"  {t['n_nodes']} nodes, depth {t['max_depth']}\n",
        (terminal_safe(t["prompt"].rstrip("\n")), "bold"),
    )
    out = Tree(head)

    def add(branch: Tree, d: dict[str, Any], root: bool) -> None:
        node = branch.add(_node_label(d, root))
        if "children" not in d and d["n_children"]:
            node.add(Text(f"… {d['n_children']} more below (raise --depth)", style="dim"))
        for c in d.get("children", []):
            add(node, c, False)

    add(out, nested["root"], True)
    return out


def runs_table(rows: list[dict[str, Any]], title: str = "runs") -> Any:
    """A rich Table of ``list_runs``' output."""
    from rich.table import Table
    from rich.text import Text

    t = Table("id", "name", "status", "iterations", "greedy acc", "created", title=title)
    for r in rows:
        acc = "" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        t.add_row(
            str(r["id"]),
            Text(terminal_safe(r["name"])),
            r["status"],
            str(r["iterations"]),
            acc,
            r["created"][:19],
        )
    return t


def pairs_table(rows: list[dict[str, Any]]) -> Any:
    """A rich Table of ``list_pairs``' output: the prompt's last line, chosen (green), rejected (red)."""
    from rich.table import Table
    from rich.text import Text

    t = Table(
        "id", "it", "tree", "source", "margin", "nodes", "prompt", "chosen", "rejected", title=f"{len(rows)} pairs"
    )
    for p in rows:
        nodes = f"{p['chosen_node']}>{p['rejected_node']}" if p["chosen_node"] is not None else ""
        margin = "" if p["margin"] is None else f"{p['margin']:.2f}"
        tail = p["prompt"].rstrip("\n").rsplit("\n", 1)[-1]
        t.add_row(
            str(p["id"]),
            str(p["iteration"]),
            "" if p.get("tree_id") is None else str(p["tree_id"]),
            p["source"],
            margin,
            nodes,
            Text(terminal_safe(tail)),
            Text(terminal_safe(p["chosen"].rstrip("\n")), style="green"),
            Text(terminal_safe(p["rejected"].rstrip("\n")), style="red"),
        )
    return t


# ----------------------------------------------------------------------------------------------
# Pairs and exports


def list_pairs(
    store: Store, ref: str | int, iteration: int | None = None, source: str | None = None
) -> list[dict[str, Any]]:
    """A run's pairs (optionally of one iteration / source) as dicts, each with the id of the tree
    its nodes are in (``tree_id``; None for a pair that came from no tree)."""
    if source is not None and source not in PAIR_SOURCES:
        raise StoreError(f"unknown pair source {source!r}; known: {', '.join(PAIR_SOURCES)}")
    info = find_run(store, ref)
    rows = [pair_dict(p) for p in queries.list_pairs(store, info.id, iteration, source)]
    node = {r["id"]: r["chosen_node"] if r["chosen_node"] is not None else r["rejected_node"] for r in rows}
    trees = queries.trees_of_nodes(store, [n for n in node.values() if n is not None])
    for r in rows:
        r["tree_id"] = trees.get(node[r["id"]]) if node[r["id"]] is not None else None
    return rows


def trl_rows(pairs: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Pairs in TRL's standard (not conversational) preference format: prompt, chosen, rejected."""
    return [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]


def export_pairs(
    store: Store,
    ref: str | int,
    fmt: str,
    out: str | None = None,
    iteration: int | None = None,
    source: str | None = None,
) -> tuple[int, str | None]:
    """Write a run's pairs for TRL: ``trl-jsonl`` (one JSON object a line; to ``out`` or, if None,
    returned as text) or ``hf-dataset`` (``datasets.Dataset.save_to_disk(out)``, ``out`` required).

    Returns:
        (number of pairs, the JSONL text when ``out`` is None else None)

    Raises:
        StoreError: Unknown run, source or format, or hf-dataset without ``out``.
    """
    if fmt not in PAIR_FORMATS:
        raise StoreError(f"unknown pair format {fmt!r}; known: {', '.join(PAIR_FORMATS)}")
    if fmt == "hf-dataset" and not out:
        raise StoreError("--format hf-dataset writes a folder: give it with --out")
    rows = trl_rows(list_pairs(store, ref, iteration, source))
    if fmt == "hf-dataset":
        from datasets import Dataset, Features, Value

        features = Features({k: Value("string") for k in ("prompt", "chosen", "rejected")})
        Dataset.from_list(rows, features=features).save_to_disk(out)
        return len(rows), None
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if out is None:
        return len(rows), text
    Path(out).write_text(text, encoding="utf-8")
    return len(rows), None


def export_tree(store: Store, tree_id: int, fmt: str) -> str:
    """A stored tree as node-link JSON, GraphML or Graphviz DOT (``PreferenceTree``'s exports)."""
    from treeplay.search.tree import PreferenceTree

    if fmt not in TREE_FORMATS:
        raise StoreError(f"unknown tree format {fmt!r}; known: {', '.join(TREE_FORMATS)}")
    tree = PreferenceTree.from_record(queries.load_tree(store, tree_id))
    if fmt == "json":
        return tree.to_json(indent=1) + "\n"
    return tree.to_graphml() if fmt == "graphml" else tree.to_dot()
