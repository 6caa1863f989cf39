"""A small real store for the inspector tests, built once per test session.

The tiny real model (HFEngine) searches a few ArithmeticEnv tasks with batched MCTS in two
iterations; the trees, their step pairs and ranked lists, and the iteration's measured search
metrics are written with ``store.queries`` exactly as the loop writes them. One tree also gets
hostile nodes (an HTML/script payload, rich markup, terminal escapes and a Unicode bidi override as step
text), a node judgment whose
rationale is HTML, a rubric in the node's info, and a "panel" pair that rejects the payload node:
model text is untrusted, and the inspector must show all of it as text.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

XSS_STEP = "<script>window.__xss=1</script><img src=x onerror=window.__xss=2>"
MARKUP_STEP = "[bold red]not markup[/] [link=file:///etc/passwd]click[/link]"
ESC_STEP = "\x1b[2J\x1b]0;pwned\x07cleared?"  # terminal escapes: clear screen, set window title
XSS_RATIONALE = "<b onmouseover=window.__xss=3>bold?</b> the step is <i>wrong</i>"
# Displayed as-is, RIGHT-TO-LEFT OVERRIDE would make this read "The answer is 42 ...".
BIDI_STEP = "The answer is \u202e24\u202c, checked \u2067twice\u2069"


@dataclass
class InspectStore:
    """Where the store is and the ids the tests look for."""

    url: str
    run_id: int
    run_name: str
    tree_ids: list[int]
    xss_tree: int
    xss_node: int
    markup_node: int
    panel_pair: int
    bidi_node: int


@functools.cache
def build_inspect_store(folder: Path, model_dir: Path) -> InspectStore:
    """Search, write and return the store (cached: every test module shares one)."""
    import torch

    from treeplay.agents.envs.arithmetic import ArithmeticEnv
    from treeplay.engines.hf import HFEngine
    from treeplay.search.mcts import search_many
    from treeplay.search.preferences import tree_result
    from treeplay.search.state import MCTSConfig
    from treeplay.store import queries
    from treeplay.store.database import open_store
    from treeplay.store.records import JudgmentRecord, PairRecord

    torch.set_num_threads(1)
    url = f"sqlite:///{folder / 'inspect.db'}"
    cfg = MCTSConfig(
        iterations=2,
        first_root_multiplier=2,
        root_width=3,
        width=2,
        depth_limit=2,
        max_step_tokens=10,
        self_eval=False,
        include_reference_steps=True,  # a random-init model needs the gold steps to ever be right
        seed=0,
    )
    engine = HFEngine(model_dir, seed=0)
    store = open_store(url)
    tree_ids: list[int] = []
    try:
        run_id = queries.start_run(store, "inspect-test", {"search": cfg.model_dump(), "tasks": 3})
        for iteration in range(2):
            tasks = ArithmeticEnv(ops=2, digits=1).tasks("train", 3, seed=iteration)
            queries.start_iteration(store, run_id, iteration, policy_version=engine.version)
            trees = search_many(tasks, lambda: ArithmeticEnv(ops=2, digits=1), engine, cfg)
            results = [
                tree_result(t, task, filter_incorrect=False) for t, task in zip(trees, tasks, strict=True)
            ]
            if iteration == 0:
                hostile = _add_hostile_nodes(trees[0], results[0], JudgmentRecord, PairRecord)
            receipts = [queries.write_task_result(store, run_id, iteration, r) for r in results]
            tree_ids += [r.tree_ids[0] for r in receipts]
            if iteration == 0:
                xss_tree = receipts[0].tree_ids[0]
                xss_node, markup_node, bidi_node = (receipts[0].node_ids[0][k] for k in hostile)
                panel_pair = receipts[0].pair_ids[-1]
            solved = sum(bool(t[t.final_node()]["correct"]) for t in trees) / len(trees)
            metrics = {
                "rollout/solved": solved,
                "rollout/nodes": float(sum(len(t) for t in trees)),
                "rollout/pairs": float(sum(len(r.pairs) for r in results)),
            }
            queries.log_metrics(store, run_id, iteration, metrics)
            queries.finish_iteration(store, run_id, iteration, metrics=metrics)
        queries.finish_run(store, run_id)
    finally:
        store.close()
        engine.close()
    return InspectStore(
        url, run_id, "inspect-test", tree_ids, xss_tree, xss_node, markup_node, panel_pair, bidi_node
    )


def _add_hostile_nodes(tree, result, judgment_type, pair_type) -> tuple[int, int, int]:
    """Add the payload, markup and bidi nodes to ``tree`` (already in ``result``: rebuild its record), a
    judgment of the payload node, and a panel pair that prefers a real node over it."""
    rubric = {"rubric": "<ul><li>1. answer is a number</li></ul>"}
    xss = tree.add_child(tree.root, XSS_STEP, terminal=True, correct=False, visits=1, value=-1.0, info=rubric)
    markup = tree.add_child(tree.root, MARKUP_STEP, visits=1, value=-0.5)
    tree.add_child(markup, ESC_STEP, terminal=True, correct=False)
    bidi = tree.add_child(tree.root, BIDI_STEP, visits=1, value=0.0)
    result.trees[0] = tree.to_record(environment=result.environment)
    result.judgments.append(
        judgment_type(judge="exact", score=0.0, target_kind="node", target_key=xss, rationale=XSS_RATIONALE)
    )
    good = tree.children(tree.root)[0]
    result.pairs.append(
        pair_type(
            prompt=tree.text(tree.root),
            chosen=tree.continuation(good, tree.root),
            rejected=tree.continuation(xss, tree.root),
            source="panel",
            margin=1.0,
            chosen_node=good,
            rejected_node=xss,
        )
    )
    return xss, markup, bidi
