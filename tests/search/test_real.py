"""Search with the tiny real model (HFEngine) on the real ArithmeticEnv, written to a real SQLite store."""

from __future__ import annotations

import pytest

from treeplay.agents.envs.arithmetic import ArithmeticEnv
from treeplay.search.mcts import search_many
from treeplay.search.preferences import step_pairs, tree_result
from treeplay.search.state import MCTSConfig
from treeplay.search.tree import PreferenceTree


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    import torch

    from treeplay.engines.hf import HFEngine

    torch.set_num_threads(1)
    eng = HFEngine(tiny_model_dir, seed=0)
    yield eng
    eng.close()


def test_real_search_writes_trees_and_yields_pairs(engine, tmp_path):
    from treeplay.store import queries
    from treeplay.store.database import open_store

    def env() -> ArithmeticEnv:
        return ArithmeticEnv(ops=2, digits=1)

    tasks = env().tasks("train", 4, seed=0)
    cfg = MCTSConfig(
        iterations=2,
        first_root_multiplier=2,
        root_width=4,
        width=2,
        depth_limit=2,
        max_step_tokens=10,
        self_eval=True,
        self_eval_sees_reference=True,
        include_reference_steps=True,  # a random-init model needs the gold steps to ever be right
        seed=0,
    )
    trees = search_many(tasks, env, engine, cfg)
    assert len(trees) == 4
    for tree, task in zip(trees, tasks, strict=True):
        tree.validate()
        assert tree.task_id == task.id and tree[tree.final_node()]["terminal"]
        assert tree.info["search"]["generate_calls"] == tree.info["search"]["waves"]
        assert all(tree[c]["self_eval"] is not None for c in tree.nodes() if c != tree.root and not tree[c]["error"])
        assert all(0.0 < tree[c]["prior"] <= 1.0 for c in tree.nodes() if c != tree.root and not tree[c]["error"])
    # the gold line is always a candidate, so every tree contains a correct path and gives pairs
    assert any(tree[n]["correct"] for tree in trees for n in tree.nodes())
    pairs = [p for t in trees for p in step_pairs(t, filter_incorrect=False)]
    assert pairs and all(p.margin > 0 for p in pairs)

    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        run_id = queries.start_run(store, "search-test", {"search": cfg.model_dump()})
        queries.start_iteration(store, run_id, 0, policy_version=engine.version)
        receipts = [
            queries.write_task_result(store, run_id, 0, tree_result(t, task, filter_incorrect=False))
            for t, task in zip(trees, tasks, strict=True)
        ]
        assert sum(len(r.pair_ids) for r in receipts) == len(pairs)
        for t, receipt in zip(trees, receipts, strict=True):
            back = PreferenceTree.from_record(queries.load_tree(store, receipt.tree_ids[0]))
            assert len(back) == len(t) and back.prompt == t.prompt
            assert [back[n]["step"] for n in back.selected_path()] == [t[n]["step"] for n in t.selected_path()]
            assert back.text(back.final_node()) == t.text(t.final_node())
        stored = queries.list_pairs(store, run_id, 0)
        assert {p.chosen for p in stored} == {p.chosen for p in pairs}
    finally:
        store.close()
