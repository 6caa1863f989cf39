"""Preference trees: the partial solutions a search explored, with the statistics it kept on each.

A ``PreferenceTree`` wraps a ``networkx.DiGraph``. Node 0 is the root (the bare prompt); every other
node is one more reasoning step (an environment action) below its parent, so the path root→node is a
partial solution and ``tree.text(node)`` is exactly what the policy was asked to continue there
(rendered with ``agents.base.transcript``).

Node attributes (all nodes carry all of them):

========== =====================================================================================
step        text of the step leading into the node ("" at the root)
observation what the environment returned for that step ("" if nothing)
depth       steps from the root
visits      N, backups through the node
value       Q, the action value of the step leading here (r + γ·V)
V           state value: visit-weighted mean of the children's Q
estimate    v, the node's value estimate when it was scored (self-evaluation and outcome)
prior       p, length-normalised policy probability of the step
reward      r, per-edge reward = value increment v(node) − v(parent)
self_eval   C, the policy's probability that the partial solution is correct (None if not asked)
env_reward  the environment's reward for the step
terminal    the episode ended here (environment done, an error, or the depth cap)
correct     outcome of a terminal node (None elsewhere)
selected    on the committed (receding-horizon) path
commit_visits, commit_value  N and Q of the node when the search committed its parent's next step
            (the statistics MCTS-DPO's pairs are made from); None if that never happened
policy_version  version of the policy that sampled the step
logprob     Σ log π of the step's tokens; ``tokens`` their count
token_ids   the policy's token ids of the step and its newline (at the root: of the prompt), when
            the search ran token in, token out (``agents.base.TokenIds``); else None
observation_ids  token ids of the observation's text (as ``step_segments`` renders it), or None
error       text of what went wrong here (empty step, environment exception, ...), else None
info        free-form extras
========== =====================================================================================

The tree round-trips through ``store.records.TreeRecord`` (``to_record`` / ``from_record``) and exports
to node-link JSON, GraphML and Graphviz DOT.

Example:
    >>> t = PreferenceTree("2+3\\n")
    >>> a = t.add_child(t.root, "=5", terminal=True, correct=True)
    >>> t.text(a)
    '2+3\\n=5\\n'
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any

import networkx as nx

from treeplay.agents.base import Segment, step_segments, transcript
from treeplay.store.records import NodeRecord, TreeRecord

# Attributes that NodeRecord has as columns; everything else of ours travels in NodeRecord.info.
_RECORD_FIELDS = (
    "step",
    "depth",
    "visits",
    "value",
    "prior",
    "reward",
    "terminal",
    "correct",
    "selected",
    "policy_version",
    "error",
)
# Our own extra statistics, flattened into NodeRecord.info next to the user's info.
_STAT_FIELDS = ("observation", "V", "estimate", "self_eval", "env_reward", "logprob", "tokens", "token_ids",
                "observation_ids", "commit_visits", "commit_value")


def _defaults() -> dict[str, Any]:
    return {
        "step": "",
        "observation": "",
        "depth": 0,
        "visits": 0,
        "value": 0.0,
        "V": 0.0,
        "estimate": 0.0,
        "prior": 1.0,
        "reward": 0.0,
        "self_eval": None,
        "env_reward": 0.0,
        "terminal": False,
        "correct": None,
        "selected": False,
        "commit_visits": None,
        "commit_value": None,
        "policy_version": 0,
        "logprob": 0.0,
        "tokens": 0,
        "token_ids": None,
        "observation_ids": None,
        "error": None,
        "info": {},
    }


class PreferenceTree:
    """A tree of partial solutions to one prompt.

    Args:
        prompt: The task prompt (the root's text).
        task_id: Id of the task, kept for provenance.
        environment: Name of the environment the steps were taken in.
        policy_version: Version of the policy that grew the tree (the root's version).
        info: Tree-level extras (search config, why it stopped, ...).
    """

    def __init__(
        self,
        prompt: str,
        task_id: str = "",
        environment: str = "",
        policy_version: int = 0,
        info: dict[str, Any] | None = None,
        *,
        _empty: bool = False,
    ) -> None:
        self.prompt = prompt
        self.task_id = task_id
        self.environment = environment
        self.policy_version = policy_version
        self.info: dict[str, Any] = dict(info or {})
        self.graph = nx.DiGraph()
        self.root: int = 0
        self._next_key = 0
        if not _empty:
            self.add_root(policy_version=policy_version)

    # ----------------------------------------------------------------------------- building
    def add_root(self, **attrs: Any) -> int:
        """Create the root node (key 0 unless the tree was built from a record).

        Raises:
            ValueError: If the tree already has a root.
        """
        if self.graph.number_of_nodes():
            raise ValueError("tree already has a root")
        key = self._next_key
        self._next_key += 1
        self.graph.add_node(key, **{**_defaults(), **attrs, "depth": 0, "step": ""})
        self.root = key
        return key

    def add_child(self, parent: int, step: str, **attrs: Any) -> int:
        """Add a node one step below ``parent`` and return its key.

        Args:
            parent: Key of an existing node.
            step: The step's text.
            **attrs: Any node attribute (see the module docstring).

        Raises:
            ValueError: If ``parent`` is not in the tree.
        """
        if parent not in self.graph:
            raise ValueError(f"parent {parent} is not a node of this tree")
        key = self._next_key
        self._next_key += 1
        data = {**_defaults(), **attrs, "step": step, "depth": self.graph.nodes[parent]["depth"] + 1}
        data["info"] = dict(data.get("info") or {})
        self.graph.add_node(key, **data)
        self.graph.add_edge(parent, key)
        return key

    # ----------------------------------------------------------------------------- reading
    def __len__(self) -> int:
        return self.graph.number_of_nodes()

    def __contains__(self, key: object) -> bool:
        return key in self.graph

    def __getitem__(self, key: int) -> dict[str, Any]:
        """The attribute dict of a node (live: writing to it updates the tree)."""
        return self.graph.nodes[key]

    def nodes(self) -> Iterator[int]:
        """Node keys in creation order."""
        return iter(sorted(self.graph.nodes))

    def parent(self, key: int) -> int | None:
        preds = list(self.graph.predecessors(key))
        return preds[0] if preds else None

    def children(self, key: int) -> list[int]:
        """Children of ``key`` in creation order."""
        return sorted(self.graph.successors(key))

    def siblings(self, key: int, include_self: bool = False) -> list[int]:
        """Other children of ``key``'s parent (the alternatives to its step)."""
        p = self.parent(key)
        if p is None:
            return [key] if include_self else []
        return [c for c in self.children(p) if include_self or c != key]

    def is_leaf(self, key: int) -> bool:
        return self.graph.out_degree(key) == 0

    def leaves(self) -> list[int]:
        return [n for n in self.nodes() if self.is_leaf(n)]

    def path(self, key: int) -> list[int]:
        """Node keys from the root down to ``key`` (both included)."""
        out = [key]
        while (p := self.parent(out[-1])) is not None:
            out.append(p)
        return out[::-1]

    def steps(self, key: int) -> list[tuple[str, str]]:
        """(action, observation) of every step from the root to ``key``."""
        return [(self[n]["step"], self[n]["observation"]) for n in self.path(key)[1:]]

    def text(self, key: int) -> str:
        """The policy context at ``key``: the prompt and the steps so far (``agents.base.transcript``)."""
        return transcript(self.prompt, self.steps(key))

    def continuation(self, key: int, start: int) -> str:
        """Text the steps from just below ``start`` down to ``key`` add to ``text(start)``."""
        return "".join(text for text, _ in self.continuation_segments(key, start))

    def continuation_segments(self, key: int, start: int) -> list[Segment]:
        """``continuation(key, start)`` as segments marked policy-written (actions) or not (observations).

        Raises:
            ValueError: If ``start`` is not on the path from the root to ``key``.
        """
        path = self.path(key)
        if start not in path:
            raise ValueError(f"node {start} is not an ancestor of node {key}")
        below = path[path.index(start) + 1 :]
        return step_segments([(self[n]["step"], self[n]["observation"]) for n in below])

    def token_context(self, key: int) -> list[int] | None:
        """The token ids of ``text(key)`` as the policy was given them: the prompt's ids, then each
        step's and observation's ids in order. None when a node on the path has no ids."""
        segments = self.continuation_token_segments(key, self.root)
        root_ids = self[self.root]["token_ids"]
        if segments is None or root_ids is None:
            return None
        return list(root_ids) + [t for ids, _ in segments for t in ids]

    def continuation_token_segments(self, key: int, start: int) -> list[tuple[list[int], bool]] | None:
        """``continuation_segments(key, start)`` as token ids: ``(ids, written_by_policy)`` per segment,
        the same segments in the same order. None when a node below ``start`` has no ids."""
        path = self.path(key)
        if start not in path:
            raise ValueError(f"node {start} is not an ancestor of node {key}")
        out: list[tuple[list[int], bool]] = []
        for n in path[path.index(start) + 1 :]:
            d = self[n]
            if d["token_ids"] is None or (d["observation"] and d["observation_ids"] is None):
                return None
            out.append((list(d["token_ids"]), True))
            if d["observation"]:
                out.append((list(d["observation_ids"]), False))
        return out

    def response_tokens(self, parent: int, ends: list[int]) -> dict[str, Any] | None:
        """The token ids of responses that branch at ``parent``, for a record's ``info["tokens"]``.

        ``{"prompt": token_context(parent), "responses": [ids per end], "spans": [[[start, end), ...]
        per end]}``: each response is the path from ``parent`` down to its end node, its spans are the
        token ranges the policy wrote (its steps; observations are context). Learners train on these
        ids instead of re-tokenizing the record's text. None when the tree has no ids there.
        """
        prompt = self.token_context(parent)
        if prompt is None:
            return None
        responses, spans = [], []
        for end in ends:
            segments = self.continuation_token_segments(end, parent)
            if segments is None:
                return None
            ids: list[int] = []
            mine: list[list[int]] = []
            for seg, policy in segments:
                if policy and seg:
                    if mine and mine[-1][1] == len(ids):
                        mine[-1][1] += len(seg)
                    else:
                        mine.append([len(ids), len(ids) + len(seg)])
                ids.extend(seg)
            responses.append(ids)
            spans.append(mine)
        return {"prompt": prompt, "responses": responses, "spans": spans}

    def selected_path(self) -> list[int]:
        """The committed path: the root and then, at each level, the child marked ``selected``."""
        out = [self.root]
        while True:
            nxt = [c for c in self.children(out[-1]) if self[c]["selected"]]
            if not nxt:
                return out
            out.append(nxt[0])

    def final_node(self) -> int:
        """Last node of the selected path."""
        return self.selected_path()[-1]

    def solved(self) -> bool:
        """Whether the selected path ends in a terminal node whose outcome is correct."""
        end = self[self.final_node()]
        return bool(end["terminal"] and end["correct"])

    def subtree(self, key: int) -> list[int]:
        """``key`` and all its descendants."""
        return [key, *sorted(nx.descendants(self.graph, key))]

    def subtree_stats(self, key: int | None = None) -> dict[str, Any]:
        """Size and outcome counts of the subtree under ``key`` (the whole tree by default)."""
        key = self.root if key is None else key
        sub = self.subtree(key)
        base = self[key]["depth"]
        return {
            "nodes": len(sub),
            "leaves": sum(1 for n in sub if self.is_leaf(n)),
            "depth": max(self[n]["depth"] for n in sub) - base,
            "terminal": sum(1 for n in sub if self[n]["terminal"]),
            "correct": sum(1 for n in sub if self[n]["correct"] is True),
            "errors": sum(1 for n in sub if self[n]["error"]),
            "visits": self[key]["visits"],
            "max_branching": max((self.graph.out_degree(n) for n in sub), default=0),
        }

    # ----------------------------------------------------------------------------- checks
    def validate(self) -> None:
        """Check the graph is one tree rooted at ``self.root``.

        Raises:
            ValueError: On a cycle, a node with two parents, a missing root, unreachable nodes or
                inconsistent depths.
        """
        g = self.graph
        if self.root not in g:
            raise ValueError("tree has no root node")
        if not nx.is_directed_acyclic_graph(g):
            raise ValueError(f"tree has a cycle: {nx.find_cycle(g)}")
        for n in g.nodes:
            indeg = g.in_degree(n)
            if n == self.root and indeg:
                raise ValueError("root has a parent")
            if n != self.root and indeg != 1:
                raise ValueError(f"node {n} has {indeg} parents (a tree node has exactly one)")
        reach = nx.descendants(g, self.root) | {self.root}
        if len(reach) != g.number_of_nodes():
            raise ValueError(f"nodes not reachable from the root: {sorted(set(g.nodes) - reach)}")
        for u, v in g.edges:
            if g.nodes[v]["depth"] != g.nodes[u]["depth"] + 1:
                raise ValueError(
                    f"node {v} has depth {g.nodes[v]['depth']} under depth {g.nodes[u]['depth']}"
                )

    # ----------------------------------------------------------------------------- records
    def to_record(
        self,
        task_id: str | None = None,
        prompt: str | None = None,
        environment: str | None = None,
    ) -> TreeRecord:
        """The tree as a ``TreeRecord`` for the store (node keys are the local keys).

        Args:
            task_id: Overrides ``self.task_id``.
            prompt: Overrides ``self.prompt``.
            environment: Overrides ``self.environment``.
        """
        nodes = []
        for n in self.nodes():
            d = self[n]
            info = {**(d.get("info") or {}), **{k: d[k] for k in _STAT_FIELDS}}
            nodes.append(
                NodeRecord(
                    key=n,
                    parent_key=self.parent(n),
                    info=info,
                    **{k: d[k] for k in _RECORD_FIELDS},
                )
            )
        return TreeRecord(
            task_id=self.task_id if task_id is None else task_id,
            prompt=self.prompt if prompt is None else prompt,
            nodes=nodes,
            environment=self.environment if environment is None else environment,
            policy_version=self.policy_version,
            info=dict(self.info),
        )

    @classmethod
    def from_record(cls, record: TreeRecord) -> PreferenceTree:
        """Rebuild a tree from a ``TreeRecord`` (written by ``to_record`` or read from the store).

        Node keys are the record's ``key`` values; when a record read from the store has database
        ids as keys that is fine too, as long as parents refer to keys of the same record.

        Raises:
            ValueError: On duplicate keys, a parent key that is not in the record, no root or more
                than one root, or a cycle.
        """
        tree = cls(
            record.prompt,
            task_id=record.task_id,
            environment=record.environment,
            policy_version=record.policy_version,
            info=record.info,
            _empty=True,
        )
        keys = [n.key for n in record.nodes]
        if len(set(keys)) != len(keys):
            raise ValueError("tree record has duplicate node keys")
        known = set(keys)
        roots = [n for n in record.nodes if n.parent_key is None]
        if len(roots) != 1:
            raise ValueError(f"tree record has {len(roots)} roots (expected exactly one)")
        g = tree.graph
        for n in record.nodes:
            if n.parent_key is not None and n.parent_key not in known:
                raise ValueError(f"node {n.key} has a dangling parent {n.parent_key}")
            info = dict(n.info or {})
            data = _defaults()
            data.update({k: getattr(n, k) for k in _RECORD_FIELDS})
            data.update({k: info.pop(k) for k in _STAT_FIELDS if k in info})
            data["info"] = info
            g.add_node(n.key, **data)
        for n in record.nodes:
            if n.parent_key is not None:
                g.add_edge(n.parent_key, n.key)
        tree.root = roots[0].key
        tree._next_key = max(keys) + 1
        tree.validate()
        return tree

    # ----------------------------------------------------------------------------- exports
    def to_json(self, indent: int | None = None) -> str:
        """Node-link JSON (``networkx.node_link_data``) with the prompt and tree info in ``graph``."""
        g = self.graph.copy()
        g.graph.update(
            prompt=self.prompt,
            task_id=self.task_id,
            environment=self.environment,
            policy_version=self.policy_version,
            root=self.root,
            info=self.info,
        )
        return json.dumps(nx.node_link_data(g, edges="links"), indent=indent, default=str)

    @classmethod
    def from_json(cls, text: str) -> PreferenceTree:
        """Inverse of ``to_json``."""
        data = json.loads(text)
        g = nx.node_link_graph(data, edges="links")
        meta = dict(g.graph)
        tree = cls(
            meta.get("prompt", ""),
            task_id=meta.get("task_id", ""),
            environment=meta.get("environment", ""),
            policy_version=meta.get("policy_version", 0),
            info=meta.get("info"),
            _empty=True,
        )
        g.graph.clear()
        tree.graph = g
        tree.root = meta.get("root", 0)
        tree._next_key = max(g.nodes, default=-1) + 1
        tree.validate()
        return tree

    def to_graphml(self) -> str:
        """GraphML text. None-valued attributes are left out; dicts are stored as JSON strings; characters
        XML 1.0 cannot carry (control characters) are written as ``\\xNN``."""
        g = nx.DiGraph(
            prompt=_xml_safe(self.prompt),
            task_id=_xml_safe(self.task_id),
            environment=_xml_safe(self.environment),
        )
        for n, d in self.graph.nodes(data=True):
            flat = {}
            for k, v in d.items():
                if v is None:
                    continue
                if isinstance(v, (dict, list)):
                    v = json.dumps(v, default=str)
                flat[k] = _xml_safe(v) if isinstance(v, str) else v
            g.add_node(n, **flat)
        g.add_edges_from(self.graph.edges)
        buf = io.BytesIO()
        nx.write_graphml(g, buf)
        return buf.getvalue().decode("utf-8")

    def to_dot(self, max_label: int = 40) -> str:
        """Graphviz DOT text: one box per node labelled with its step and N/Q; the selected path in bold,
        correct terminals green, wrong ones red, errors orange."""
        lines = ["digraph preference_tree {", "  node [shape=box, fontname=monospace];"]
        for n in self.nodes():
            d = self[n]
            step = d["step"] if n != self.root else "(root)"
            if len(step) > max_label:
                step = step[: max_label - 1] + "…"
            label = f"{step}\nN={d['visits']} Q={d['value']:.3f}"
            attrs = [f'label="{_dot_escape(label)}"']
            if d["selected"]:
                attrs.append("penwidth=3")
            if d["error"]:
                attrs.append('color="orange"')
            elif d["terminal"] and d["correct"] is True:
                attrs.append('color="darkgreen"')
            elif d["terminal"]:
                attrs.append('color="red"')
            lines.append(f"  n{n} [{', '.join(attrs)}];")
        for u, v in sorted(self.graph.edges):
            lines.append(f"  n{u} -> n{v};")
        lines.append("}")
        return "\n".join(lines) + "\n"


_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_safe(text: str) -> str:
    """Replace characters XML 1.0 forbids by a visible ``\\xNN`` / ``\\uNNNN`` escape."""
    return _XML_BAD.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}", text
    )


def _dot_escape(text: str) -> str:
    """Escape text for a double-quoted DOT string (backslashes, quotes, newlines)."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "\\n")
