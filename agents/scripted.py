"""Scripted policies: deterministic stand-ins for a language model, for testing agent and search logic.

A ``ScriptedPolicy`` implements the ``Policy`` protocol by calling a Python function instead of a
network. Two ways to script it:

- ``ScriptedPolicy(respond=fn)``: ``fn(prompt, rng) -> str`` decides each completion (it may look at
  the prompt and sample with ``rng``, a seeded ``random.Random``);
- ``ScriptedPolicy.replay([...])``: hand out fixed outputs in order, one per completion requested.

Log-probs are made up but consistent: each character costs ``char_logprob``, so ``score`` of a text
equals the ``logprob`` reported when it was generated. Every call is recorded in ``calls`` so tests
can assert what the agent asked for (batch sizes, prompts, stop strings).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from treeplay.agents.base import Completion, Prompt, Scored


def _as_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "".join(f"[{m['role']}] {m['content']}\n" for m in prompt) + "[assistant] "


@dataclass
class ScriptedCall:
    method: str
    prompts: list[str]
    n: int = 1
    kwargs: dict[str, Any] = field(default_factory=dict)


class ScriptedPolicy:
    """A ``Policy`` whose outputs come from a function or a fixed list.

    Args:
        respond: ``fn(prompt_text, rng) -> completion_text``.
        score_fn: Optional ``fn(prompt_text, continuation) -> total_logprob``; by default
            ``char_logprob * len(continuation)``.
        char_logprob: Per-character log-prob used for made-up token log-probs.
        seed: Seed of the policy's own rng when ``generate`` gets no seed.
    """

    def __init__(
        self,
        respond: Callable[[str, random.Random], str],
        score_fn: Callable[[str, str], float] | None = None,
        char_logprob: float = -0.1,
        seed: int = 0,
    ) -> None:
        self.respond = respond
        self.score_fn = score_fn
        self.char_logprob = char_logprob
        self.version = 0
        self.calls: list[ScriptedCall] = []
        self._rng = random.Random(seed)

    @classmethod
    def replay(cls, outputs: Iterable[str], **kwargs: Any) -> ScriptedPolicy:
        """A policy that returns ``outputs`` one by one; running out raises ``IndexError``."""
        queue = list(outputs)

        def respond(prompt: str, rng: random.Random) -> str:
            if not queue:
                raise IndexError("ScriptedPolicy.replay ran out of scripted outputs")
            return queue.pop(0)

        return cls(respond, **kwargs)

    def _completion(self, text: str, stop: Sequence[str] | None) -> Completion:
        reason = "length"
        if stop:
            cut = [(text.find(s), s) for s in stop if s and text.find(s) >= 0]
            if cut:
                i, _ = min(cut)
                text, reason = text[:i], "stop"
        ids = [ord(c) for c in text]
        return Completion(text=text, token_ids=ids, logprobs=[self.char_logprob] * len(ids), finish_reason=reason)

    def generate(
        self,
        prompts: Sequence[Prompt],
        n: int = 1,
        max_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> list[list[Completion]]:
        if not prompts:
            raise ValueError("generate() got an empty prompt list")
        if n < 1:
            raise ValueError(f"generate() needs n >= 1, got n={n}")
        texts = [_as_text(p) for p in prompts]
        self.calls.append(ScriptedCall("generate", texts, n, {"max_tokens": max_tokens, "stop": stop}))
        rng = random.Random(seed) if seed is not None else self._rng
        out = []
        for t in texts:
            out.append([self._completion(self.respond(t, rng)[:max_tokens], stop) for _ in range(n)])
        return out

    def score(
        self,
        prompts: Sequence[Prompt],
        continuations: Sequence[str],
        action_spans: Sequence[Sequence[tuple[int, int]] | None] | None = None,
    ) -> list[Scored]:
        """One log-prob per character; with action spans, ``total`` counts only the spans' characters."""
        if len(prompts) != len(continuations):
            raise ValueError(f"score() got {len(prompts)} prompts but {len(continuations)} continuations")
        texts = [_as_text(p) for p in prompts]
        self.calls.append(ScriptedCall("score", texts, 1, {"continuations": list(continuations)}))
        out = []
        for p, c in zip(texts, continuations, strict=True):
            if self.score_fn is not None:
                total = float(self.score_fn(p, c))
                per = [total / max(1, len(c))] * len(c)
            else:
                per = [self.char_logprob] * len(c)
                total = float(sum(per))
            out.append(Scored(total=total, token_logprobs=per))
        if action_spans is not None:
            for i, spans in enumerate(action_spans):
                if spans is not None:
                    mask = [any(a <= k < b for a, b in spans) for k in range(len(continuations[i]))]
                    per = out[i].token_logprobs
                    out[i] = Scored(sum(x for x, m in zip(per, mask, strict=True) if m), per, mask)
        return out

    def load_weights(self, version: int, state_dict: Mapping[str, Any]) -> None:
        self.version = version

    def close(self) -> None:
        pass
