"""Agent programs for the gateway tests, written as a user would: plain OpenAI-client code that knows
nothing of treeplay but the ``base_url`` it is given."""

from __future__ import annotations

import openai


def two_call_agent(task, base_url: str) -> str:
    """Asks for a first thought, then for the answer, keeping the conversation as any chat client does."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": task.prompt}]
    first = client.chat.completions.create(model="policy", messages=messages, max_tokens=8, temperature=1.0)
    messages += [first.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "Answer:"}]
    second = client.chat.completions.create(model="policy", messages=messages, max_tokens=6, temperature=1.0)
    return second.choices[0].message.content or ""


def length_reward(task, answer) -> float:
    """A reward that varies with what was sampled, so the mechanics have something to rank."""
    return float(len(answer or "") % 3) / 2.0


def digit_share_reward(task, answer) -> float:
    """The share of digits in the answer: it varies with what a fixed-length answer says (a reward by
    length would not), so siblings of a tree differ."""
    text = answer or ""
    return sum(ch.isdigit() for ch in text) / max(1, len(text))


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def langgraph_agent(task, base_url: str) -> str:
    """A LangGraph ReAct agent with one tool, on langchain-openai's ChatOpenAI pointed at the gateway."""
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from langgraph.prebuilt import create_react_agent

    model = ChatOpenAI(model="policy", base_url=base_url, api_key="unused", max_tokens=8, temperature=1.0,
                       max_retries=0)
    graph = create_react_agent(model, [tool(add)])
    out = graph.invoke({"messages": [("user", task.prompt)]}, {"recursion_limit": 6})
    return out["messages"][-1].content


_runs = {"n": 0}


def restless_agent(task, base_url: str) -> str:
    """An agent program that is not deterministic: each run words its first request differently."""
    _runs["n"] += 1
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": f"attempt {_runs['n']}: {task.prompt}"}]
    first = client.chat.completions.create(model="policy", messages=messages, max_tokens=6)
    messages += [first.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "Answer:"}]
    second = client.chat.completions.create(model="policy", messages=messages, max_tokens=4)
    return second.choices[0].message.content or ""
