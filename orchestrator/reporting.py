"""Driver-side summaries of an iteration's rollouts: the per-chunk stats the workers send back,
merged into the iteration's metrics, the idle time of the workers between chunks, and the live
line the progress bar shows while chunks stream in."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def rollout_summary(stats: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Merge per-chunk stats: sums for counts, task-weighted means for rates."""
    total = sum(s.get("tasks", 0.0) for s in stats) or 1.0
    out: dict[str, float] = {}
    for key in {k for s in stats for k in s}:
        vals = [(s.get(key, 0.0), s.get("tasks", 0.0)) for s in stats]
        if key in {"solved", "reward"}:
            out[key] = sum(v * w for v, w in vals) / total
        else:
            out[key] = sum(v for v, _ in vals)
    return out


def worker_idle_s(spans: dict[int, list[tuple[float, float]]]) -> float:
    """Seconds the rollout workers stood idle between two chunks of one iteration, summed over the
    workers: from the end of one chunk to the start of that worker's next (what queued chunks,
    ``rollout.chunks_per_worker``, save). ``spans``: each worker's (started, finished) wall-clock
    times per chunk."""
    idle = 0.0
    for chunks in spans.values():
        chunks = sorted(chunks)
        idle += sum(max(0.0, nxt[0] - prev[1]) for prev, nxt in zip(chunks, chunks[1:], strict=False))
    return idle


def live_line(index: int, stats: list[dict[str, float]], seconds: float,
               workers: Sequence[int | None] = (), learning: str = "") -> str:
    """The progress bar's text while chunks stream in: what the rollouts have found so far, the
    version each worker serves and, in a pipelined run, what the learner is doing."""
    s = rollout_summary(stats)
    parts = [f"iter {index} rollouts"]
    if workers:
        parts.append("workers " + " ".join(f"v{v}" for v in workers))
    if "solved" in s:
        parts.append(f"solved {s['solved']:.0%}")
    if "reward" in s:
        parts.append(f"reward {s['reward']:.2f}")
    parts.append(f"{int(s.get('pairs', 0))} pairs")
    if s.get("nodes"):
        parts.append(f"{s['nodes'] / max(seconds, 1e-9):.0f} nodes/s")
    parts.append(f"{s.get('tasks', 0) / max(seconds, 1e-9):.0f} tasks/s")
    if learning:
        parts.append(learning)
    return " | ".join(parts)
