"""Panel of peers with scripted judges of known bias; credit re-assignment with scripted critics."""

from __future__ import annotations

import re

import pytest

from treeplay.agents.base import Task
from treeplay.agents.credit import (
    PolicyCritic,
    StepCheckCritic,
    assign_credit,
    credit_states,
    parse_critic_scores,
)
from treeplay.agents.envs.arithmetic import ArithmeticEnv
from treeplay.agents.multi import Agent, run_multi_agent_episodes
from treeplay.agents.panel import ExactAnswerJudge, PanelConfig, Peer, parse_likert, run_panel
from treeplay.agents.prompt_files import fill, load_prompt
from treeplay.agents.scripted import ScriptedPolicy

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


# -- panel: distinct votes, the verifier's classes, prompts that fit -----------------------------------


def judged_response(prompt: str) -> str:
    return prompt.split("Response:\n", 1)[1].split("\n\nReply with", 1)[0]


def test_regression_panel_verifier_outranks_self_judgment():
    # One policy backs all three peers and, as a judge, likes the wrong answer best. The exact-answer
    # verifier must still decide: no pair may have a chosen side it rejects.
    tasks = ArithmeticEnv(ops=1).tasks("train", 3, seed=0)
    answers = {t.prompt: int(t.answer) for t in tasks}
    written: dict[str, int] = {}

    def respond(prompt: str, rng) -> str:
        if prompt.startswith("Score one response"):
            response = judged_response(prompt)
            return likert(5 if response.startswith("clearly") else 3 if response.startswith("so it is") else 1)
        k = written[prompt] = written.get(prompt, -1) + 1
        a = answers[prompt]
        return [f"so it is {a}", f"{a}", f"clearly {a + 1}"][k % 3]

    policy = ScriptedPolicy(respond)
    peers = [Peer(f"peer-{i}", policy) for i in range(3)]
    exact = ExactAnswerJudge()
    results = run_panel(peers, tasks, PanelConfig(n_candidates=3, min_chosen=0.5, min_gap=0.2), judges=[exact])
    pairs = [p for r in results for p in r.pairs]
    assert pairs, "a verified-correct candidate over the wrong one is a pair here"
    by_prompt = {t.prompt: t for t in tasks}
    for p in pairs:
        assert exact.score(by_prompt[p.prompt], [p.chosen])[0].score == 1.0
        assert p.chosen.startswith("so it is") and p.rejected.startswith("clearly")
        assert p.info["chosen_verified"] is True and p.info["rejected_verified"] is False
    for r in results:
        ranked = [i.text for i in r.ranked_list().items]
        assert all(not t.startswith("clearly") for t in ranked[:-3])  # wrong answers rank last
        wrong = [c for c in r.candidates if c.text.startswith("clearly")]
        right = [c for c in r.candidates if not c.text.startswith("clearly")]
        assert max(c.aggregate for c in wrong) <= 0.5 <= min(c.aggregate for c in right)


def test_verifier_never_lets_a_rejected_answer_be_chosen_even_when_it_alone_is_left():
    task = Task(id="t", prompt="2+2\n", answer="4")
    wrong_only = ScriptedPolicy(lambda p, r: likert(5) if p.startswith("Score") else "5, surely")
    loud = ScriptedPolicy(lambda p, r: likert(5) if p.startswith("Score") else "it is 7")
    cfg = PanelConfig(n_candidates=1, min_chosen=0.0, min_gap=0.0)
    [r] = run_panel([Peer("a", wrong_only), Peer("b", loud)], [task], cfg, judges=[ExactAnswerJudge()])
    assert r.pairs == [] and {c.verified for c in r.candidates} == {False}


def test_identical_judgments_are_counted_once():
    # Three peers on one policy judging greedily give the same judgment three times: it is ONE vote.
    shared = ScriptedPolicy(lambda p, r: likert(5) if p.startswith("Score") else "shared answer")
    other = ScriptedPolicy(lambda p, r: likert(1) if p.startswith("Score") else "other answer")
    peers = [Peer("a1", shared), Peer("a2", shared), Peer("a3", shared), Peer("b", other)]
    tasks = [Task(id="t", prompt="Q?\n")]
    [r] = run_panel(peers, tasks, PanelConfig(n_candidates=1, judge_temperature=0.0))
    assert all(c.aggregate == pytest.approx(0.5) for c in r.candidates)  # (1.0 + 0.0) / 2, not 0.75
    judging = [c for c in shared.calls if c.prompts[0].startswith("Score")]
    assert len(judging) == 1 and len(judging[0].prompts) == 4  # asked once for the 4 candidates
    votes = [j for j in r.judgments if j.target_kind == "candidate" and j.judge != "panel"]
    assert {j.judge for j in votes} == {"a1", "b"} and len(votes) == 2 * 4
    assert all(j.info["peers"] == ["a1", "a2", "a3"] for j in votes if j.judge == "a1")
    assert {j.info["judges"] for j in r.judgments if j.judge == "panel"} == {2}


def test_sampled_judges_on_one_policy_are_distinct_votes():
    seen_seeds = []

    def respond(prompt: str, rng) -> str:
        if prompt.startswith("Score"):
            return likert(rng.randint(1, 5))
        return f"answer {rng.random()}"

    policy = ScriptedPolicy(respond)
    original = policy.generate

    def generate(prompts, n=1, **kw):
        seen_seeds.append((prompts[0][:5], kw.get("temperature"), kw.get("seed")))
        return original(prompts, n=n, **kw)

    policy.generate = generate
    peers = [Peer(f"p{i}", policy) for i in range(3)]
    [r] = run_panel(peers, [Task(id="t", prompt="Q?\n")], PanelConfig(n_candidates=1, seed=7))
    judge_calls = [s for s in seen_seeds if s[0] == "Score"]
    assert len(judge_calls) == 3 and len({s[2] for s in judge_calls}) == 3
    assert {s[1] for s in judge_calls} == {PanelConfig().judge_temperature} and PanelConfig().judge_temperature > 0
    cand = r.candidates[0]
    votes = [j.score for j in r.judgments if j.target_text == cand.text and j.judge in {"p0", "p1", "p2"}]
    assert len(votes) == 3 and cand.aggregate == pytest.approx(sum(votes) / 3)


def test_regression_truncation_keeps_panel_judge():
    # A judge prompt is never cut: it fits whole (instructions, question, candidate) or is not sent.
    template = load_prompt("panel_judge.txt")
    short = Task(id="s", prompt="Question 1?\n")
    long = Task(id="l", prompt="Question 2? " + "Some context. " * 30 + "\n")
    limit = len(fill(template, prompt=short.prompt.strip(), response="great answer")) + 20
    peers = [peer("p-great", "great answer"), peer("p-poor", "poor answer")]
    results = run_panel(peers, [short, long], PanelConfig(n_candidates=1, max_prompt_chars=limit))
    for p in peers:
        judge_prompts = [q for c in p.policy.calls for q in c.prompts if "Response:" in q]
        assert len(judge_prompts) == 2  # the short task's two candidates only
        for q in judge_prompts:
            assert len(q) <= limit and q.startswith(template.split("{", 1)[0])
            assert "Question 1?" in q and judged_response(q) in {"great answer", "poor answer"}
            assert q.rstrip().endswith("rationale: <one sentence>")
    s, lg = results
    assert {c.text: c.aggregate for c in s.candidates} == {"great answer": 1.0, "poor answer": 0.0}
    failed = [j for j in lg.judgments if j.info and j.info.get("error")]
    assert len(failed) == 2 * 2 and all("panel judge prompt does not fit" in j.info["error"] for j in failed)
    assert all(c.aggregate is None for c in lg.candidates) and lg.pairs == []


def test_regression_truncation_keeps_credit_critic():
    tasks, agents, trajs = multi_agent_run()
    traj = trajs[0]
    for s in traj.steps:  # long observations, so the transcript outgrows the limit
        s.observation = "observed " + "x" * 400
    state = credit_states([traj])[1]
    critic = PolicyCritic(ScriptedPolicy(lambda p, r: "Score: {agent_1: 1}"), max_prompt_chars=600)
    prompt = critic.prompt(state)
    assert len(prompt) <= 600
    assert prompt.startswith(load_prompt("credit_critic.txt").split("{", 1)[0])
    assert traj.task.prompt.strip() in prompt and re.search(r"\[\.\.\. \d+ characters cut \.\.\.\]", prompt)
    for k, p in enumerate(state.proposals, 1):
        assert f"agent_{k}: {p.action}" in prompt
    assert prompt.rstrip().endswith("}") and "Score: {agent_1: <0-1>" in prompt
    tiny = PolicyCritic(ScriptedPolicy(lambda p, r: "Score: {agent_1: 1}"), max_prompt_chars=100)
    assert tiny.score_states([state]) == [[None] * len(state.proposals)] and tiny.policy.calls == []
    assert all("credit critic prompt does not fit" in p.info["credit_error"] for p in state.proposals)


def test_shipped_panel_config_records_judgments_the_tiny_model_cannot_take():
    # configs/panel.yaml says: a judge prompt does not fit its max_prompt_chars, so every peer
    # judgment is recorded failed with the reason and the verifier alone decides the pairs.
    from pathlib import Path

    from treeplay.orchestrator.config import load_config

    cfg = load_config(Path(__file__).parents[2] / "configs" / "panel.yaml")
    env = ArithmeticEnv(**cfg.env.kwargs)
    tasks = env.tasks("train", 4, seed=0)
    answers = {t.prompt: t.answer for t in tasks}
    policy = ScriptedPolicy(lambda p, r: f"{answers[p]}" if r.random() < 0.5 else "1")
    peers = [Peer(f"peer-{i}", policy) for i in range(cfg.rollout.num_agents)]
    results = run_panel(peers, tasks, cfg.rollout.panel, judges=[ExactAnswerJudge()])
    assert len(policy.calls) == len(peers)  # candidates only: no judge prompt was sent
    for r in results:
        peer_judgments = [j for j in r.judgments if j.judge.startswith("peer-")]
        assert peer_judgments and all("panel judge prompt does not fit" in j.info["error"] for j in peer_judgments)
        for p in r.pairs:
            assert p.chosen == r.task.answer and p.rejected != r.task.answer
    assert any(r.pairs for r in results)


def test_regression_exact_judge_matches_a_word_answer_without_numbers():
    """A task whose answer is a word: a candidate that is that word is correct, another word is not.

    The old check looked for a number first and returned False when the candidate had none, so a
    word answer could only ever match when the candidate happened to contain digits."""
    judge = ExactAnswerJudge()
    task = Task(id="w", prompt="Capital of Borvia?", answer="Kelmaron")
    scores = [j.score for j in judge.score(task, ["Kelmaron", "  Kelmaron\n", "Tesh", "Kelmaron 12"])]
    assert scores == [1.0, 1.0, 0.0, 0.0]
    numeric = Task(id="n", prompt="2+2=", answer="4")
    assert [j.score for j in judge.score(numeric, ["4", "it is 4.0", "5", "four"])] == [1.0, 1.0, 0.0, 0.0]
