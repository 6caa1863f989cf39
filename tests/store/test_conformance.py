"""The store's conformance suite: every test runs on a SQLite file and on a real PostgreSQL server.

Round trips of every record type, resume semantics, the one-write-per-task rule, and bad input
(trees with cycles, dangling parents or two roots; unknown sources; NaN) rejected with nothing written.
"""

from __future__ import annotations

import math

import pytest

from treeplay.store import queries as q
from treeplay.store.database import StoreError, open_store
from treeplay.store.records import (
    JudgmentRecord,
    NodeRecord,
    PairRecord,
    RankedItem,
    RankedListRecord,
    StepRecord,
    TaskResult,
    TrajectoryRecord,
    TreeRecord,
)


@pytest.fixture
def store(store_url):
    with open_store(store_url) as s:
        yield s


@pytest.fixture
def run(store):
    run_id = q.start_run(store, "run-a", {"model": "tiny", "lr": 1e-5, "nested": {"k": [1, 2]}})
    q.start_iteration(store, run_id, 0, policy_version=0)
    return run_id


def make_nodes() -> list[NodeRecord]:
    """A small tree given children-first, with keys that are not 0..n-1."""
    return [
        NodeRecord(
            key=30, parent_key=10, step="2+3=5", depth=2, visits=2, value=1.0, terminal=True, correct=True
        ),
        NodeRecord(
            key=31, parent_key=10, step="2+3=6", depth=2, visits=1, value=-1.0, terminal=True, correct=False
        ),
        NodeRecord(key=10, parent_key=7, step="start", depth=1, visits=3, value=0.33, prior=0.5, reward=0.1),
        NodeRecord(key=7, parent_key=None, step="", depth=0, visits=4, selected=True, info={"note": "root"}),
        NodeRecord(key=11, parent_key=7, step="oops", depth=1, error="tool failed", policy_version=1),
    ]


def make_result(task_id: str = "t-1") -> TaskResult:
    nodes = make_nodes()
    return TaskResult(
        task_id=task_id,
        environment="arithmetic",
        prompt="What is 2+3?\n",
        answer="5",
        trees=[TreeRecord(task_id=task_id, prompt="What is 2+3?\n", nodes=nodes, environment="arithmetic")],
        trajectories=[
            TrajectoryRecord(
                task_id=task_id,
                environment="arithmetic",
                steps=[
                    StepRecord(index=0, action="look", observation="a table", reward=0.0, logprob=-1.5),
                    StepRecord(
                        index=1, action="answer 5", reward=1.0, credit=0.7, rubric="correct", agent_id="b"
                    ),
                ],
                agent_id="agent-0",
                policy_version=1,
                outcome=1.0,
                info={"turns": 2},
            ),
            TrajectoryRecord(task_id=task_id, environment="arithmetic", status="failed", error="timeout"),
        ],
        pairs=[
            PairRecord(
                prompt="What is 2+3?\nstart\n",
                chosen="2+3=5",
                rejected="2+3=6",
                source="mcts",
                margin=2.0,
                weight=0.5,
                label_smoothing=0.1,
                shared_prefix_chars=4,
                chosen_node=30,
                rejected_node=31,
                chosen_visits=2,
                rejected_visits=1,
                task_id=task_id,
            ),
            PairRecord(prompt="p", chosen="a", rejected="b", source="panel", info={"judges": ["x", "y"]}),
        ],
        ranked_lists=[
            RankedListRecord(
                prompt="What is 2+3?\n",
                items=[RankedItem("5", 1.0, [0.1, 0.9], node=30), RankedItem("6", -1.0, None, node=31)],
                source="mcts",
            )
        ],
        judgments=[
            JudgmentRecord(judge="verifier", score=1.0, target_kind="node", target_key=30),
            JudgmentRecord(judge="critic", score=0.2, target_kind="step", target_key=1, rationale="fine"),
            JudgmentRecord(judge="panel", score=0.5, target_kind="trajectory", target_key=0),
            JudgmentRecord(judge="peer", score=0.9, target_text="some answer"),
        ],
    )


def test_runs_round_trip(store):
    run_id = q.start_run(store, "r1", {"a": 1, "b": [1.5, "x"]})
    info = q.get_run(store, "r1")
    assert info.id == run_id and info.config == {"a": 1, "b": [1.5, "x"]} and info.status == "running"
    assert q.get_run(store, run_id) == info
    with pytest.raises(StoreError, match="already exists"):
        q.start_run(store, "r1", {})
    q.finish_run(store, run_id, status="failed")
    again = q.get_run(store, run_id)
    assert again.status == "failed" and again.finished is not None
    assert [r.name for r in q.list_runs(store)] == ["r1"]
    with pytest.raises(StoreError, match="no run"):
        q.get_run(store, "nope")
    with pytest.raises(StoreError, match="no run"):
        q.finish_run(store, 999)


def test_task_result_round_trip(store, run):
    result = make_result()
    receipt = q.write_task_result(store, run, 0, result)
    ids = receipt.node_ids[0]
    assert set(ids) == {7, 10, 11, 30, 31}

    (summary,) = q.list_trees(store, run, iteration=0)
    assert (summary.task_id, summary.n_nodes, summary.max_depth) == ("t-1", 5, 2)
    tree = q.load_tree(store, receipt.tree_ids[0])
    assert tree.task_id == "t-1" and tree.environment == "arithmetic" and tree.db_id == receipt.tree_ids[0]
    by_id = {n.db_id: n for n in tree.nodes}
    for original in make_nodes():
        loaded = by_id[ids[original.key]]
        parent = None if original.parent_key is None else ids[original.parent_key]
        expected = NodeRecord(
            **{**vars(original), "key": loaded.db_id, "parent_key": parent, "db_id": loaded.db_id}
        )
        assert loaded == expected
    assert tree.nodes[0].parent_key is None  # parents come first

    trajectories = q.list_trajectories(store, run, iteration=0)
    assert [t.db_id for t in trajectories] == receipt.trajectory_ids
    for got, sent in zip(trajectories, result.trajectories, strict=True):
        assert got == TrajectoryRecord(**{**vars(sent), "db_id": got.db_id})

    data = q.preference_data(store, run, 0)
    assert len(data) == 3
    mcts, panel = data.pairs
    assert mcts == PairRecord(
        **{
            **vars(result.pairs[0]),
            "chosen_node": ids[30],
            "rejected_node": ids[31],
            "db_id": mcts.db_id,
            "iteration": 0,
        }
    )
    assert panel.task_id == "t-1" and panel.info == {"judges": ["x", "y"]} and panel.chosen_node is None
    (ranked,) = data.ranked_lists
    assert [(i.text, i.score, i.step_rewards, i.node) for i in ranked.items] == [
        ("5", 1.0, [0.1, 0.9], ids[30]),
        ("6", -1.0, None, ids[31]),
    ]
    assert ranked.iteration == 0 and ranked.db_id == receipt.ranked_list_ids[0]

    node_j = q.judgments_for(store, "node", ids[30])
    assert [(j.judge, j.score, j.target_key) for j in node_j] == [("verifier", 1.0, ids[30])]
    step_j = q.judgments_for(store, "step", receipt.step_ids[0][1])
    assert [(j.judge, j.rationale) for j in step_j] == [("critic", "fine")]
    assert q.judgments_for(store, "trajectory", receipt.trajectory_ids[0])[0].judge == "panel"
    assert [j.target_text for j in q.list_judgments(store, run) if j.target_kind == "candidate"] == [
        "some answer"
    ]

    assert q.counts(store, run) == {
        "iterations": 1, "tasks": 1, "rollouts": 1, "trajectories": 2, "steps": 2, "trees": 1,
        "tree_nodes": 5, "preference_pairs": 2, "ranked_lists": 1, "ranked_items": 2, "judgments": 4,
        "checkpoints": 0, "metrics": 0,
    }  # fmt: skip


def test_resume_semantics(store, run):
    q.write_task_result(store, run, 0, make_result("t-1"))
    q.write_task_result(store, run, 0, make_result("t-2"))
    assert q.completed_task_ids(store, run, 0) == {"t-1", "t-2"}
    # Resuming the unfinished iteration returns the same row and keeps its tasks.
    first = q.list_iterations(store, run)[0].id
    assert q.start_iteration(store, run, 0, policy_version=0) == first
    assert q.completed_task_ids(store, run, 0) == {"t-1", "t-2"}
    assert q.finished_iterations(store, run) == []
    q.finish_iteration(store, run, 0, metrics={"acc": 0.5, "bad": math.nan}, timings={"rollout": 1.25})
    assert q.finished_iterations(store, run) == [0]
    (it,) = q.list_iterations(store, run)
    assert it.status == "done" and it.metrics == {"acc": 0.5, "bad": None} and it.timings == {"rollout": 1.25}
    assert it.n_tasks == 2
    with pytest.raises(StoreError, match="already finished"):
        q.start_iteration(store, run, 0, policy_version=0)
    with pytest.raises(StoreError, match="is finished"):
        q.write_task_result(store, run, 0, make_result("t-3"))
    # The same task in the next iteration is a new rollout of the same task row.
    q.start_iteration(store, run, 1, policy_version=1)
    q.write_task_result(store, run, 1, make_result("t-1"))
    assert q.completed_task_ids(store, run, 1) == {"t-1"}
    assert q.counts(store, run)["tasks"] == 2
    # A failed iteration is unfinished: starting it again resumes it.
    q.finish_iteration(store, run, 1, status="failed")
    q.start_iteration(store, run, 1, policy_version=1)
    assert q.list_iterations(store, run)[1].status == "running"


def test_duplicate_task_is_rejected_and_nothing_written(store, run):
    q.write_task_result(store, run, 0, make_result())
    before = q.counts(store, run)
    with pytest.raises(StoreError, match="already written for iteration 0"):
        q.write_task_result(store, run, 0, make_result())
    assert q.counts(store, run) == before


def test_write_needs_a_started_iteration(store, run):
    with pytest.raises(StoreError, match="never started"):
        q.write_task_result(store, run, 5, make_result())
    assert q.counts(store, run)["tasks"] == 0


def _tree_result(nodes: list[NodeRecord]) -> TaskResult:
    return TaskResult(task_id="bad", trees=[TreeRecord(task_id="bad", prompt="p", nodes=nodes)])


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        ([NodeRecord(0, None, "", 0), NodeRecord(1, 2, "a", 1), NodeRecord(2, 1, "b", 2)], "cycle"),
        ([NodeRecord(0, None, "", 0), NodeRecord(1, 9, "a", 1)], "parent_key 9, which is not in the tree"),
        ([NodeRecord(0, None, "", 0), NodeRecord(1, None, "a", 1)], "2 roots"),
        ([NodeRecord(0, 1, "", 0), NodeRecord(1, 0, "a", 1)], "0 roots"),
        ([NodeRecord(0, None, "", 0), NodeRecord(0, 0, "a", 1)], "two nodes with key 0"),
        ([], "no nodes"),
    ],
    ids=["cycle", "dangling", "two-roots", "no-root", "duplicate-key", "empty"],
)
def test_bad_trees_are_rejected_with_nothing_written(store, run, nodes, message):
    good = make_result("good")
    before = q.counts(store, run)
    with pytest.raises(StoreError, match=message):
        q.write_task_result(store, run, 0, _tree_result(nodes))
    assert q.counts(store, run) == before
    # In a batch the bad task is left out and the good one is written.
    with pytest.raises(StoreError):
        q.write_task_results(store, run, 0, [good, _tree_result(nodes)])
    assert q.completed_task_ids(store, run, 0) == {"good"}


def test_a_chunk_shares_one_transaction_and_a_failed_task_is_rolled_back_alone(store, run):
    """write_task_results: one transaction, a savepoint per task. A task that is already written
    (found only inside the transaction) or bad (found before it) is left out whole; the tasks
    around it are written whole; the first failure is raised afterwards, naming its task."""
    zero = q.counts(store, run)
    q.write_task_result(store, run, 0, make_result("old"))
    per_task = {k: v - zero[k] for k, v in q.counts(store, run).items()}
    bad = make_result("bad")
    bad.pairs[0].margin = math.nan
    with pytest.raises(StoreError, match="task 'old' was already written"):
        q.write_task_results(store, run, 0, [make_result("a"), make_result("old"), bad, make_result("b")])
    assert q.completed_task_ids(store, run, 0) == {"old", "a", "b"}
    # Three whole tasks and nothing of the two that failed: every table holds 3x one task's rows.
    assert q.counts(store, run) == {k: zero[k] + 3 * n for k, n in per_task.items()}
    assert q.write_task_results(store, run, 0, []) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.pairs.append(PairRecord("p", "a", "b", source="vibes")), "source 'vibes' is not one of"),
        (lambda r: setattr(r.pairs[0], "margin", math.nan), r"pairs\[0\].margin is NaN"),
        (lambda r: setattr(r.trees[0].nodes[0], "value", math.nan), "node 30.value is NaN"),
        (lambda r: setattr(r.trees[0].nodes[0], "visits", "3"), "visits must be an integer"),
        (lambda r: setattr(r.pairs[0], "chosen_node", 99), "node key 99, which is not in trees"),
        (lambda r: setattr(r.pairs[0], "tree_index", 3), "refers to tree 3"),
        (lambda r: setattr(r.judgments[0], "target_kind", "vibe"), "target_kind 'vibe'"),
        (lambda r: setattr(r.judgments[2], "target_key", 7), "out of range"),
        (lambda r: setattr(r.trajectories[0], "task_id", "other"), "differs from the TaskResult"),
        (lambda r: setattr(r.trajectories[0].steps[0], "info", {"x": math.nan}), "not JSON-serialisable"),
        (lambda r: setattr(r.trees[0].nodes[0], "step", "a\x00b"), "NUL character"),
        (lambda r: r.ranked_lists[0].items.append("text"), "must be a RankedItem"),
    ],
    ids=[
        "source", "nan-margin", "nan-value", "str-int", "pair-node", "tree-index", "judgment-kind",
        "judgment-range", "task-mismatch", "nan-json", "nul", "item-type",
    ],
)  # fmt: skip
def test_bad_input_is_one_line_error_and_nothing_written(store, run, change, message):
    result = make_result()
    change(result)
    before = q.counts(store, run)
    with pytest.raises(StoreError, match=message) as caught:
        q.write_task_result(store, run, 0, result)
    assert "\n" not in str(caught.value)
    assert q.counts(store, run) == before


def test_not_a_task_result(store, run):
    with pytest.raises(StoreError, match="expects a TaskResult, got dict"):
        q.write_task_result(store, run, 0, {"task_id": "x"})


def test_preference_data_window_and_sources(store, run):
    for it in range(3):
        if it:
            q.start_iteration(store, run, it, policy_version=it)
        q.write_task_result(store, run, it, make_result(f"t-{it}"))
    data = q.preference_data(store, run, 2)
    assert {p.iteration for p in data.pairs} == {2} and len(data.pairs) == 2
    data = q.preference_data(store, run, 2, replay=1)
    assert [p.iteration for p in data.pairs] == [1, 1, 2, 2]
    assert [r.iteration for r in data.ranked_lists] == [1, 2]
    data = q.preference_data(store, run, 2, replay=5, sources=["panel"])
    assert [(p.source, p.iteration) for p in data.pairs] == [("panel", 0), ("panel", 1), ("panel", 2)]
    assert data.ranked_lists == []
    assert len(q.list_pairs(store, run, iteration=1, source="mcts")) == 1
    assert len(q.list_ranked_lists(store, run)) == 3
    with pytest.raises(StoreError, match="unknown preference source"):
        q.preference_data(store, run, 2, sources=["nope"])


def test_checkpoints_and_metrics(store, run):
    assert q.latest_checkpoint(store, run) is None
    q.record_checkpoint(store, run, 0, 1, "file:///ckpt/1", {"loss": 0.5})
    second = q.record_checkpoint(store, run, 1, 2, "s3://bucket/ckpt/2")
    latest = q.latest_checkpoint(store, run)
    assert (latest.id, latest.policy_version, latest.uri, latest.metrics) == (
        second,
        2,
        "s3://bucket/ckpt/2",
        None,
    )
    q.log_metrics(store, run, 0, {"loss": 1.0, "acc": 0.25})
    q.log_metrics(store, run, 1, {"loss": 0.5, "acc": math.nan})
    q.log_metrics(store, run, None, {"eval/acc": 0.75})
    series = q.metric_series(store, run)
    assert series["loss"] == [(0, 1.0), (1, 0.5)]
    assert series["acc"][0] == (0, 0.25) and math.isnan(series["acc"][1][1])
    assert "eval/acc" not in series and q.run_metrics(store, run) == {"eval/acc": 0.75}
    assert q.counts(store, run)["metrics"] == 5 and q.counts(store, run)["checkpoints"] == 2
    with pytest.raises(StoreError, match="metric 'x' must be a number"):
        q.log_metrics(store, run, 0, {"x": "high"})


def test_regression_metrics_logged_again_replace_the_old_value(store, run):
    """The loop logs an iteration's metrics, then finishes the iteration in a second write. A crash
    between the two left the iteration "running", so the resumed run did it again and logged its
    metrics a second time: two points for one (run, iteration, key) in the series the learning
    curve, the study summaries and resume read. One value per key and iteration; the newest wins."""
    q.log_metrics(store, run, -1, {"eval/accuracy_greedy": 0.5})
    q.log_metrics(store, run, None, {"warm_start/loss": 2.0})
    q.log_metrics(store, run, 0, {"rollout/tasks": 8.0, "eval/accuracy_greedy": 0.25})
    # ... the process dies here; the resumed run starts iteration 0 again and records it.
    q.start_iteration(store, run, 0, policy_version=0)
    q.log_metrics(store, run, 0, {"eval/accuracy_greedy": 0.75, "learn/loss": math.nan})
    q.finish_iteration(store, run, 0, metrics={"eval/accuracy_greedy": 0.75})
    q.log_metrics(store, run, None, {"warm_start/loss": 1.5})
    series = q.metric_series(store, run)
    assert series["eval/accuracy_greedy"] == [(-1, 0.5), (0, 0.75)]
    assert series["rollout/tasks"] == [(0, 8.0)]  # a key only the first attempt logged is kept
    assert len(series["learn/loss"]) == 1 and math.isnan(series["learn/loss"][0][1])
    assert q.run_metrics(store, run) == {"warm_start/loss": 1.5}
    assert q.counts(store, run)["metrics"] == 5
    assert q.finished_iterations(store, run) == [0]


def test_runs_are_isolated(store, run):
    other = q.start_run(store, "run-b", {})
    q.start_iteration(store, other, 0, 0)
    q.write_task_result(store, run, 0, make_result())
    q.write_task_result(store, other, 0, make_result())  # same task key, another run: fine
    assert q.counts(store, run)["tree_nodes"] == 5 and q.counts(store, other)["tree_nodes"] == 5
    assert len(q.list_trees(store, other)) == 1 and q.preference_data(store, other, 0).pairs[0].db_id > 0


def test_missing_tree(store):
    with pytest.raises(StoreError, match="no tree with id 12345"):
        q.load_tree(store, 12345)


def test_node_at_a_time_readers(store, run):
    receipt = q.write_task_result(store, run, 0, make_result())
    ids = receipt.node_ids[0]
    tree_id = receipt.tree_ids[0]
    assert q.get_tree(store, tree_id) == q.list_trees(store, run)[0]
    root = q.tree_root(store, tree_id)
    assert (root.tree_id, root.node.db_id, root.n_children) == (tree_id, ids[7], 2)
    kids = q.child_nodes(store, ids[10])
    assert [(k.node.db_id, k.node.step, k.n_children) for k in kids] == [
        (ids[30], "2+3=5", 0),
        (ids[31], "2+3=6", 0),
    ]
    view = q.get_node(store, ids[30])
    assert view.node.parent_key == ids[10] and view.node.correct is True and view.n_children == 0
    assert [n.db_id for n in q.node_path(store, ids[30])] == [ids[7], ids[10], ids[30]]
    assert [p.source for p in q.pairs_of_nodes(store, [ids[31]])] == ["mcts"]
    assert q.pairs_of_nodes(store, []) == [] and q.pairs_of_nodes(store, [ids[11]]) == []
    assert [p.db_id for p in q.tree_pairs(store, tree_id)] == receipt.pair_ids[:1]
    with pytest.raises(StoreError, match="no tree node with id 999999"):
        q.get_node(store, 999999)
    with pytest.raises(StoreError, match="no tree node"):
        q.node_path(store, 999999)
    with pytest.raises(StoreError, match="no tree with id 999999"):
        q.get_tree(store, 999999)
