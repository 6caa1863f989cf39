"""One home per concept: the prompt loader, ``jsonable``, the chunk seed, MCTS-DPO's visit-count alpha
and the store API each have one definition that every user imports, a task's write (alone or in a
chunk) goes through one set of functions and refusals, and the store's modules stay small behind the
``store.queries`` façade."""

from __future__ import annotations

import ast
import math
import re
from datetime import datetime
from pathlib import Path

import pytest

from treeplay.store import queries

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agents", "search", "store", "orchestrator", "engines", "learners", "bench")


def _sources() -> dict[str, str]:
    return {
        str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
        for pkg in PACKAGES
        for p in sorted((ROOT / pkg).rglob("*.py"))
    }


@pytest.mark.parametrize(
    ("pattern", "home"),
    [
        (r"^\s*def _?jsonable\(", "store/records.py"),
        (r"^\s*def _?first_line\(", "store/database.py"),
        (r"^\s*def label_smoothing\(", "search/preferences.py"),
        (r"1_000_003", "orchestrator/schedule.py"),
        (r"def uri_to_path\(|urlparse\(", "store/records.py"),  # local paths of checkpoint URIs
        (r"^def derive_seed\(|seed\s*\*\s*\d", "orchestrator/schedule.py"),  # a run seed scaled into a stream's seed
        (r"/\s*[\"']prompts[\"']", "agents/prompt_files.py"),  # a path into a prompts/ folder
        # The task write path's refusals, the same words whether a task comes alone or in a chunk.
        (r"was never started \(call start_iteration\)", "store/writes.py"),
        (r"takes no more tasks", "store/writes.py"),
        (r"was already written for iteration", "store/writes.py"),
    ],
)
def test_each_concept_is_defined_once(pattern, home):
    where = [path for path, text in _sources().items() if re.search(pattern, text, re.M)]
    assert where == [home]


def test_load_prompt_reads_every_package_prompt_folder():
    from treeplay.agents.prompt_files import load_prompt
    from treeplay.learners.slhf import load_follower_template
    from treeplay.search import expansion

    assert load_prompt("rubric_verifier.txt") == (ROOT / "agents/prompts/rubric_verifier.txt").read_text(
        "utf-8"
    )
    assert expansion._SELF_EVAL == (ROOT / "search/prompts/self_eval.txt").read_text("utf-8")
    assert expansion._SELF_EVAL_REFERENCE == load_prompt("self_eval_reference.txt", "treeplay.search")
    follower = (ROOT / "learners/prompts/slhf_follower.txt").read_text("utf-8")
    assert load_follower_template() == load_prompt("slhf_follower.txt", "treeplay.learners") == follower


def test_jsonable_is_strict_json():
    from dataclasses import dataclass

    from treeplay.agents import episode
    from treeplay.orchestrator import inspector
    from treeplay.store.records import jsonable

    @dataclass
    class Point:
        x: float
        when: datetime

    assert episode.jsonable is inspector.jsonable is jsonable
    value = {
        1: (math.nan, math.inf, 2.5, True, None),
        "p": Point(-math.inf, datetime(2024, 5, 1, 12)),
        "s": {3},
    }
    assert jsonable(value) == {
        "1": [None, None, 2.5, True, None],
        "p": {"x": None, "when": "2024-05-01T12:00:00"},
        "s": "{3}",
    }


def test_regression_episode_info_with_nan_or_datetime_is_storable(tmp_path):
    """A step's or trajectory's info holding NaN or a datetime used to make the whole task's write fail
    ("not JSON-serialisable without NaN"): the agents' jsonable kept NaN and turned datetimes into
    their repr. Now both sides of the store use the one strict jsonable."""
    from treeplay.agents.base import Step, Task, Trajectory
    from treeplay.agents.episode import task_result
    from treeplay.store.database import open_store

    task = Task(id="t1", prompt="1+1=", answer="2", env="arithmetic")
    when = datetime(2024, 5, 1, 12, 30)
    step = Step(index=0, action="1+1=2", reward=1.0, info={"confidence": math.nan, "at": when})
    traj = Trajectory(task=task, steps=[step], outcome=1.0, info={"score": math.inf})
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        run_id = queries.start_run(store, "info", {})
        queries.start_iteration(store, run_id, 0, 0)
        queries.write_task_result(store, run_id, 0, task_result(task, [traj]))
        (stored,) = queries.list_trajectories(store, run_id)
    finally:
        store.close()
    assert stored.info == {"score": None}
    assert stored.steps[0].info == {"confidence": None, "at": "2024-05-01T12:30:00"}


def test_every_seed_comes_from_the_one_formula_with_the_values_runs_always_had():
    from treeplay.orchestrator import loop, rollouts, schedule, workers

    assert schedule.chunk_seed(3, 2, 5) == 3 * 1_000_003 + 2 * 7919 + 5
    assert schedule.chunk_seed(3, 2) == schedule.chunk_seed(3, 2, 0)
    assert schedule.derive_seed(3, 2, stream="tasks") == 3 * 31 + 2
    assert schedule.derive_seed(3, 2, stream="shuffle") == 3 * 7919 + 2
    assert loop.chunk_seed is rollouts.chunk_seed is schedule.chunk_seed
    assert workers.derive_seed is schedule.derive_seed
    seeds = {schedule.chunk_seed(7, it, c) for it in range(50) for c in range(200)}
    assert len(seeds) == 50 * 200


def test_visit_alpha_is_label_smoothing_elementwise():
    import torch

    from treeplay.learners.losses import visit_alpha
    from treeplay.search.preferences import label_smoothing

    chosen = torch.arange(0, 40).repeat_interleave(40)
    rejected = torch.arange(0, 40).repeat(40)
    alpha = visit_alpha(chosen, rejected)
    assert alpha.dtype == torch.float32 and alpha.shape == chosen.shape
    expected = [label_smoothing(w, n) for w, n in zip(chosen.tolist(), rejected.tolist(), strict=True)]
    assert alpha.tolist() == pytest.approx(expected, rel=1e-7)
    broadcast = visit_alpha(torch.tensor([[9, 1]]), torch.tensor(3), max_alpha=0.3)
    assert broadcast.shape == (1, 2) and broadcast[0].tolist() == pytest.approx([0.25, 0.3])


def test_the_loop_launches_runs_and_the_store_starts_them():
    from treeplay.orchestrator import loop

    assert callable(loop.launch_run) and not hasattr(loop, "start_run")
    assert queries.start_run.__module__ == "treeplay.store.runs"


def test_store_queries_reexports_every_public_function_and_record():
    from treeplay.store import chunks, reads, records, runs, writes

    public = set(queries.__all__)
    assert all(hasattr(queries, name) for name in public)
    for module in (chunks, reads, runs, writes):
        defined = {
            name
            for name, value in vars(module).items()
            if callable(value)
            and not name.startswith("_")
            and getattr(value, "__module__", "") == module.__name__
        }
        assert defined and defined <= public, module.__name__
    for name in ("RunInfo", "IterationInfo", "TreeSummary", "CheckpointInfo", "WriteReceipt", "NodeView"):
        assert getattr(queries, name) is getattr(records, name)


def test_a_chunk_writes_its_tasks_through_the_one_task_write_path():
    """store/chunks.py has no insert of its own: each task's rows are checked, linked and inserted by
    store/writes.py (``_Rows``: ``fill`` in the one-transaction chunk, ``write`` per task in the
    savepoint fallback; ``_insert_many`` per table), so a row type added there is written by both."""
    tree = ast.parse((ROOT / "store/chunks.py").read_text(encoding="utf-8"))
    imported = {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert not {name for module, name in imported if module and module.startswith("sqlalchemy")} & {
        "insert", "text", "update", "delete"}
    assert {("treeplay.store.writes", n) for n in ("_Rows", "_insert_many", "_allocate_ids", "ROW_TABLES")} <= imported
    called = {node.func.attr for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert {"fill", "write"} <= called and not called & {"executemany", "exec_driver_sql", "insert"}


def _run_rows(store, run_id: int) -> dict[str, list[tuple]]:
    """Every row a run's task writes made, ids replaced by their position in their table (in id
    order) and times left out, so that two runs given the same results compare equal."""
    from sqlalchemy import select

    from treeplay.store import schema as db

    t = {name: table for name, table in db.Base.metadata.tables.items()}
    parent = {"steps": ("trajectory_id", "trajectories"), "tree_nodes": ("tree_id", "trees"),
              "ranked_items": ("list_id", "ranked_lists")}
    written = ("tasks", "rollouts", "trees", "tree_nodes", "trajectories", "steps", "preference_pairs",
               "ranked_lists", "ranked_items", "judgments")
    raw: dict[str, list] = {}
    with store.read() as conn:
        for name in written:
            table = t[name]
            if name in parent:
                column, owner = parent[name]
                owned = select(t[owner].c.id).where(t[owner].c.run_id == run_id)
                query = select(table).where(table.c[column].in_(owned))
            else:
                query = select(table).where(table.c.run_id == run_id)
            raw[name] = [dict(r._mapping) for r in conn.execute(query.order_by(table.c.id))]
    position = {name: {row["id"]: i for i, row in enumerate(rows)} for name, rows in raw.items()}
    judged = {"node": "tree_nodes", "step": "steps", "trajectory": "trajectories"}
    out = {}
    for name, rows in raw.items():
        targets = {fk.parent.name: fk.column.table.name for fk in t[name].foreign_keys
                   if fk.column.table.name in position}  # not rollouts' (run_id, iteration) key
        normal = []
        for row in rows:
            if name == "judgments" and row["target_kind"] in judged:
                row["target_id"] = position[judged[row["target_kind"]]][row["target_id"]]
            for column, value in list(row.items()):
                if column in ("created", "written", "run_id"):
                    del row[column]
                elif column == "id":
                    row[column] = position[name][value]
                elif column in targets and value is not None:
                    row[column] = position[targets[column]][value]
            normal.append(tuple(sorted(row.items())))
        out[name] = normal
    return out


def test_a_chunk_stores_exactly_what_task_by_task_writes_store(tmp_path):
    """The same results, written one task per call and as chunks, give the same rows (a task seen in
    an earlier iteration reuses its task row either way), and a task already written is refused
    with the same words."""
    from tests.store.test_conformance import make_result
    from treeplay.store.database import StoreError, open_store

    iterations = [["t-1", "t-2", "t-3"], ["t-2", "t-4"]]
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        refusals = []
        for name in ("alone", "chunk"):
            run_id = queries.start_run(store, name, {})
            for index, keys in enumerate(iterations):
                queries.start_iteration(store, run_id, index, 0)
                results = [make_result(k) for k in keys]
                if name == "alone":
                    for r in results:
                        queries.write_task_result(store, run_id, index, r)
                else:
                    queries.write_task_results(store, run_id, index, results)
            with pytest.raises(StoreError) as refused:
                if name == "alone":
                    queries.write_task_result(store, run_id, 1, make_result("t-4"))
                else:
                    queries.write_task_results(store, run_id, 1, [make_result("t-5"), make_result("t-4")])
            refusals.append(str(refused.value).replace(f"run {run_id}", "run R"))
        alone, chunk = _run_rows(store, 1), _run_rows(store, 2)
    finally:
        store.close()
    assert alone["tasks"] and alone["judgments"] and alone["ranked_items"] and alone["steps"]
    assert len(alone["tasks"]) == 4 and len(alone["rollouts"]) == 5
    for name in alone:
        assert chunk[name][: len(alone[name])] == alone[name], name
    assert len(chunk["tasks"]) == 5 and len(chunk["rollouts"]) == 6  # and t-5 from the refused chunk
    assert refusals[0] == refusals[1] == "task 't-4' was already written for iteration 1 of run R"


def test_store_modules_stay_small_and_say_what_they_hold():
    long = {}
    for p in (ROOT / "store").glob("*.py"):
        text = p.read_text(encoding="utf-8")
        assert ast.get_docstring(ast.parse(text)), p.name
        if len(text.splitlines()) > 600:
            long[p.name] = len(text.splitlines())
    assert not long, f"store modules over 600 lines: {long}"


def test_package_modules_stay_under_600_lines():
    """Issue 13: a module over ~600 lines is split along its seams (users import from the new modules)."""
    long = {path: len(text.splitlines()) for path, text in _sources().items()
            if not path.startswith("bench/") and len(text.splitlines()) > 600}
    assert not long, f"modules over 600 lines: {long}"
