"""One smoke run per agent mode with the tiny real model, written to a real SQLite store.

The random-init model writes nonsense; these runs check the plumbing end to end (engine calls,
defensive parsing of what it writes, records the store accepts and gives back), not quality.
"""

from __future__ import annotations

import pytest

from treeplay.agents.credit import StepCheckCritic, assign_credit
from treeplay.agents.envs.arithmetic import ArithmeticEnv
from treeplay.agents.envs.toolqa import ToolQAEnv
from treeplay.agents.episode import task_result
from treeplay.agents.multi import Agent, run_multi_agent_episodes
from treeplay.agents.panel import ExactAnswerJudge, PanelConfig, Peer, run_panel
from treeplay.agents.react import ReActAgent, ReActConfig
from treeplay.agents.scripted import ScriptedPolicy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from treeplay.engines.hf import HFEngine

    eng = HFEngine(tiny_model_dir, seed=0, num_threads=1)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def long_engine(tmp_path_factory):
    """The tiny model with a 2048-character context: a rubric generator prompt alone is ~1.5k
    characters, and prompts are never cut into their instructions (agents/prompt_files.py)."""
    from treeplay.engines.hf import HFEngine
    from treeplay.engines.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("tiny-long") / "model", max_positions=2048)
    eng = HFEngine(path, seed=0, num_threads=1)
    yield eng
    eng.close()


@pytest.fixture
def store(tmp_path):
    from treeplay.store import queries
    from treeplay.store.database import open_store

    s = open_store(f"sqlite:///{tmp_path / 'agents.db'}")
    run_id = queries.start_run(s, "agents-smoke", {"test": True})
    queries.start_iteration(s, run_id, 0, 0)
    yield s, run_id
    s.close()


def write(store, results):
    from treeplay.store import queries

    s, run_id = store
    for r in results:
        queries.write_task_result(s, run_id, 0, r)


def reference_policy(tasks) -> ScriptedPolicy:
    refs = {t.prompt: t.reference.splitlines() for t in tasks}

    def respond(prompt: str, rng) -> str:
        for p, lines in refs.items():
            if p in prompt:
                return lines[min(prompt.split(p, 1)[1].count("\n"), len(lines) - 1)] + "\n"
        return "?\n"

    return ScriptedPolicy(respond)


def test_react_with_rubrics_smoke(long_engine, store):
    from treeplay.store import queries

    env = ToolQAEnv(n_entities=8, kinds=("ratio",), show_tools=False)
    tasks = env.tasks("train", 2, seed=0)
    # seed 2 hits an HFEngine bug (stop strings + every row at EOS: batch_decode([]) returns [""]);
    # reported to the engines owner.
    config = ReActConfig(
        max_steps=3,
        max_tokens=16,
        rubric_max_tokens=40,
        verify_max_tokens=40,
        max_prompt_chars=1900,
        action_pattern=r"\w+\[.*\]",
        seed=5,
    )
    trajs = ReActAgent(long_engine, config=config).run_many(
        lambda: ToolQAEnv(n_entities=8, show_tools=False), tasks
    )
    for t in trajs:
        assert t.status == "ok", t.error
        assert len(t.steps) <= 3 and t.info["mode"] == "react+rubrics"
    write(store, [task_result(task, [t]) for task, t in zip(tasks, trajs, strict=True)])
    back = queries.list_trajectories(store[0], store[1], 0)
    assert len(back) == 2 and sum(len(r.steps) for r in back) == sum(len(t.steps) for t in trajs)


def test_panel_smoke(long_engine, store):
    from treeplay.store import queries

    env = ArithmeticEnv(ops=1)
    tasks = env.tasks("train", 2, seed=0)
    peers = [Peer("tiny", long_engine), Peer("reference", reference_policy(tasks))]
    config = PanelConfig(
        n_candidates=2, max_tokens=12, stop=("\n\n",), judge_max_tokens=24, max_prompt_chars=1000, seed=0
    )
    results = run_panel(peers, tasks, config, judges=[ExactAnswerJudge(env.verify)])
    assert all(len(r.candidates) == 4 for r in results)
    # Every judge prompt fit: the tiny model was asked (its answers may be unreadable, never cut).
    assert not any("does not fit" in str((j.info or {}).get("error")) for r in results for j in r.judgments)
    for r in results:
        for p in r.pairs:
            assert env.verify(r.task, p.chosen)  # the verifier's class comes first
    write(store, [r.task_result() for r in results])
    s, run_id = store
    pairs = queries.list_pairs(s, run_id, 0, source="panel")
    assert len(pairs) == sum(len(r.pairs) for r in results)
    assert len(queries.list_judgments(s, run_id, 0)) == sum(len(r.judgments) for r in results)


def test_multi_agent_credit_smoke(engine, store):
    from treeplay.store import queries

    tasks = ArithmeticEnv(ops=2).tasks("train", 2, seed=0)
    agents = [Agent("tiny-0", engine), Agent("tiny-1", engine), Agent("reference", reference_policy(tasks))]
    trajs = run_multi_agent_episodes(lambda: ArithmeticEnv(ops=2), agents, tasks, max_tokens=12, seed=0)
    assert all(t.status == "ok" and len(t.steps) == 2 for t in trajs)
    pairs = assign_credit(trajs, StepCheckCritic(lambda: ArithmeticEnv(ops=2)), agents=agents[:2], seed=0)
    assert all(p.credit is not None for t in trajs for p in t.proposals)
    write(
        store,
        [
            task_result(task, [t], [p for p in pairs if p.task_id == task.id])
            for task, t in zip(tasks, trajs, strict=True)
        ],
    )
    s, run_id = store
    back = queries.list_trajectories(s, run_id, 0)
    assert {r.agent_id for r in back} >= {"vote", "tiny-0", "tiny-1", "reference"}
    assert any(st.credit is not None for r in back for st in r.steps)
    assert len(queries.list_pairs(s, run_id, 0, source="credit")) == len(pairs)
