"""An OpenAI-compatible gateway in front of a policy engine, and search over black-box agent programs.

An agent written with any framework that speaks the OpenAI API (the plain ``openai`` client,
LangGraph through ``langchain-openai``, the OpenAI Agents SDK) trains with treeplay by changing its
``base_url``; nothing in it is rewritten.

- ``tokens``: token in, token out. Each episode keeps the token ids the engine generated and their
  log-probs; a new call encodes only the messages added since the last one, and a history that does
  not extend what was served (an edited message, a chat template that re-renders earlier turns) is
  detected and becomes a new branch of the episode, never a silently wrong training sample.
- ``server``: the HTTP server (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``,
  per-episode routes under ``/sessions/{sid}/v1``, ``/sessions/{sid}/reward``), which gathers the
  concurrent requests of many episodes into one engine call.
- ``search``: sample mode (N live episodes per task) and tree mode (the agent program re-executed
  with a replay table: the calls on a recorded path are answered from the tree, the call at the
  branching point is sampled), turned into the store's records: a tree whose nodes are calls, the
  episodes as trajectories, and preference pairs.

docs/agents.md shows the clients and the configuration.
"""

from __future__ import annotations

__all__: list[str] = []
