"""Property test (hypothesis): random trees and pairs round-trip through the store unchanged.

Trees of any shape, keys in any order and of any size, every node field drawn from its whole domain
(unicode text, infinities, None); one store per backend for the whole module.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from treeplay.store import queries as q
from treeplay.store.database import open_store
from treeplay.store.records import NodeRecord, PairRecord, TaskResult, TreeRecord

INT32 = st.integers(-(2**31), 2**31 - 1)
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
FLOATS = st.floats(allow_nan=False)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
INFO = st.none() | st.dictionaries(TEXT, JSON_VALUES, max_size=3)
_task_numbers = itertools.count()


@st.composite
def trees_with_pairs(draw) -> tuple[TreeRecord, list[PairRecord]]:
    n = draw(st.integers(1, 25))
    keys = draw(st.lists(st.integers(-(2**62), 2**62), min_size=n, max_size=n, unique=True))
    parents = [None] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    nodes = [
        NodeRecord(
            key=keys[i],
            parent_key=None if parents[i] is None else keys[parents[i]],
            step=draw(TEXT),
            depth=draw(INT32),
            visits=draw(INT32),
            value=draw(FLOATS),
            prior=draw(FLOATS),
            reward=draw(FLOATS),
            terminal=draw(st.booleans()),
            correct=draw(st.none() | st.booleans()),
            selected=draw(st.booleans()),
            policy_version=draw(INT32),
            error=draw(st.none() | TEXT),
            info=draw(INFO),
        )
        for i in range(n)
    ]
    order = draw(st.permutations(range(n)))
    tree = TreeRecord(
        task_id="",
        prompt=draw(TEXT),
        nodes=[nodes[i] for i in order],
        policy_version=draw(INT32),
        info=draw(INFO),
    )
    pairs = [
        PairRecord(
            prompt=draw(TEXT),
            chosen=draw(TEXT),
            rejected=draw(TEXT),
            source=draw(st.sampled_from(["mcts", "panel", "credit", "rubric", "slhf", "sample"])),
            margin=draw(st.none() | FLOATS),
            weight=draw(FLOATS),
            label_smoothing=draw(FLOATS),
            shared_prefix_chars=draw(st.integers(0, 2**31 - 1)),
            chosen_node=draw(st.none() | st.sampled_from(keys)),
            rejected_node=draw(st.none() | st.sampled_from(keys)),
            chosen_visits=draw(st.none() | INT32),
            rejected_visits=draw(st.none() | INT32),
            info=draw(INFO),
        )
        for _ in range(draw(st.integers(0, 3)))
    ]
    return tree, pairs


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def module_store(request, tmp_path_factory):
    """One store per backend for the whole module, with a run and iteration 0 started."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('props') / 'store.db'}"
    else:
        url = request.getfixturevalue("postgres_server").create_database("store_properties")
    with open_store(url) as store:
        run_id = q.start_run(store, "properties", {})
        q.start_iteration(store, run_id, 0, 0)
        yield store, run_id


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=trees_with_pairs())
def test_random_trees_and_pairs_round_trip(module_store, case):
    store, run_id = module_store
    tree, pairs = case
    task_id = f"task-{next(_task_numbers)}"
    tree.task_id = task_id
    receipt = q.write_task_result(store, run_id, 0, TaskResult(task_id=task_id, trees=[tree], pairs=pairs))
    ids = receipt.node_ids[0]

    loaded = q.load_tree(store, receipt.tree_ids[0])
    assert (loaded.task_id, loaded.prompt, loaded.policy_version, loaded.info) == (
        task_id, tree.prompt, tree.policy_version, tree.info,
    )  # fmt: skip
    by_id = {n.db_id: n for n in loaded.nodes}
    assert len(by_id) == len(tree.nodes)
    for node in tree.nodes:
        parent = None if node.parent_key is None else ids[node.parent_key]
        db_id = ids[node.key]
        assert by_id[db_id] == NodeRecord(
            **{**vars(node), "key": db_id, "parent_key": parent, "db_id": db_id}
        )

    got = {p.db_id: p for p in q.list_pairs(store, run_id, iteration=0)}
    for pair, pair_id in zip(pairs, receipt.pair_ids, strict=True):
        expected = {
            **vars(pair),
            "chosen_node": None if pair.chosen_node is None else ids[pair.chosen_node],
            "rejected_node": None if pair.rejected_node is None else ids[pair.rejected_node],
            "task_id": task_id,
            "db_id": pair_id,
            "iteration": 0,
        }
        assert got[pair_id] == PairRecord(**expected)
