"""Batch the policy calls of episodes that run as threads, in deterministic lock step.

An agent whose control flow is a graph per episode (``agents.react``: rubric -> act -> verify ->
retry) asks its policy for one completion at a time. Run one episode per thread instead and give
each thread a ``LockstepBatcher.policy(...)`` wrapper: a call blocks until every running episode is
either waiting in a call or finished, and then all waiting calls are served together, one
``generate`` per (policy, n, sampling settings), the prompts in task order. Which calls share a batch
therefore depends only on the tasks and what the policies return, never on thread timing, so a
seeded run is as reproducible as a sequential one (though not identical to it: a batch is sampled
with the seed of its first call).

A batch whose ``generate`` raises is served again one call at a time, so one bad prompt fails its own
episode only (``agents.episode.generate_guarded`` turns the exception into that episode's error).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from treeplay.agents.base import Completion, Policy, Prompt

T = TypeVar("T")
R = TypeVar("R")


class _Call:
    __slots__ = ("policy", "prompts", "n", "kwargs", "result", "error")

    def __init__(self, policy: Policy, prompts: list[Prompt], n: int, kwargs: dict[str, Any]) -> None:
        self.policy, self.prompts, self.n, self.kwargs = policy, prompts, n, kwargs
        self.result: list[list[Completion]] | None = None
        self.error: BaseException | None = None


class LockstepBatcher:
    """Coordinates up to ``parallel`` episode threads (see the module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._next = 0
        self._waiting: dict[int, _Call] = {}  # task index -> its thread's pending call
        self._local = threading.local()
        self.batches = 0  # generate calls made (for tests and stats)

    def policy(self, inner: Policy) -> Policy:
        """``inner`` as seen by the episode threads: its ``generate`` batched, the rest passed through."""
        return _BatchedPolicy(self, inner)

    def run(self, items: Sequence[T], work: Callable[[T], R], parallel: int) -> list[R]:
        """``work(item)`` for every item, ``parallel`` at a time, results in order.

        Items start in order: the first ``parallel`` together, then each as one finishes, taken in
        the same locked step that counts the finished one out, so no batch is served while an
        episode is between two items. An exception in ``work`` stops new items and is raised once
        the running ones end.
        """
        if not items:
            return []
        results: list[Any] = [None] * len(items)
        threads = max(1, min(parallel, len(items)))
        errors: list[BaseException] = []
        with self._cond:
            self._running, self._next = threads, threads

        def worker(i: int | None) -> None:
            while i is not None:
                self._local.index = i
                try:
                    results[i] = work(items[i])
                except BaseException as e:  # noqa: BLE001 - raised by run() after the others end
                    errors.append(e)
                with self._cond:
                    self._running -= 1
                    i = None
                    if not errors and self._next < len(items):
                        i, self._next = self._next, self._next + 1
                        self._running += 1
                    self._flush_if_ready()
            self._local.index = None

        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="episode") as pool:
            for f in [pool.submit(worker, k) for k in range(threads)]:
                f.result()
        if errors:
            raise errors[0]
        return results

    # -- inside the threads ------------------------------------------------------------------------

    def _generate(self, policy: Policy, prompts: Sequence[Prompt], n: int, kwargs: dict[str, Any]):
        index = getattr(self._local, "index", None)
        if index is None:  # called from outside run(): no one to batch with
            return policy.generate(list(prompts), n=n, **kwargs)
        call = _Call(policy, list(prompts), n, kwargs)
        with self._cond:
            self._waiting[index] = call
            self._flush_if_ready()
            while call.result is None and call.error is None:
                self._cond.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def _flush_if_ready(self) -> None:
        """Serve every waiting call once all running episodes wait (called holding the lock)."""
        if not self._waiting or len(self._waiting) < self._running:
            return
        calls = [self._waiting[i] for i in sorted(self._waiting)]
        self._waiting.clear()
        groups: dict[tuple, list[_Call]] = {}
        for c in calls:
            key = (id(c.policy), c.n, tuple(sorted((k, repr(v)) for k, v in c.kwargs.items() if k != "seed")))
            groups.setdefault(key, []).append(c)
        for group in groups.values():
            self._serve(group)
        self._cond.notify_all()

    def _serve(self, group: list[_Call]) -> None:
        first = group[0]
        prompts = [p for c in group for p in c.prompts]
        self.batches += 1
        try:
            out = first.policy.generate(prompts, n=first.n, **first.kwargs)
            if len(out) != len(prompts):
                raise ValueError(f"policy generate returned {len(out)} lists for {len(prompts)} prompts")
        except Exception as e:  # noqa: BLE001 - served again one by one: each call gets its own outcome
            if len(group) == 1:
                first.error = e
            else:
                for c in group:
                    self._serve([c])
            return
        at = 0
        for c in group:
            c.result = out[at : at + len(c.prompts)]
            at += len(c.prompts)


class _BatchedPolicy:
    """A policy whose ``generate`` waits for its batch (``LockstepBatcher``); anything else, such as
    ``version`` or ``score``, is the wrapped policy's."""

    def __init__(self, batcher: LockstepBatcher, inner: Policy) -> None:
        self._batcher, self._inner = batcher, inner

    def generate(self, prompts: Sequence[Prompt], n: int = 1, **kwargs: Any) -> list[list[Completion]]:
        return self._batcher._generate(self._inner, prompts, n, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
