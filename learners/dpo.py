"""Iterative DPO on preference pairs from the store: sigmoid DPO, IPO, MCTS-DPO, SimPO, + NLL (RPO).

    learner = DPOLearner("runs/tiny-model", DPOConfig(lr=1e-4, beta=0.1, loss_type="sigmoid"))
    metrics = learner.train(preference_data)      # one iteration; call again next iteration
    weights = learner.state_dict()                # for redeploy
    learner.save("runs/ckpt-3")                   # a Hugging Face directory

Each micro-batch groups its pairs by prompt and runs one packed row per prompt (prompt and the
responses' common prefix computed once; see logprobs.py), for the policy and for the reference.
The loss is the chosen pairwise loss plus ``nll_weight`` times the length-normalised NLL of the
chosen response (iterative RPO; 1.0 by default because plain DPO on a tiny model's own samples
stalls, see docs/tiny-models.md).

Tokenization and EOS: a pair that carries the ids the policy was prompted with and generated
(``info["tokens"]``, from a search run token in, token out) is trained on those ids; otherwise
prompt and responses are tokenized separately and concatenated (as the engines' ``score()`` does). With ``append_eos="final"`` (default) an EOS is appended to both
responses only when the pair's ``info["final"]`` is true: a step-level pair's responses are
intermediate steps, after which the model must keep going, so teaching it to stop there would be
wrong. Whole-answer pairs from a producer that knows they end the episode set ``final``.

Action mask: a pair's responses may hold environment text (observations between an agent's
actions); only the tokens inside the pair's action spans are scored, in every sum, length and NLL
term (see logprobs.py).

MCTS-DPO (``loss_type="mcts_dpo"``, ``losses.mcts_dpo_loss``): log-probs are summed from the first
token where chosen and rejected differ, and the conservative-DPO smoothing is the visit-count alpha
when both visit counts are on the record (else the record's ``label_smoothing``). For the other losses the
shared prefix still lives in the packed trunk, but its tokens count in both sums (they cancel in
DPO's margin; they matter for IPO's lengths and the NLL term).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from treeplay.learners import losses
from treeplay.learners.base import LearnerOutput
from treeplay.learners.config import DPOConfig
from treeplay.learners.epochs import StatsMeter, evaluate_batches, run_epochs
from treeplay.learners.logprobs import (
    Group,
    common_prefix_length,
    encode_masked_response,
    encode_prompt,
    fit_length,
    pack,
    packed_logprobs,
    record_tokens,
    sequence_sums,
)
from treeplay.learners.trainable import TrainablePolicy
from treeplay.store.records import PairRecord, PreferenceData


@dataclass
class PairExample:
    """A tokenized pair (prompt already truncated to fit).

    ``chosen_mask``/``rejected_mask`` flag the tokens the policy wrote (the rest is environment
    text, context only); ``shared`` counts the scored tokens the two responses share before they
    part (where MCTS-DPO starts its sums).
    """

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    chosen_mask: tuple[bool, ...]
    rejected_mask: tuple[bool, ...]
    shared: int
    weight: float
    smoothing: float
    chosen_visits: int
    rejected_visits: int

    @property
    def chosen_key(self) -> tuple[tuple[int, ...], tuple[bool, ...]]:
        return self.chosen, self.chosen_mask

    @property
    def rejected_key(self) -> tuple[tuple[int, ...], tuple[bool, ...]]:
        return self.rejected, self.rejected_mask


def first_steps(
    text: str, spans: list[tuple[int, int]] | None, k: int
) -> tuple[str, list[tuple[int, int]] | None, bool]:
    """``text`` up to the end of its ``k``-th step, the spans inside it, and whether anything was cut.

    A step is an action span (or, without spans, a line). Context after the k-th step goes too.
    """
    if spans is None:
        lines = text.splitlines(keepends=True)
        return "".join(lines[:k]), None, len(lines) > k
    if len(spans) <= k:
        return text, spans, False
    end = spans[k - 1][1]
    return text[:end], spans[:k], True


class DPOLearner(LearnerOutput):
    """Trains a policy on preference pairs; keeps optimizer state across ``train()`` calls.

    Args:
        model_path: Hugging Face directory of the starting policy (also the fixed reference).
        config: Settings; keyword overrides are applied on top.
    """

    trains_on = "pairs"

    def __init__(self, model_path: str | Path, config: DPOConfig | None = None, **overrides: Any):
        cfg = (config or DPOConfig()).model_copy(update=overrides)
        self.config = DPOConfig.model_validate(cfg.model_dump())
        if self.config.loss_type == "simpo":
            self.config = self.config.model_copy(update={"reference": "none"})
        self.policy = TrainablePolicy(model_path, self.config)

    # -- data -------------------------------------------------------------------------------------

    def _eos(self, pair: PairRecord) -> bool:
        mode = self.config.append_eos
        return mode == "always" or (mode == "final" and bool((pair.info or {}).get("final")))

    def prepare(self, pairs: list[PairRecord]) -> list[PairExample]:
        """Tokenize pairs (their recorded ids, else prompt and responses separately), mask what the
        policy did not write, and truncate to ``max_length``. A pair with no policy-written token left on a side is dropped."""
        tok = self.policy.tokenizer
        out = []
        for p in pairs:
            eos = self._eos(p)
            ids = record_tokens(tok, p.prompt, [p.chosen, p.rejected], p.info)
            if ids is not None:
                # The ids the policy was prompted with and generated (token in, token out).
                prompt_ids = ids.prompt
                chosen, c_mask = list(ids.responses[0]), list(ids.masks[0])
                rejected, r_mask = list(ids.responses[1]), list(ids.masks[1])
                k = self.config.rejected_steps
                if k is not None and len(ids.spans[1]) > k:
                    end = ids.spans[1][k - 1][1]
                    rejected, r_mask, eos = rejected[:end], r_mask[:end], False
                for seq, mask, final in ((chosen, c_mask, self._eos(p)), (rejected, r_mask, eos)):
                    if final and tok.eos_token_id is not None:
                        seq.append(tok.eos_token_id)
                        mask.append(True)
            else:
                rejected_text, rejected_spans = p.rejected, p.action_spans("rejected")
                if self.config.rejected_steps is not None:
                    rejected_text, rejected_spans, cut = first_steps(
                        rejected_text, rejected_spans, self.config.rejected_steps
                    )
                    eos = eos and not cut
                (chosen, c_mask), (rejected, r_mask) = (
                    encode_masked_response(tok, p.chosen, p.action_spans("chosen"), self._eos(p)),
                    encode_masked_response(tok, rejected_text, rejected_spans, eos),
                )
                prompt_ids = encode_prompt(tok, p.prompt)
            prompt, (chosen, rejected) = fit_length(prompt_ids, [chosen, rejected], self.config.max_length)
            c_mask, r_mask = c_mask[: len(chosen)], r_mask[: len(rejected)]
            if not any(c_mask) or not any(r_mask):
                continue
            shared = common_prefix_length(
                [list(zip(chosen, c_mask, strict=True)), list(zip(rejected, r_mask, strict=True))]
            )
            out.append(
                PairExample(
                    tuple(prompt),
                    tuple(chosen),
                    tuple(rejected),
                    tuple(c_mask),
                    tuple(r_mask),
                    sum(c_mask[:shared]),
                    p.weight,
                    p.label_smoothing or self.config.label_smoothing,
                    # -1: unknown (a pair not from a search tree); the loss then uses ``smoothing``.
                    p.chosen_visits if p.chosen_visits is not None and p.rejected_visits is not None else -1,
                    p.rejected_visits if p.chosen_visits is not None and p.rejected_visits is not None else -1,
                )
            )
        return out

    # -- loss -------------------------------------------------------------------------------------

    def micro_loss(self, batch: list[PairExample], meter: StatsMeter) -> losses.LossOutput:
        """Loss of one micro-batch (mean over its pairs) with stats recorded in ``meter``."""
        groups: dict[tuple[int, ...], tuple[Group, dict[Any, int]]] = {}
        for ex in batch:
            if ex.prompt not in groups:
                groups[ex.prompt] = (Group(list(ex.prompt), [], masks=[]), {})
            group, seen = groups[ex.prompt]
            for key in (ex.chosen_key, ex.rejected_key):
                if key not in seen:
                    seen[key] = len(group.responses)
                    group.responses.append(list(key[0]))
                    group.masks.append(list(key[1]))  # type: ignore[union-attr]
        offsets, n = {}, 0
        for key, (group, _) in groups.items():
            offsets[key] = n
            n += len(group.responses)
        packed = pack([g for g, _ in groups.values()], self.policy.tokenizer.pad_token_id).to(
            self.policy.device
        )
        mcts = self.config.loss_type == "mcts_dpo"
        chosen_spans, rejected_spans, full_chosen = [], [], []
        for ex in batch:
            base, seen = offsets[ex.prompt], groups[ex.prompt][1]
            start = ex.shared if mcts else 0
            chosen_spans.append((base + seen[ex.chosen_key], start))
            rejected_spans.append((base + seen[ex.rejected_key], start))
            full_chosen.append((base + seen[ex.chosen_key], 0))
        spans = chosen_spans + rejected_spans
        b = len(batch)
        dev = self.policy.device
        lengths = torch.tensor(
            [len(packed.seq_tokens[s]) - st for s, st in spans], device=dev, dtype=torch.float32
        )
        weights = torch.tensor([ex.weight for ex in batch], device=dev, dtype=torch.float32)

        policy_tokens = packed_logprobs(self.policy.model, packed).values
        sums = sequence_sums(packed, policy_tokens, spans + full_chosen)
        pol_c, pol_r, pol_full = sums[:b], sums[b : 2 * b], sums[2 * b :]
        ref_c = ref_r = None
        if self.policy.reference is not None:
            with torch.no_grad():
                ref_tokens = packed_logprobs(self.policy.reference, packed).values
                ref_sums = sequence_sums(packed, ref_tokens, spans)
            ref_c, ref_r = ref_sums[:b], ref_sums[b:]

        cfg = self.config
        if cfg.loss_type == "sigmoid":
            eps = torch.tensor([ex.smoothing for ex in batch], device=dev)
            out = losses.dpo_loss(pol_c, pol_r, ref_c, ref_r, cfg.beta, eps, weights)
        elif cfg.loss_type == "mcts_dpo":
            out = losses.mcts_dpo_loss(
                pol_c,
                pol_r,
                ref_c,
                ref_r,
                torch.tensor([ex.chosen_visits for ex in batch], device=dev),
                torch.tensor([ex.rejected_visits for ex in batch], device=dev),
                cfg.beta,
                weights,
                fallback_smoothing=torch.tensor([ex.smoothing for ex in batch], device=dev),
            )
            meter.add("alpha", out.stats["alpha"], b)
        elif cfg.loss_type == "ipo":
            out = losses.ipo_loss(pol_c, pol_r, ref_c, ref_r, lengths[:b], lengths[b:], cfg.beta, weights)
        else:
            out = losses.simpo_loss(
                pol_c, pol_r, lengths[:b], lengths[b:], cfg.beta, cfg.simpo_gamma, weights
            )
        total = cfg.pair_weight * out.loss
        meter.add("pair_loss", out.loss.detach(), b)
        if cfg.nll_weight > 0:
            chosen_len = torch.tensor([sum(ex.chosen_mask) for ex in batch], device=dev, dtype=torch.float32)
            nll = losses.nll_loss(pol_full, chosen_len, weights)
            total = total + cfg.nll_weight * nll.loss
            meter.add("nll_loss", nll.loss.detach(), b)
        s = out.stats
        meter.add("reward_chosen", s["chosen_rewards"], b)
        meter.add("reward_rejected", s["rejected_rewards"], b)
        meter.add("reward_margin", s["margins"], b)
        meter.add("reward_accuracy", s["accuracies"], b)
        meter.add("logp_chosen", pol_c.detach(), b)
        meter.add("logp_rejected", pol_r.detach(), b)
        meter.add("tokens_per_batch", float(packed.segments.ge(0).sum()), 1)
        return losses.LossOutput(total, {**s, "pair_loss": out.loss.detach()})

    # -- public API -------------------------------------------------------------------------------

    def _examples(self, data: PreferenceData | list[PairRecord]) -> list[PairExample]:
        pairs = data.pairs if isinstance(data, PreferenceData) else list(data)
        if not pairs:
            raise ValueError("DPOLearner.train needs at least one preference pair; the data has none")
        examples = self.prepare(pairs)
        if not examples:
            raise ValueError(
                f"DPOLearner.train: none of the {len(pairs)} pairs has a policy-written token on both sides"
            )
        return examples

    def train(self, data: PreferenceData | list[PairRecord]) -> dict[str, Any]:
        """One iteration: ``epochs`` passes over the pairs.

        Returns:
            Metrics: ``loss`` (total), ``pair_loss``, ``nll_loss``, ``reward_chosen``,
            ``reward_rejected``, ``reward_margin``, ``reward_accuracy``, ``logp_chosen``,
            ``logp_rejected``, ``grad_norm``, ``first_loss``, ``updates``, ``skipped_updates``,
            ``last_skip_reason`` (if any), ``pairs``, ``pairs_per_s``, ``seconds``, ``healthy``.

        Raises:
            ValueError: No pairs.
        """
        examples = self._examples(data)
        self.policy.begin_iteration()
        metrics = run_epochs(self.policy, examples, self.micro_loss, unit="pairs")
        metrics["pairs"] = float(len(examples))
        return metrics

    @torch.no_grad()
    def evaluate(self, data: PreferenceData | list[PairRecord]) -> dict[str, float]:
        """Loss and implicit-reward statistics of the current policy, without updating it."""
        return evaluate_batches(self._examples(data), self.micro_loss, self.config.batch_size)
