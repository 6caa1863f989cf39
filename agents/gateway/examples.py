"""Agent programs written as a user writes them, for configs/agent.yaml and docs/agents.md.

Each is ``fn(task, base_url) -> final answer`` and knows nothing of treeplay beyond the URL: the same
code runs against any OpenAI-compatible server.
"""

from __future__ import annotations

from typing import Any


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def langgraph_react(task: Any, base_url: str) -> str:
    """A LangGraph ReAct agent with one tool (``add``) on langchain-openai's ``ChatOpenAI``; each
    model turn is one line (the arithmetic tasks' answers are one line, ``12+30=42``)."""
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from langgraph.prebuilt import create_react_agent

    model = ChatOpenAI(model="policy", base_url=base_url, api_key="unused", temperature=1.0, max_retries=0,
                       stop=["\n"])
    agent = create_react_agent(model, [tool(add)])
    out = agent.invoke({"messages": [("user", task.prompt)]}, {"recursion_limit": 8})
    return out["messages"][-1].content


def openai_chat(task: Any, base_url: str) -> str:
    """One chat call with the plain ``openai`` client."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="policy", messages=[{"role": "user", "content": task.prompt}])
    return reply.choices[0].message.content or ""
