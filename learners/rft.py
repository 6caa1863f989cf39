"""Rejection-sampling fine-tuning (RFT): NLL on the policy's own verified-correct responses.

    learner = RFTLearner("runs/tiny-model", RFTConfig(lr=1e-4))
    metrics = learner.train(PreferenceData(ranked_lists=lists))

The baseline every self-improvement method has to beat (Yuan et al. 2023, "Scaling relationship on
learning mathematical reasoning with large language models"; STaR, Zelikman et al. 2022, is the same
loop with rationalisation): sample, keep what the verifier accepts, fine-tune on it. It reads ranked
lists, whose ``info["correct"]`` holds the verifier's verdict per item: sample mode writes one list
per task with its distinct samples, MCTS writes one per branching point with each branch's end. Every
verified-correct item, once per (prompt, text), is a training example; the loss is its
length-normalised NLL over the tokens the policy wrote (the action mask, see logprobs.py). No
reference model. Responses of one prompt are packed into one row (prompt computed once).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from treeplay.learners import losses
from treeplay.learners.base import LearnerOutput
from treeplay.learners.config import RFTConfig
from treeplay.learners.epochs import StatsMeter, evaluate_batches, run_epochs
from treeplay.learners.logprobs import (
    Group,
    encode_masked_response,
    encode_prompt,
    fit_length,
    pack,
    packed_logprobs,
    record_tokens,
    sequence_sums,
)
from treeplay.learners.trainable import TrainablePolicy
from treeplay.store.records import PreferenceData, RankedListRecord


@dataclass
class RFTExample:
    """A tokenized verified-correct response and its action mask."""

    prompt: tuple[int, ...]
    response: tuple[int, ...]
    mask: tuple[bool, ...]


class RFTLearner(LearnerOutput):
    """Fine-tunes a policy on its verified-correct responses.

    Args:
        model_path: Hugging Face directory of the starting policy.
        config: Settings; keyword overrides are applied on top.
    """

    trains_on = "ranked_lists"

    def __init__(self, model_path: str | Path, config: RFTConfig | None = None, **overrides: Any):
        cfg = (config or RFTConfig()).model_copy(update=overrides)
        self.config = RFTConfig.model_validate({**cfg.model_dump(), "reference": "none"})
        self.policy = TrainablePolicy(model_path, self.config)

    def prepare(self, lists: list[RankedListRecord]) -> list[RFTExample]:
        """The verified-correct items of ``lists``, distinct per prompt, tokenized and masked."""
        tok, cfg = self.policy.tokenizer, self.config
        out: list[RFTExample] = []
        kept: dict[str, set[str]] = {}
        for rec in lists:
            correct = (rec.info or {}).get("correct")
            if not isinstance(correct, list) or len(correct) != len(rec.items):
                continue
            mine = kept.setdefault(rec.prompt, set())
            recorded = record_tokens(tok, rec.prompt, [it.text for it in rec.items], rec.info)
            for i, item in enumerate(rec.items):
                if correct[i] is not True or item.text in mine or len(mine) >= cfg.max_per_prompt:
                    continue
                if recorded is not None:  # the ids the policy was prompted with and generated
                    prompt_ids, ids, mask = recorded.prompt, recorded.responses[i], recorded.masks[i]
                else:
                    prompt_ids = encode_prompt(tok, rec.prompt)
                    ids, mask = encode_masked_response(tok, item.text, rec.action_spans(i))
                prompt, (ids,) = fit_length(prompt_ids, [ids], cfg.max_length)
                mask = mask[: len(ids)]
                if not any(mask):
                    continue
                mine.add(item.text)
                out.append(RFTExample(tuple(prompt), tuple(ids), tuple(mask)))
        return out

    def micro_loss(self, batch: list[RFTExample], meter: StatsMeter) -> losses.LossOutput:
        """Mean length-normalised NLL of a micro-batch; responses of one prompt share a row."""
        groups: dict[tuple[int, ...], Group] = {}
        for ex in batch:
            g = groups.setdefault(ex.prompt, Group(list(ex.prompt), [], masks=[]))
            g.responses.append(list(ex.response))
            g.masks.append(list(ex.mask))  # type: ignore[union-attr]
        packed = pack(list(groups.values()), self.policy.tokenizer.pad_token_id).to(self.policy.device)
        sums = sequence_sums(packed, packed_logprobs(self.policy.model, packed).values)
        # Responses come out group by group; the lengths follow the same order.
        lengths = torch.tensor(
            [sum(m) for g in groups.values() for m in g.masks],  # type: ignore[union-attr]
            device=sums.device,
            dtype=torch.float32,
        )
        out = losses.nll_loss(sums, lengths)
        meter.add("nll_loss", out.loss.detach(), len(batch))
        meter.add("logp_per_token", (sums.detach() / lengths.clamp(min=1)).mean(), len(batch))
        return out

    def _examples(self, data: PreferenceData | list[RankedListRecord]) -> list[RFTExample]:
        lists = data.ranked_lists if isinstance(data, PreferenceData) else list(data)
        examples = self.prepare(lists)
        if not examples:
            raise ValueError(
                f"RFTLearner.train needs a verified-correct response; the {len(lists)} ranked lists have none"
            )
        return examples

    def train(self, data: PreferenceData | list[RankedListRecord]) -> dict[str, Any]:
        """One iteration: ``epochs`` passes over the verified-correct responses.

        Returns:
            Metrics: ``loss``, ``nll_loss``, ``logp_per_token``, ``grad_norm``, ``first_loss``,
            ``updates``, ``skipped_updates``, ``responses``, ``responses_per_s``, ``seconds``,
            ``healthy``.

        Raises:
            ValueError: No verified-correct response (before anything is updated).
        """
        examples = self._examples(data)
        self.policy.begin_iteration()
        metrics = run_epochs(self.policy, examples, self.micro_loss, unit="responses")
        metrics["responses"] = float(len(examples))
        return metrics

    @torch.no_grad()
    def evaluate(self, data: PreferenceData | list[RankedListRecord]) -> dict[str, float]:
        """Mean NLL of the current policy on the verified-correct responses, without updating it."""
        return evaluate_batches(self._examples(data), self.micro_loss, self.config.batch_size)
