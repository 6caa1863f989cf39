"""Panel of peers with scripted judges of known bias; credit re-assignment with scripted critics."""

from __future__ import annotations

import pytest

from agents.base import Task
from agents.credit import PolicyCritic, StepCheckCritic, assign_credit, parse_critic_scores
from agents.envs.arithmetic import ArithmeticEnv
from agents.multi import Agent, run_multi_agent_episodes
from agents.panel import ExactAnswerJudge, PanelConfig, Peer, parse_likert, run_panel
from agents.scripted import ScriptedPolicy

QUALITY = {"great answer": 5, "fine answer": 3, "poor answer": 1}


def likert(score: int) -> str:
    return (
        "\n".join(
            f"{d}: {score}"
            for d in ("helpfulness", "correctness", "level of detail", "coherence", "complexity")
        )
        + "\nrationale: judged by content"
    )


def peer(name: str, writes: str, bias: str = "fair") -> Peer:
    """Writes ``writes``; as a judge: fair (content), self-loving (5 to its own text), or garbled."""

    def respond(prompt: str, rng) -> str:
        if not prompt.startswith("Score one response"):
            return writes
        response = prompt.split("Response:\n", 1)[1].split("\n\nReply with", 1)[0]
        if bias == "garbled":
            return "I refuse to use numbers. helpfulness: seven"
        if bias == "self" and response == writes:
            return likert(5)
        return likert(QUALITY[response])

    return Peer(name, ScriptedPolicy(respond))


def test_panel_ranks_by_aggregate_despite_biased_judges():
    peers = [
        peer("p-great", "great answer"),
        peer("p-fine", "fine answer", "self"),
        peer("p-poor", "poor answer", "garbled"),
    ]
    tasks = [Task(id=f"t{i}", prompt=f"Question {i}?\n") for i in range(3)]
    results = run_panel(peers, tasks, PanelConfig(n_candidates=2))
    for p in peers:  # one generate call for candidates, one for judging, per peer
        assert [len(c.prompts) for c in p.policy.calls] == [3, 18]
    for r in results:
        agg = {c.text: c.aggregate for c in r.candidates}
        assert agg["great answer"] == pytest.approx(1.0)
        assert agg["fine answer"] == pytest.approx((0.5 + 1.0) / 2)  # the self-loving judge inflates it
        assert agg["poor answer"] == pytest.approx(0.0)
        assert agg["great answer"] > agg["fine answer"] > agg["poor answer"]
        [pair] = r.pairs
        assert (pair.chosen, pair.rejected, pair.source) == ("great answer", "poor answer", "panel")
        assert pair.margin == pytest.approx(1.0) and pair.info["chosen_author"] == "p-great"
        unparsed = [j for j in r.judgments if j.info and j.info.get("unparsed")]
        assert len(unparsed) == 6 and {j.judge for j in unparsed} == {"p-poor"}
        assert all(j.rationale == "judged by content" for j in r.judgments if j.judge == "p-great")
        assert [i.text for i in r.ranked_list().items][0] == "great answer"
        assert r.task_result().pairs == r.pairs


def test_panel_thresholds_and_self_exclusion():
    peers = [peer("a", "fine answer"), peer("b", "poor answer")]
    tasks = [Task(id="t", prompt="Q?\n")]
    assert run_panel(peers, tasks, PanelConfig(n_candidates=1))[0].pairs == []  # best is 0.5 < 0.85
    loose = PanelConfig(n_candidates=1, min_chosen=0.5, min_gap=0.5)
    assert len(run_panel(peers, tasks, loose)[0].pairs) == 1
    selfish = [peer("a", "fine answer", "self"), peer("b", "poor answer", "self")]
    r = run_panel(selfish, tasks, PanelConfig(n_candidates=1, exclude_self=True))[0]
    assert {c.text: c.aggregate for c in r.candidates} == {"fine answer": 0.5, "poor answer": 0.0}


def test_exact_judge_panel():
    env = ArithmeticEnv(ops=1)
    tasks = env.tasks("train", 2, seed=0)
    right = ScriptedPolicy(lambda p, r: next(t.reference for t in tasks if t.prompt == p))
    wrong = ScriptedPolicy(lambda p, r: "1+1=3\n")
    cfg = PanelConfig(n_candidates=1, peer_scoring=False)
    results = run_panel(
        [Peer("r", right), Peer("w", wrong)], tasks, cfg, judges=[ExactAnswerJudge(env.verify)]
    )
    for r, t in zip(results, tasks, strict=True):
        assert r.pairs[0].chosen == t.reference and r.pairs[0].rejected == "1+1=3\n"
    assert ExactAnswerJudge().score(tasks[0], [f"so it is {tasks[0].answer}", "no"])[0].score == 1.0


def test_parse_likert_is_defensive():
    s = parse_likert("**Helpfulness**: 4/5\nCorrectness = 9\n- coherence: 2\nweird: 5\nrationale: ok")
    assert s.dims == {"helpfulness": 4, "coherence": 2}
    assert s.missing == ["correctness", "detail", "complexity"] and s.rationale == "ok"
    assert s.normalised == pytest.approx((0.75 + 0.25) / 2)
    assert parse_likert("").normalised is None


# -- credit ------------------------------------------------------------------------------------------


def multi_agent_run():
    tasks = ArithmeticEnv(ops=2).tasks("train", 2, seed=0)
    refs = {t.prompt: t.reference.splitlines() for t in tasks}

    def right(prompt: str, rng) -> str:
        if prompt.startswith("You are a very clumsy agent"):
            return "2+2=5\n"
        for p, lines in refs.items():
            if prompt.endswith(p) or p in prompt:
                return lines[min(prompt.split(p, 1)[1].count("\n"), len(lines) - 1)] + "\n"
        return "?\n"

    good = ScriptedPolicy(right)
    agents = [
        Agent("a0", good),
        Agent("a1", ScriptedPolicy(lambda p, r: "10+10=21\n")),
        Agent("a2", ScriptedPolicy(lambda p, r: "3+3=7\n")),
    ]
    trajs = run_multi_agent_episodes(lambda: ArithmeticEnv(ops=2), agents, tasks)
    return tasks, agents, trajs


def test_step_check_critic_credits_the_correct_agent():
    tasks, agents, trajs = multi_agent_run()
    assert all(t.outcome == 1.0 for t in trajs)  # ties go to a0, the first agent
    pairs = assign_credit(trajs, StepCheckCritic(lambda: ArithmeticEnv(ops=2)), agents=agents)
    for traj in trajs:
        credit = {}
        for p in traj.proposals:
            credit.setdefault(p.agent_id, []).append(p.credit)
        assert credit["a0"] == [1.0, 1.0] and credit["a1"] == [0.0, 0.0] and credit["a2"] == [0.0, 0.0]
        assert credit["a0:clumsy"] == [0.0, 0.0]
        assert [s.credit for s in traj.steps] == [1.0, 1.0]
    # per state: a0's right step beats its clumsy one; a1 and a2 are each beaten by a0's step
    assert len(pairs) == 2 * 2 * 3 and {p.source for p in pairs} == {"credit"}
    by_agent = {(p.info["step"], tuple(p.info["agents"])): p for p in pairs if p.task_id == tasks[0].id}
    p = by_agent[(0, ("a0",))]
    assert (
        p.chosen == tasks[0].reference.splitlines()[0] + "\n"
        and p.rejected == "2+2=5\n"
        and p.info["rejected_clumsy"]
    )
    p = by_agent[(1, ("a1",))]
    assert p.chosen == tasks[0].reference.splitlines()[1] + "\n" and p.rejected == "10+10=21\n"
    assert p.prompt == tasks[0].prompt + tasks[0].reference.splitlines()[0] + "\n"


def test_policy_critic_parses_scores_and_prefers_the_correct_agent():
    tasks, agents, trajs = multi_agent_run()

    def critic(prompt: str, rng) -> str:
        lines = [ln for ln in prompt.split("Proposed actions:\n", 1)[1].split("\n\n", 1)[0].splitlines()]
        scores = []
        for ln in lines:
            label, action = ln.split(": ", 1)
            a, rest = action.split("=")
            ok = eval_chain(a) == int(rest)  # the scripted critic knows arithmetic
            scores.append(f"{label}: {1.3 if ok else -0.2}")
        return "Reason: checked the sums.\nScore: {" + ", ".join(scores) + "}"

    pairs = assign_credit(trajs, PolicyCritic(ScriptedPolicy(critic)), agents=agents, clumsy=False)
    for traj in trajs:
        mean = {a: [p.credit for p in traj.proposals if p.agent_id == a] for a in ("a0", "a1", "a2")}
        assert mean["a0"] == [1.0, 1.0] and mean["a1"] == [0.0, 0.0]  # clipped to [0, 1]
    assert pairs and all(p.info["chosen_agent"] == "a0" for p in pairs)


def eval_chain(text: str) -> int:
    a, op, b = text.partition("+") if "+" in text else text.partition("-")
    return int(a) + int(b) if op == "+" else int(a) - int(b)


def test_parse_critic_scores():
    assert parse_critic_scores(
        "Reason: agent_2 is 0.1 off.\nScore: {agent_1: 0.9, agent_2: 7, agent_3: x}", 3
    ) == [0.9, 1.0, None]
    assert parse_critic_scores("agent 1 = 0.25; agent-9: 1", 2) == [0.25, None]
    assert parse_critic_scores("", 2) == [None, None]
