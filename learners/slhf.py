"""SLHF: Stackelberg Learning from Human Feedback (Pásztor et al.), leader and follower in one model.

    learner = SLHFLearner("runs/tiny-model", preference=oracle, config=SLHFConfig())
    metrics = learner.train(prompts, steps=100)
    chains = learner.refine(prompts, n_rounds=2)   # [y0, y1, y2] per prompt

The *leader* answers a prompt x; the *follower* sees x and the leader's realised answer y and
writes a refinement y'. Both are the same network, told apart by the prompt: the follower's input
is the template ``prompts/slhf_follower.txt`` filled with x and y ("Improve the previous answer.
Phrase it as if it was the original response."). A preference oracle ``p(a > b | x)``, a callable
``(prompt, a, b) -> float`` passed in, compares them.

Each step (StackelbergGDA, REINFORCE, both players every step):
1. sample ``y ~ pi(.|x)`` and ``y' ~ omega(.|x, y)`` with the model itself (``temperature``, ``top_p``);
2. ``p = p(y > y' | x)``;
3. leader loss ``mean_b sum_t [beta k_t - (p - 0.5)] log pi(y_t)``, follower loss
   ``mean_b sum_t [beta k'_t - ((1 - p) - 0.5)] log omega(y'_t)`` with per-token KL estimates ``k``
   (k1 or k3 with its log-ratio clamped to [-40, 40], detached) against the reference model. Every
   log-prob is of the tempered distribution the token was sampled from (logits divided by
   ``temperature``), for the policy and the reference alike. The leader's reference input is x; the
   follower's is, by default (``follower_kl="prompt"``, the authors' default), also the bare x: the
   refinement is kept near what the reference model would answer to the question itself, so the
   follower cannot drift into text that only makes sense as an edit of y. ``follower_prompt`` is
   the authors' "standard" option, the reference given the full follower prompt;
4. ``L = L_leader + follower_weight * L_follower``, ``follower_weight > 1`` (two timescales: the
   follower must adapt faster than the leader for the game to converge); the leader's term can be
   applied only every ``leader_update_frequency`` steps.

Sampled token ids are used as they came out of the sampler (no re-tokenization), ending with EOS
when the sampler stopped there. ``refine`` is the inference-time use: a leader sample, then
``n_rounds`` follower refinements, each seeing only the latest response.

``VerifierOracle`` is the oracle the loop uses: an environment's exact verifier, which also scores
completions of partial solutions (step-level prompts) by replaying their steps first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from treeplay.agents.prompt_files import load_prompt
from treeplay.learners import losses
from treeplay.learners.base import LearnerOutput
from treeplay.learners.config import SLHFConfig
from treeplay.learners.epochs import StatsMeter
from treeplay.learners.logprobs import (
    Group,
    encode_prompt,
    pack,
    packed_logprobs,
    padded,
    per_sequence,
)
from treeplay.learners.trainable import TrainablePolicy
from treeplay.store.records import PreferenceData

Preference = Callable[[str, str, str], float]


class VerifierOracle:
    """``p(a > b | prompt)`` from an environment's exact verifier: 1 when only ``a`` solves the task,
    0 when only ``b`` does, 0.5 when both or neither do.

    ``prompt`` is a task's prompt or a partial solution of it: the prompt followed by the steps so
    far, as ``agents.base.transcript`` renders them (what step-level pairs from tree search or agent
    episodes carry). The steps are replayed from ``reset`` (environments are deterministic given the
    actions so far), checking that each observation is the one in the text, and the answer is then
    judged as the rest of the episode: its lines are stepped until the episode ends, and it solves
    the task if the reward there is at least ``success``. A prompt that is no known task's (partial)
    transcript gets 0.5 and is counted in ``counts()``: such preferences carry no signal.

    Args:
        env: An environment instance (used for one replay at a time).
        success: Reward at the end of the episode that counts as solved.
    """

    def __init__(self, env: Any, success: float = 1.0) -> None:
        self.env = env
        self.success = success
        self.tasks: dict[str, Any] = {}
        self.reset_counts()

    def add_tasks(self, tasks: Sequence[Any]) -> None:
        """Make these tasks known (their prompts are how a preference prompt is placed)."""
        self.tasks.update({t.prompt: t for t in tasks})

    def reset_counts(self) -> None:
        self.calls = 0
        self.unscored = 0

    def counts(self) -> dict[str, float]:
        """Calls since ``reset_counts`` and the fraction of them whose prompt could not be placed."""
        if not self.calls:
            return {}
        return {"oracle_calls": float(self.calls), "oracle_unscored": self.unscored / self.calls}

    def __call__(self, prompt: str, a: str, b: str) -> float:
        self.calls += 1
        va, vb = self.solves(prompt, a), self.solves(prompt, b)
        if va is None or vb is None:
            self.unscored += 1
            return 0.5
        return 0.5 if va == vb else float(va)

    def solves(self, prompt: str, answer: str) -> bool | None:
        """Whether ``answer``, continuing ``prompt``, solves the task; None if ``prompt`` is not a known
        task's prompt or a replayable partial solution of one."""
        for task in self._candidates(prompt):
            if self._replay(task, prompt[len(task.prompt) :]):
                return self._finish(answer)
        return None

    def _candidates(self, prompt: str) -> list[Any]:
        # Task prompts end in a newline (the environment protocol), so only the prefixes of
        # ``prompt`` that end at a newline can be one; the longest (most specific) first.
        ends = [i + 1 for i, ch in enumerate(prompt) if ch == "\n"]
        if not prompt.endswith("\n"):
            ends.append(len(prompt))
        return [self.tasks[prompt[:e]] for e in reversed(ends) if prompt[:e] in self.tasks]

    def _replay(self, task: Any, steps: str) -> bool:
        """Reset to ``task`` and step the actions of ``steps``; True when the text is reproduced and
        the episode is still running at its end."""
        try:
            self.env.reset(task)
            rest = steps
            while rest:
                action, newline, rest = rest.partition("\n")
                if not newline:
                    return False  # a transcript ends every action with a newline
                result = self.env.step(action)
                if result.done:
                    return False  # the prompt already runs past the end of the episode
                if result.observation:
                    shown = result.observation if result.observation.endswith("\n") else result.observation + "\n"
                    if not rest.startswith(shown):
                        return False
                    rest = rest[len(shown) :]
        except Exception:  # noqa: BLE001 - an environment that cannot replay the text cannot place it
            return False
        return True

    def _finish(self, answer: str) -> bool:
        """Step the answer's lines from the replayed state until the episode ends (as
        ``agents.episode.verify_completion`` does from ``reset``); environment errors are not solved."""
        try:
            for line in answer.split("\n"):
                if not line.strip():
                    continue
                result = self.env.step(line)
                if result.done:
                    return result.reward >= self.success
        except Exception:  # noqa: BLE001 - a broken environment means "not verified"
            return False
        return False


def load_follower_template(path: str | Path | None = None) -> str:
    """The follower prompt template (``{prompt}`` and ``{response}`` placeholders)."""
    if path is not None:
        return Path(path).read_text(encoding="utf-8")
    return load_prompt("slhf_follower.txt", "treeplay.learners")


def fill_follower_prompt(template: str, prompt: str, response: str) -> str:
    """The follower's input: ``template`` with the prompt and the response it refines filled in.

    The one place the follower's text is built: the learner trains on it, and held-out evaluation
    with ``eval.refine_rounds`` (orchestrator/rollouts.py) asks the rollout engine with it.
    """
    return template.replace("{prompt}", prompt).replace("{response}", response)


class SLHFLearner(LearnerOutput):
    """Trains leader and follower (one shared model) against a preference oracle.

    Args:
        model_path: Hugging Face directory of the starting policy (also the reference).
        preference: ``(prompt, a, b) -> p(a > b | prompt)`` in [0, 1].
        config: Settings; keyword overrides are applied on top.
    """

    trains_on = "prompts"
    needs_tasks = True

    resume_attributes = ("steps_done",)  # says when the leader updates (leader_update_frequency)

    def __init__(
        self,
        model_path: str | Path,
        preference: Preference,
        config: SLHFConfig | None = None,
        **overrides: Any,
    ):
        cfg = (config or SLHFConfig()).model_copy(update=overrides)
        self.config = SLHFConfig.model_validate(cfg.model_dump())
        self.preference = preference
        self.template = load_follower_template(self.config.follower_prompt)
        self.policy = TrainablePolicy(model_path, self.config)
        self.steps_done = 0

    def know_tasks(self, tasks: Sequence[Any]) -> None:
        """Hand the tasks behind the next ``train`` data to the oracle, when it places prompts by
        task (``VerifierOracle``); another preference function has no use for them."""
        add = getattr(self.preference, "add_tasks", None)
        if callable(add):
            add(tasks)

    # -- sampling ---------------------------------------------------------------------------------

    def follower_prompt(self, prompt: str, response: str) -> str:
        """The follower's input for a prompt and the response it refines."""
        return fill_follower_prompt(self.template, prompt, response)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], temperature: float | None = None) -> list[list[int]]:
        """One sampled response (token ids, ending in EOS if the sampler stopped) per prompt."""
        tok, model, dev = self.policy.tokenizer, self.policy.model, self.policy.device
        ids = [encode_prompt(tok, p) for p in prompts]
        width = max(len(i) for i in ids)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=dev)
        attention = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=dev)
        temp = self.config.temperature if temperature is None else temperature
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            do_sample=temp > 0,
            temperature=temp if temp > 0 else None,
            top_p=self.config.top_p,
            top_k=0,
            max_new_tokens=self.config.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
        )[:, width:].tolist()
        responses = []
        for row in out:
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id) + 1]
            responses.append(row)
        return responses

    def _text(self, ids: list[int]) -> str:
        return self.policy.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def refine(
        self, prompts: Sequence[str], n_rounds: int = 1, temperature: float | None = None
    ) -> list[list[str]]:
        """Inference-time refinement: a leader answer, then ``n_rounds`` follower refinements.

        Only the most recent response is in the follower's context (not the whole chain).

        Returns:
            Per prompt, ``[y_0, y_1, ..., y_n]`` as text.
        """
        chains = [[self._text(r)] for r in self.sample(prompts, temperature)]
        for _ in range(n_rounds):
            follower_inputs = [self.follower_prompt(p, c[-1]) for p, c in zip(prompts, chains, strict=True)]
            for c, r in zip(chains, self.sample(follower_inputs, temperature), strict=True):
                c.append(self._text(r))
        return chains

    # -- training ---------------------------------------------------------------------------------

    def _losses(self, rollout: dict[str, Any], meter: StatsMeter, train_leader: bool) -> torch.Tensor:
        cfg, tok = self.config, self.policy.tokenizer
        b = len(rollout["prompts"])
        groups = [
            Group(encode_prompt(tok, p), [y])
            for p, y in zip(rollout["prompts"], rollout["leader"], strict=True)
        ]
        groups += [
            Group(encode_prompt(tok, fp), [y])
            for fp, y in zip(rollout["follower_prompts"], rollout["follower"], strict=True)
        ]
        packed = pack(groups, tok.pad_token_id).to(self.policy.device)
        temp = cfg.temperature  # score the samples under the distribution they were drawn from
        pol = per_sequence(packed, packed_logprobs(self.policy.model, packed, temperature=temp).values)
        with torch.no_grad():
            if cfg.follower_kl == "prompt":
                # The reference scores the follower's tokens as an answer to the bare prompt x.
                ref_groups = groups[:b] + [
                    Group(encode_prompt(tok, p), [y])
                    for p, y in zip(rollout["prompts"], rollout["follower"], strict=True)
                ]
                ref_packed = pack(ref_groups, tok.pad_token_id).to(self.policy.device)
            else:
                ref_packed = packed
            ref = per_sequence(ref_packed, packed_logprobs(self.policy.reference, ref_packed, temperature=temp).values)
        kl = [losses.kl_estimate(p.detach(), r, cfg.kl) for p, r in zip(pol, ref, strict=True)]
        pref = torch.tensor(rollout["preference"], device=self.policy.device, dtype=torch.float32)
        lead_lp, lead_mask = padded(pol[:b])
        lead_kl, _ = padded(kl[:b])
        fol_lp, fol_mask = padded(pol[b:])
        fol_kl, _ = padded(kl[b:])
        lead = losses.slhf_leader_loss(lead_lp, lead_kl, lead_mask, pref, cfg.beta, cfg.score_baseline)
        fol = losses.slhf_follower_loss(fol_lp, fol_kl, fol_mask, pref, cfg.beta, cfg.score_baseline)
        meter.add("leader_loss", lead.loss.detach(), b)
        meter.add("follower_loss", fol.loss.detach(), b)
        meter.add("preference", pref, b)
        meter.add("follower_win_rate", 1 - pref, b)
        meter.add("kl_leader", lead.stats["kl"], b)
        meter.add("kl_follower", fol.stats["kl"], b)
        meter.add("length_leader", lead.stats["length"], b)
        meter.add("length_follower", fol.stats["length"], b)
        total = cfg.follower_weight * fol.loss
        return total + lead.loss if train_leader else total

    def rollout(self, prompts: Sequence[str]) -> dict[str, Any]:
        """Sample leader answers and follower refinements, and ask the oracle about each pair."""
        leader = self.sample(prompts)
        leader_text = [self._text(y) for y in leader]
        follower_prompts = [self.follower_prompt(p, y) for p, y in zip(prompts, leader_text, strict=True)]
        follower = self.sample(follower_prompts)
        follower_text = [self._text(y) for y in follower]
        preference = [
            min(1.0, max(0.0, float(self.preference(p, y, y2))))
            for p, y, y2 in zip(prompts, leader_text, follower_text, strict=True)
        ]
        return {
            "prompts": list(prompts),
            "leader": leader,
            "follower_prompts": follower_prompts,
            "follower": follower,
            "preference": preference,
        }

    def train(self, data: Sequence[str] | PreferenceData, steps: int | None = None) -> dict[str, Any]:
        """Run StackelbergGDA steps on prompts (one pass over them by default).

        Args:
            data: Prompts, or PreferenceData whose pairs' and lists' prompts are used.
            steps: Number of steps of ``batch_size`` prompts (cycling through them); default
                ``epochs`` passes.

        Returns:
            Metrics: ``loss``, ``leader_loss``, ``follower_loss``, ``preference`` (mean p(y > y')),
            ``follower_win_rate``, ``kl_leader``, ``kl_follower``, ``length_leader``,
            ``length_follower``, ``grad_norm``, ``updates``, ``skipped_updates``,
            ``last_skip_reason`` (if any), ``steps_per_s``, ``seconds``, ``healthy``.

        Raises:
            ValueError: No prompts.
        """
        if isinstance(data, PreferenceData):
            prompts = list(
                dict.fromkeys([p.prompt for p in data.pairs] + [r.prompt for r in data.ranked_lists])
            )
        else:
            prompts = list(data)
        if not prompts:
            raise ValueError("SLHFLearner.train needs at least one prompt; the data has none")
        cfg = self.config
        bs = cfg.batch_size
        if steps is None:
            steps = cfg.epochs * math.ceil(len(prompts) / bs)
        self.policy.begin_iteration()
        meter = StatsMeter()
        skipped_before, updates_before = self.policy.skipped_updates, self.policy.updates
        reset_counts = getattr(self.preference, "reset_counts", None)
        if callable(reset_counts):
            reset_counts()
        t0 = time.perf_counter()
        rollout = None
        for _ in range(steps):
            start = (self.steps_done * bs) % len(prompts)
            batch = [prompts[(start + i) % len(prompts)] for i in range(min(bs, len(prompts)))]
            rollout = self.rollout(batch)
            train_leader = self.steps_done % cfg.leader_update_frequency == 0
            self.steps_done += 1
            loss = self._losses(rollout, meter, train_leader)
            finite = bool(torch.isfinite(loss.detach()))
            if finite:
                meter.add("loss", loss.detach(), len(batch))
                loss.backward()
            applied, norm = self.policy.update(finite)
            if applied:
                meter.add("grad_norm", norm)
        if cfg.verify_at_end and rollout is not None:
            self.policy.verify(lambda: self._losses(rollout, StatsMeter(), True))
        seconds = time.perf_counter() - t0
        metrics: dict[str, Any] = meter.means()
        metrics.update(
            updates=float(self.policy.updates - updates_before),
            skipped_updates=float(self.policy.skipped_updates - skipped_before),
            seconds=seconds,
            steps_per_s=steps / seconds if seconds > 0 else math.nan,
            healthy=float(self.policy.healthy),
        )
        if self.policy.skipped_updates > skipped_before and self.policy.last_skip_reason:
            metrics["last_skip_reason"] = self.policy.last_skip_reason
        counts = getattr(self.preference, "counts", None)
        if callable(counts):
            metrics.update(counts())  # the oracle's calls, and the share it could not place
        return metrics

    @torch.no_grad()
    def win_rate(self, prompts: Sequence[str]) -> float:
        """Mean ``1 - p(y > y')`` of fresh follower refinements against fresh leader answers."""
        r = self.rollout(prompts)
        return 1 - sum(r["preference"]) / len(r["preference"])
