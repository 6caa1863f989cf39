"""One wave of the batched MCTS (``search.mcts``): every leaf the trees asked for is expanded at once.

``expand_wave`` makes ONE ``policy.generate`` call for the leaves of all trees, turns the samples
into candidate steps (``normalise_step`` drops near-duplicates, ``prior`` gives each its
length-normalised prior), steps each candidate in an environment replayed to its parent (parked
environments are reused), makes ONE ``policy.score`` call for the wave's self-evaluations (and the
priors of reference steps), and adds the children with their value, reward and outcome.
``search.mcts`` decides which leaves to expand (selection, backup, commits) and calls this.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from treeplay.agents.base import Environment, Policy, StepResult, TokenIds
from treeplay.agents.prompt_files import load_prompt
from treeplay.search.state import MCTSConfig, TreeRun

# The fixed instructions come first so that all self-evaluation prompts of a wave share a prefix.
_SELF_EVAL = load_prompt("self_eval.txt", "treeplay.search")
_SELF_EVAL_REFERENCE = load_prompt("self_eval_reference.txt", "treeplay.search")


def normalise_step(text: str) -> str:
    """The key two candidate steps must share to count as duplicates: case-folded, whitespace-free.

    MCTS-DPO compares steps with a BERTScore-like cosine on the policy's hidden states; engines here
    expose text and log-probs only, so near-duplicates are the steps equal after this normalisation.
    """
    return re.sub(r"\s+", "", text).casefold()


def prior(logprobs: Sequence[float], length_penalty: float) -> float:
    """Length-normalised prior ``exp(Σ logπ / L^λ)`` (1.0 for an empty step)."""
    n = len(logprobs)
    if n == 0:
        return 1.0
    return math.exp(float(sum(logprobs)) / n**length_penalty)


# --------------------------------------------------------------------------------- one wave
@dataclass
class _Candidate:
    run: TreeRun
    parent: int
    step: str
    logprob: float = 0.0
    tokens: int = 0
    prior: float = 1.0
    error: str | None = None
    needs_prior: bool = False
    from_reference: bool = False
    result: StepResult | None = None
    self_eval: float | None = None
    env: Environment | None = None  # the environment that took the step, parked at the new node
    token_ids: list[int] | None = None  # the step and its newline in the policy's tokens (token mode)


def expand_wave(
    requests: list[tuple[TreeRun, int]],
    env_factory: Callable[[], Environment],
    policy: Policy,
    cfg: MCTSConfig,
    wave: int,
    version: int,
) -> tuple[int, int]:
    """Expand one leaf per active tree with one generate call (and at most one score call)."""
    prompts = [_context(run, node) for run, node in requests]
    widths = [cfg.root_width if run.tree[node]["depth"] == 0 else cfg.width for run, node in requests]
    policy_error: str | None = None
    outputs: list[Any] = []
    try:
        outputs = policy.generate(
            prompts,
            n=max(widths),
            max_tokens=cfg.max_step_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            stop=list(cfg.stop),
            seed=cfg.seed + wave,
        )
        if len(outputs) != len(prompts):
            policy_error = f"policy returned {len(outputs)} completion lists for {len(prompts)} prompts"
    except Exception as e:  # a broken engine must not kill the batch; it is recorded on the nodes
        policy_error = f"policy.generate raised {type(e).__name__}: {e}"

    cands: list[_Candidate] = []
    for i, ((run, node), k) in enumerate(zip(requests, widths, strict=True)):
        run.expanded.add(node)
        run.expansions += 1
        if policy_error is not None:
            cands.append(_Candidate(run, node, "", error=policy_error))
            continue
        cands.extend(_candidates(run, node, list(outputs[i] or [])[:k], cfg))

    # Step the environment for every candidate (replaying paths from reset where needed).
    for c in cands:
        if c.error is None:
            _step_env(c, env_factory, cfg)

    # One score call: self-evaluation verdicts and priors of injected reference steps.
    score_calls = _score_wave(cands, policy, cfg)

    for c in cands:
        _add_child(c, cfg, version)
    return 1, score_calls


def _context(run: TreeRun, node: int) -> Any:
    """What the policy is prompted with at ``node``: the path's token ids when the tree keeps them,
    else its text."""
    if run.tokens is not None:
        ids = run.tree.token_context(node)
        if ids is not None:
            return TokenIds(tuple(ids))
    return run.tree.text(node)


def _candidates(run: TreeRun, node: int, completions: list[Any], cfg: MCTSConfig) -> list[_Candidate]:
    """Turn sampled completions into de-duplicated candidate steps (at most ``breadth_limit``)."""
    tree = run.tree
    seen = {normalise_step(tree[c]["step"]) for c in tree.children(node)}
    good: list[_Candidate] = []
    bad: list[_Candidate] = []
    if cfg.include_reference_steps and run.task.reference:
        ref = [s for s in run.task.reference.splitlines() if s.strip()]
        done = [normalise_step(a) for a, _ in tree.steps(node)]
        if len(done) < len(ref) and done == [normalise_step(s) for s in ref[: len(done)]]:
            step = ref[len(done)].strip()
            seen.add(normalise_step(step))
            ids = None if run.tokens is None else list(run.tokens.encode(step + "\n"))
            good.append(_Candidate(run, node, step, needs_prior=True, from_reference=True, token_ids=ids))
    for comp in completions:
        try:
            text = str(comp.text)
            logps = [float(x) for x in comp.logprobs]
        except Exception as e:  # not a Completion at all
            bad.append(_Candidate(run, node, "", error=f"policy returned {type(comp).__name__}: {e}"))
            continue
        step = text.strip()
        if not step:
            bad.append(_Candidate(run, node, "", error="empty step"))
            continue
        if "\x00" in step:
            # A byte-level BPE model can sample any byte; a NUL cannot be stored (PostgreSQL text)
            # and no environment reads it: the step fails, its text is kept escaped.
            bad.append(_Candidate(run, node, step.replace("\x00", "\\x00"), error="step contains a NUL character"))
            continue
        key = normalise_step(step)
        if key in seen:
            continue
        seen.add(key)
        token_ids = None
        if run.tokens is not None:
            # The sampled ids that spell the kept step, then what the cut left out and the newline
            # that ends the line: the ids the next expansion is prompted with and the learner scores.
            token_ids = list(run.tokens.align([int(t) for t in comp.token_ids], step + "\n"))
        good.append(
            _Candidate(
                run,
                node,
                step,
                logprob=float(sum(logps)),
                tokens=len(logps),
                prior=prior(logps, cfg.length_penalty),
                token_ids=token_ids,
            )
        )
    if not completions and not good:
        bad.append(_Candidate(run, node, "", error="policy returned no completions"))
    keep = good[: cfg.breadth_limit]
    # Failures are kept (one of each kind, if room) so the tree shows what went wrong there.
    kinds: set[str] = set()
    for b in bad:
        if len(keep) >= cfg.breadth_limit and good:
            break
        if b.error not in kinds:
            kinds.add(b.error or "")
            keep.append(b)
    return keep


def _acquire_env(run: TreeRun, node: int, env_factory: Callable[[], Environment]) -> Environment:
    """An environment whose episode is at ``node``: a parked one (used once) or a replay from reset."""
    env = run.parked.pop(node, None)
    if env is not None:
        return env
    env = run.free.pop() if run.free else env_factory()
    try:
        env.reset(run.task)
        for action, _ in run.tree.steps(node):
            env.step(action)
            run.env_steps += 1
    except Exception:
        _release_env(run, env)
        raise
    return env


def _release_env(run: TreeRun, env: Environment) -> None:
    if len(run.free) < 4:
        run.free.append(env)
    else:
        close_env(env)


def close_env(env: Environment) -> None:
    close = getattr(env, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            pass


def _step_env(c: _Candidate, env_factory: Callable[[], Environment], cfg: MCTSConfig) -> None:
    run = c.run
    try:
        env = _acquire_env(run, c.parent, env_factory)
    except Exception as e:
        c.error = f"environment raised {type(e).__name__} while replaying the path: {e}"
        return
    try:
        c.result = env.step(c.step)
        run.env_steps += 1
        if not isinstance(c.result, StepResult):
            raise TypeError(f"step returned {type(c.result).__name__}, not StepResult")
    except Exception as e:
        c.error = f"environment raised {type(e).__name__}: {e}"
        c.result = None
        _release_env(run, env)
        return
    # Parking the environment at the new node saves a replay when the chain expands it next.
    if not c.result.done and cfg.env_cache_size > 0:
        c.env = env
    else:
        _release_env(run, env)


def _self_eval_prompt(c: _Candidate, cfg: MCTSConfig) -> str:
    task = c.run.task
    reference = ""
    if cfg.self_eval_sees_reference and task.reference:
        reference = _SELF_EVAL_REFERENCE.format(reference=task.reference.rstrip("\n"))
    solution = c.run.tree.continuation(c.parent, c.run.tree.root) + c.step + "\n"
    return _SELF_EVAL.format(
        question=task.prompt.rstrip("\n"), reference=reference, solution=solution.rstrip("\n")
    )


def _score_wave(cands: list[_Candidate], policy: Policy, cfg: MCTSConfig) -> int:
    prompts: list[Any] = []
    conts: list[str] = []
    slots: list[tuple[_Candidate, str]] = []
    for c in cands:
        if c.error is not None:
            continue
        if c.needs_prior:
            prompts.append(_context(c.run, c.parent))
            conts.append(c.step)
            slots.append((c, "prior"))
        if cfg.self_eval:
            p = _self_eval_prompt(c, cfg)
            prompts += [p, p]
            conts += [cfg.verdict_correct, cfg.verdict_incorrect]
            slots += [(c, "yes"), (c, "no")]
    if not prompts:
        return 0
    try:
        scored = policy.score(prompts, conts)
        if len(scored) != len(prompts):
            raise ValueError(f"score returned {len(scored)} results for {len(prompts)} prompts")
    except Exception as e:  # without scores the children fall back to outcome-only values
        for c, _ in slots:
            c.run.tree.info.setdefault("score_errors", []).append(f"{type(e).__name__}: {e}")
        return 1
    yes: dict[int, float] = {}
    for (c, what), s in zip(slots, scored, strict=True):
        if what == "prior":
            c.logprob, c.tokens = float(s.total), len(s.token_logprobs)
            c.prior = prior(s.token_logprobs, cfg.length_penalty)
        elif what == "yes":
            yes[id(c)] = float(s.total)
        else:
            a, b = yes[id(c)], float(s.total)
            m = max(a, b)
            c.self_eval = math.exp(a - m) / (math.exp(a - m) + math.exp(b - m))
    return 1


def _add_child(c: _Candidate, cfg: MCTSConfig, version: int) -> None:
    """Score a candidate (value, reward, outcome) and add it under its parent."""
    run, tree = c.run, c.run.tree
    parent = tree[c.parent]
    depth = parent["depth"] + 1
    v_parent = float(parent["estimate"])
    info: dict[str, Any] = {}
    if c.from_reference:
        info["from_reference"] = True
    env_reward, terminal, correct, outcome = 0.0, False, None, 0.0
    if c.error is not None:
        terminal, correct, outcome = True, False, -1.0
    else:
        res = c.result
        assert res is not None
        env_reward = float(res.reward)
        info.update({k: v for k, v in (res.info or {}).items() if isinstance(v, (bool, int, float, str))})
        if res.done:
            terminal = True
            flag = (res.info or {}).get("correct")
            correct = bool(flag) if isinstance(flag, bool) else env_reward >= cfg.success_reward
            outcome = 1.0 if correct else 2.0 * min(max(env_reward, 0.0), 1.0) - 1.0
        elif depth >= cfg.max_depth:
            # The episode ran out of steps without an answer: scored like a wrong answer.
            terminal, correct, outcome = True, False, -1.0
            info["truncated"] = True
    C = c.self_eval
    v = C / max(parent["depth"] - 3, 1) if C else v_parent
    v += outcome
    r = v - v_parent
    observation = (c.result.observation if c.result is not None else "") or ""
    observation_ids = None
    if run.tokens is not None and c.token_ids is None:
        # A failed step (empty, NUL, policy error) has no sampled ids; its rendered line does.
        c.token_ids = list(run.tokens.encode(c.step + "\n"))
    if run.tokens is not None:
        # Tokenized alone, rendered as step_segments renders it (with its own final newline).
        observation_ids = list(run.tokens.encode(observation if observation.endswith("\n") else observation + "\n")) if observation else []
    key = tree.add_child(
        c.parent,
        c.step,
        observation=observation,
        token_ids=c.token_ids,
        observation_ids=observation_ids,
        visits=0,
        value=float(parent["V"]) + r,
        V=0.0,
        estimate=v,
        prior=float(c.prior),
        reward=r,
        self_eval=C,
        env_reward=env_reward,
        terminal=terminal,
        correct=correct,
        policy_version=version,
        logprob=float(c.logprob),
        tokens=int(c.tokens),
        error=c.error,
        info=info,
    )
    env = c.env
    if env is not None:
        if terminal:
            _release_env(run, env)
        else:
            run.parked[key] = env
            while len(run.parked) > cfg.env_cache_size:
                _, old = run.parked.popitem(last=False)
                _release_env(run, old)
