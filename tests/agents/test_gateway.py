"""The OpenAI-compatible gateway (``agents.gateway``) with real clients over real loopback HTTP, the
real tiny BPE chat model behind it, and search over agent programs treeplay did not write."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import httpx
import openai
import pytest

from treeplay.agents.gateway.config import AgentConfig
from treeplay.agents.gateway.search import AgentSearch, run_agent_rollouts
from treeplay.agents.gateway.server import Call, Gateway, GatewayServer
from treeplay.agents.registry import make_environment
from treeplay.engines.contract import decode

AGENTS = "tests.helpers.gateway_agents"


@pytest.fixture(scope="module")
def engine(bpe_model_dir):
    from treeplay.engines import make_engine

    eng = make_engine("hf", bpe_model_dir, num_threads=1)
    yield eng
    eng.close()


@pytest.fixture
def server(engine):
    with GatewayServer(Gateway(engine, default_max_tokens=8, seed=3)) as srv:
        yield srv


@pytest.fixture(scope="module")
def tasks():
    return make_environment("arithmetic").tasks("train", 2, seed=5)


def test_the_plain_openai_client_is_served_and_every_token_is_kept(server):
    client = openai.OpenAI(base_url=server.session_url("ep"), api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["treeplay"]
    messages = [{"role": "user", "content": "12+30"}]
    first = client.chat.completions.create(model="m", messages=messages, max_tokens=6,
                                           extra_body={"return_token_ids": True})
    extra = first.model_extra
    ep = server.gateway.episodes["ep"]
    assert ep.calls[0].prompt_ids == extra["prompt_token_ids"]
    assert ep.calls[0].completion_ids == extra["completion_token_ids"]
    assert first.usage.completion_tokens == len(extra["completion_token_ids"]) <= 6
    messages += [first.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "again"}]
    client.chat.completions.create(model="m", messages=messages, max_tokens=6)
    # The second call's prompt is the first call's ids, the sampled ids as sampled, then the new turn.
    branch = ep.conversation.branches[0]
    assert len(ep.conversation.branches) == 1 and ep.calls[1].drift is None
    held = ep.calls[0].prompt_ids + ep.calls[0].completion_ids
    assert ep.calls[1].prompt_ids[:len(held)] == held
    assert branch.ids == ep.calls[1].prompt_ids + ep.calls[1].completion_ids
    assert [i for i, m in enumerate(branch.mask) if m] == (
        list(range(len(ep.calls[0].prompt_ids), len(held)))
        + list(range(len(ep.calls[1].prompt_ids), len(branch.ids))))
    # Raw completions, the bearer key as the episode id.
    raw = openai.OpenAI(base_url=server.url + "/v1", api_key="episode-7", max_retries=0)
    out = raw.completions.create(model="m", prompt="3+4=", max_tokens=4)
    assert out.choices[0].text == server.gateway.episodes["episode-7"].calls[0].text


def test_bad_requests_get_one_clear_line(server):
    client = openai.OpenAI(base_url=server.session_url("bad"), api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="streaming is not supported"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], n=2)
    with pytest.raises(openai.BadRequestError, match="messages must be a non-empty list"):
        client.chat.completions.create(model="m", messages=[])
    r = httpx.post(server.session_url("bad") + "/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]


def test_regression_a_reward_posted_twice_is_refused(server):
    client = openai.OpenAI(base_url=server.session_url("once"), api_key="unused", max_retries=0)
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "1+1"}], max_tokens=2)
    assert httpx.post(server.url + "/sessions/once/reward", json={"reward": 1.0}).status_code == 200
    second = httpx.post(server.url + "/sessions/once/reward", json={"reward": 0.0})
    assert second.status_code == 409 and "already has a reward" in second.json()["error"]["message"]
    assert server.gateway.episodes["once"].reward == 1.0
    assert httpx.post(server.url + "/sessions/nobody/reward", json={"reward": 1}).status_code == 404
    assert httpx.post(server.url + "/sessions/once/reward", json={"reward": "high"}).status_code == 400


def test_regression_a_client_that_disconnects_mid_call_loses_nothing(server):
    url = server.session_url("gone") + "/chat/completions"
    body = {"model": "m", "messages": [{"role": "user", "content": "count"}], "max_tokens": 200}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url, json=body, timeout=0.05)
    deadline = time.monotonic() + 60
    while not server.gateway.episodes["gone"].calls:
        assert time.monotonic() < deadline, "the call the client left was never recorded"
        time.sleep(0.05)
    call = server.gateway.episodes["gone"].calls[0]
    assert call.completion_ids and len(call.logprobs) == len(call.completion_ids)
    shown = httpx.get(server.url + "/sessions/gone").json()
    assert shown["calls"][0]["completion_tokens"] == len(call.completion_ids)


DROPS_EARLIER_TURNS = (  # like templates that strip earlier assistant turns' reasoning
    "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
    "{{ '<|im_start|>assistant\n(earlier answer)<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_regression_a_history_the_template_re_renders_becomes_a_new_branch(engine):
    """The most-reported agent-RL bug: a template that drops earlier content makes the second call's
    text disagree with the ids served. The gateway records a drift and starts a new branch; each
    branch's ids are exactly what the policy saw and wrote, and no whole-episode sample spans both."""
    template = engine.tokenizer.chat_template
    engine.tokenizer.chat_template = DROPS_EARLIER_TURNS
    try:
        with GatewayServer(Gateway(engine, default_max_tokens=6)) as srv:
            client = openai.OpenAI(base_url=srv.session_url("d"), api_key="unused", max_retries=0)
            messages = [{"role": "user", "content": "5+6"}]
            first = client.chat.completions.create(model="m", messages=messages)
            messages += [first.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "so?"}]
            client.chat.completions.create(model="m", messages=messages)
            ep = srv.gateway.episodes["d"]
    finally:
        engine.tokenizer.chat_template = template
    assert ep.calls[0].drift is None and "differs from what was served" in ep.calls[1].drift
    assert [c.branch for c in ep.calls] == [0, 1] and len(ep.conversation.branches) == 2
    second = ep.conversation.branches[1]
    assert decode(engine.tokenizer, second.ids[:len(ep.calls[1].prompt_ids)]).count("(earlier answer)") == 1
    assert second.ids == ep.calls[1].prompt_ids + ep.calls[1].completion_ids


def test_regression_a_replayed_prefix_gives_identical_requests_and_token_ids(server, tasks):
    """Tree mode's replay: the agent program re-run with the first call answered from the record
    sends a byte-identical second request, so its node is the recorded one's sibling, not a copy."""
    search = AgentSearch(server, _agent("two_call_agent"), None, AgentConfig(entry=f"{AGENTS}:two_call_agent",
                                                                              reward=f"{AGENTS}:length_reward"))
    live = search._episode(tasks[0], None)
    again = search._episode(tasks[0], replay=live.calls[:1])
    assert again.calls[0].replayed and not again.calls[1].replayed and again.calls[0].divergence is None
    assert again.calls[0].prompt_ids == live.calls[0].prompt_ids
    assert again.calls[0].completion_ids == live.calls[0].completion_ids
    assert again.calls[1].prompt_ids == live.calls[1].prompt_ids  # the same request, token for token
    assert again.branches[0].ids[:len(live.calls[1].prompt_ids)] == live.calls[1].prompt_ids


def test_tree_search_over_an_agent_program_branches_at_calls_and_pairs_siblings(engine, tasks, tmp_path):
    from treeplay.learners.logprobs import record_tokens
    from treeplay.store import queries
    from treeplay.store.database import open_store

    cfg = AgentConfig(entry=f"{AGENTS}:two_call_agent", reward=f"{AGENTS}:length_reward", episodes=6, width=2)
    results, stats = run_agent_rollouts(tasks, engine, None, cfg, environment="arithmetic", seed=1)
    assert stats["replayed_calls"] > 0 and stats["divergences"] == 0 and stats["drifts"] == 0
    assert stats["mean_engine_batch"] > 1  # concurrent episodes' calls shared engine calls
    for r in results:
        nodes = r.trees[0].nodes
        root = nodes[0]
        assert root.visits == len([t for t in r.trajectories if t.outcome is not None]) >= 4
        for n in nodes[1:]:  # a node's visits are those of its children plus the episodes ending there
            kids = [c for c in nodes if c.parent_key == n.key]
            assert n.visits == sum(c.visits for c in kids) + (1 if n.terminal and not kids else 0) or not n.terminal
        for p in r.pairs:
            assert p.source == "mcts" and p.info["chosen_q"] > p.info["rejected_q"]
            assert record_tokens(engine.tokenizer, p.prompt, [p.chosen, p.rejected], p.info) is not None
    assert sum(len(r.pairs) for r in results) > 0
    store = open_store(f"sqlite:///{tmp_path}/store.db")
    run_id = queries.start_run(store, "agent", {})
    queries.start_iteration(store, run_id, 0, 0)
    queries.write_task_results(store, run_id, 0, results)
    data = queries.preference_data(store, run_id, 0)
    assert len(data.pairs) == sum(len(r.pairs) for r in results)
    assert len(queries.list_trees(store, run_id, 0)) == len(tasks)


def test_regression_a_nondeterministic_agent_diverges_and_is_never_merged(engine, tasks):
    cfg = AgentConfig(entry=f"{AGENTS}:restless_agent", reward=f"{AGENTS}:length_reward", episodes=4, width=2)
    results, stats = run_agent_rollouts(tasks[:1], engine, None, cfg, seed=2)
    assert stats["divergences"] >= 1
    tree = results[0].trees[0]
    diverged = [n for n in tree.nodes if (n.info or {}).get("divergence")]
    assert diverged and all(n.parent_key == 0 for n in diverged)  # a sibling with its own prompt
    for p in results[0].pairs:  # pairs only between siblings given the same prompt
        assert not {p.chosen_node, p.rejected_node} & {n.key for n in diverged}


def test_sample_mode_gives_outcome_pairs_and_a_ranked_list_of_whole_episodes(engine, tasks):
    from treeplay.learners.logprobs import record_tokens

    cfg = AgentConfig(entry=f"{AGENTS}:two_call_agent", reward=f"{AGENTS}:length_reward", search="sample",
                      episodes=6, success=0.5)
    results, stats = run_agent_rollouts(tasks, engine, None, cfg, seed=4)
    assert stats["episodes"] == 12 and stats["replayed_calls"] == 0
    for r in results:
        (ranked,) = r.ranked_lists
        assert record_tokens(engine.tokenizer, ranked.prompt, [i.text for i in ranked.items], ranked.info) is not None
        for p in r.pairs:
            tokens = record_tokens(engine.tokenizer, p.prompt, [p.chosen, p.rejected], p.info)
            assert tokens is not None and p.margin > 0
            # Only the policy's tokens are trained: the user turn between the two calls is context.
            assert len(tokens.spans[0]) == 2 and not all(tokens.masks[0])


def test_langgraph_agent_with_a_tool_runs_through_the_gateway(server, tasks):
    """A LangGraph ReAct agent (langchain-openai's ChatOpenAI) whose first call is answered from a
    replay table with a tool call: the agent runs its tool and sends the result back, the gateway
    maps the tool call it served back to the model's text (no drift), and the next call is live."""
    task = tasks[0]
    search = AgentSearch(server, _agent("langgraph_agent"), None,
                         AgentConfig(entry=f"{AGENTS}:langgraph_agent", reward=f"{AGENTS}:length_reward"))
    first = search._episode(task, None)  # live: the prompt LangGraph sends, token for token
    tok = server.gateway.tokenizer
    text = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    scripted = Call(0, 0, first.calls[0].prompt_ids, list(tok(text, add_special_tokens=False)["input_ids"]),
                    [0.0] * len(tok(text, add_special_tokens=False)["input_ids"]), text, "stop")
    run = search._episode(task, replay=[scripted])
    assert run.error is None and run.calls[0].replayed and len(run.calls) >= 2
    assert run.calls[1].drift is None and len(run.branches) == 1
    second_prompt = decode(tok, run.calls[1].prompt_ids)
    assert second_prompt.count(text) == 1 and "<|im_start|>tool\n5<|im_end|>" in second_prompt


def test_openai_agents_sdk_agent_runs_through_the_gateway(server, tmp_path):
    """The OpenAI Agents SDK imports as `agents`; run from outside the repository it is the SDK's,
    beside treeplay (installed as treeplay.agents) in the same venv."""
    script = tmp_path / "sdk_agent.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from openai import AsyncOpenAI
        from agents import Agent, OpenAIChatCompletionsModel, Runner, set_tracing_disabled
        import treeplay.agents
        set_tracing_disabled(True)
        client = AsyncOpenAI(base_url={server.session_url('sdk')!r}, api_key="unused", max_retries=0)
        agent = Agent(name="solver", instructions="Answer.",
                      model=OpenAIChatCompletionsModel(model="policy", openai_client=client))
        print(repr(Runner.run_sync(agent, "2+3", max_turns=2).final_output))
    """))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    if "No module named 'agents'" in out.stderr or "cannot import name 'Agent'" in out.stderr:
        pytest.skip("the OpenAI Agents SDK (openai-agents) is not installed in this venv")
    assert out.returncode == 0, out.stderr[-2000:]
    calls = server.gateway.episodes["sdk"].calls
    assert calls and calls[0].completion_ids and len(calls[0].logprobs) == len(calls[0].completion_ids)


def _agent(name):
    from treeplay.agents.gateway.config import load_callable

    return load_callable(f"{AGENTS}:{name}", "agent")


def test_held_out_evaluation_runs_the_agent_program_at_the_evaluations_temperature(engine, tasks):
    """eval.agent=program: one episode of the user's program per held-out task, every call sampled at
    the evaluation's temperature whatever the program asks (two_call_agent asks for 1.0): greedy
    evaluation is repeatable, and each episode makes the program's two calls."""
    from treeplay.agents.gateway.search import evaluate_agent_program

    cfg = AgentConfig(entry=f"{AGENTS}:two_call_agent", reward=f"{AGENTS}:length_reward", template="plain")
    env = make_environment("arithmetic")
    greedy = [evaluate_agent_program(tasks, engine, env, cfg, temperature=0.0, seed=s) for s in (1, 2)]
    assert greedy[0] == greedy[1] and len(greedy[0]) == len(tasks)
    assert all(0.0 <= x <= 1.0 for x in greedy[0])

    gateway = Gateway(engine, temperature=0.0)
    assert gateway.sampling({"temperature": 1.0, "max_tokens": 4}).temperature == 0.0
    assert Gateway(engine).sampling({"temperature": 0.7, "max_tokens": 4}).temperature == 0.7
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        Gateway(engine, temperature=-1.0)


def test_eval_agent_program_needs_an_agent_program():
    from treeplay.orchestrator.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="eval.agent"):
        load_config(None, ["eval.agent=program"])
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "agent.yaml", [])
    assert cfg.eval.agent == "program" and cfg.rollout.agent is not None
