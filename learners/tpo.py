"""TPO (Tree Preference Optimization, Liao et al., ICLR 2025) on ranked lists from the store.

    learner = TPOLearner("runs/tiny-model", TPOConfig(beta=1.0))
    metrics = learner.train(PreferenceData(ranked_lists=lists))

A ranked list is K responses to one prompt with scores ``psi`` (judge scores, Q values, ...);
in a preference tree they branch off each other step by step. Our reading of the paper (see
docs/learners.md; the released loss code is not followed, it has a sign error and a gather bug):

1. The score of response n is an *adaptive step reward*: split the response into steps (lines),
   take each step's mean token log-ratio ``log pi - log pi_ref``, and average the steps with
   weights from the cosine similarity of the step's embedding (mean last-layer hidden state of the
   policy, no gradient) to the corresponding step of the other responses. Default
   ``w = 1 - cos``: steps the responses share add almost no margin, the steps where they part
   ways carry it. ``step_weighting="similar"`` with ``step_anchor="best"`` is the released code's
   ``w = 1 + cos`` against the gold response (an ablation).
2. Implicit reward ``s_n = beta * score_n``; the ranking loss is LambdaLoss / LiPO-lambda:
   ``sum over psi_i > psi_j of Delta_ij * -log sigmoid(s_i - s_j)``, ``Delta`` from the ranks under
   the current scores (no gradient), labels rescaled per list before ``2^psi``.
3. Optionally (``nll_weight``, default 1.0 as for DPO) the length-normalised NLL of the best item
   among those verified correct (the list's ``info["correct"]``); a list with no verified-correct
   item adds no NLL (the top-scored item may be an unexplored sibling or a wrong branch).

Items may hold environment text between the policy's steps; only the tokens in the list's action
spans are scored (the action mask, see logprobs.py).

All K responses of a list are packed into one row with the prompt (and their common prefix)
computed once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from treeplay.learners import losses
from treeplay.learners.base import LearnerOutput
from treeplay.learners.config import TPOConfig
from treeplay.learners.epochs import StatsMeter, evaluate_batches, run_epochs
from treeplay.learners.logprobs import (
    Group,
    encode_masked_response,
    encode_prompt,
    fit_length,
    pack,
    packed_logprobs,
    per_sequence,
    record_tokens,
    token_offsets,
)
from treeplay.learners.trainable import TrainablePolicy
from treeplay.store.records import PreferenceData, RankedListRecord


@dataclass
class ListExample:
    """A tokenized ranked list: responses (token ids), their labels, and a step index per token.

    ``masks`` flag the tokens the policy wrote (environment text is context only); ``steps`` hold
    a step index per *scored* token. ``nll_item`` is the item the NLL term trains on: the best
    verified-correct one, or None when no item was verified correct.
    """

    prompt: list[int]
    responses: list[list[int]]
    labels: list[float]
    steps: list[list[int]]
    masks: list[list[bool]]
    nll_item: int | None = None
    weight: float = 1.0


def token_steps(
    tokenizer, text: str, separator: str, n_tokens: int, offsets: list[tuple[int, int]] | None = None
) -> list[int]:
    """Step index of each of the ``n_tokens`` tokens of ``text``; extras (EOS) join the last step.

    The tokens are ``text`` tokenized alone, or the ones whose character ``offsets`` are given (a
    record's own ids, ``logprobs.token_offsets``)."""
    if offsets is None:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    starts, pos = [], 0
    while True:
        cut = text.find(separator, pos) if separator else -1
        if cut < 0:
            break
        pos = cut + len(separator)
        starts.append(pos)
    steps = []
    for begin, _ in offsets:
        steps.append(sum(1 for s in starts if s <= begin and s < len(text)))
    last = steps[-1] if steps else 0
    return (steps + [last] * n_tokens)[:n_tokens]


def kendall_tau(scores: list[float], labels: list[float]) -> float:
    """Kendall's tau over pairs with different labels (1 = same order as the labels; score ties count 0)."""
    num = den = 0
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            if labels[i] == labels[j]:
                continue
            den += 1
            agree = (scores[i] - scores[j]) * (labels[i] - labels[j])
            num += (agree > 0) - (agree < 0)
    return num / den if den else 0.0


def ndcg(scores: list[float], labels: list[float]) -> float:
    """NDCG of the order given by ``scores`` with gains ``2^psi' - 1`` on labels rescaled to [0, 1]."""
    lo, hi = min(labels), max(labels)
    if hi == lo:
        return 1.0
    gains = [2 ** ((v - lo) / (hi - lo)) - 1 for v in labels]

    def dcg(order: list[int]) -> float:
        return sum(gains[i] / math.log2(r + 2) for r, i in enumerate(order))

    by_score = sorted(range(len(scores)), key=lambda i: -scores[i])
    ideal = sorted(range(len(gains)), key=lambda i: -gains[i])
    return dcg(by_score) / dcg(ideal)


class TPOLearner(LearnerOutput):
    """Trains a policy on ranked lists with TPO's listwise loss.

    Args:
        model_path: Hugging Face directory of the starting policy.
        config: Settings; keyword overrides are applied on top.
    """

    trains_on = "ranked_lists"

    def __init__(self, model_path: str | Path, config: TPOConfig | None = None, **overrides: Any):
        cfg = (config or TPOConfig()).model_copy(update=overrides)
        self.config = TPOConfig.model_validate(cfg.model_dump())
        self.policy = TrainablePolicy(model_path, self.config)

    def prepare(self, lists: list[RankedListRecord]) -> list[ListExample]:
        """Tokenize lists, masking what the policy did not write; lists with fewer than two items or a
        single label value are dropped, and so are items with no policy-written token."""
        tok, cfg = self.policy.tokenizer, self.config
        out = []
        for rec in lists:
            if len(rec.items) < 2 or len({it.score for it in rec.items}) < 2:
                continue
            eos = cfg.append_eos == "always" or (
                cfg.append_eos == "final" and bool((rec.info or {}).get("final"))
            )
            correct = (rec.info or {}).get("correct")
            if not isinstance(correct, list) or len(correct) != len(rec.items):
                correct = [None] * len(rec.items)
            ids = record_tokens(tok, rec.prompt, [it.text for it in rec.items], rec.info)
            if ids is not None:  # the ids the policy was prompted with and generated
                eos_id = [tok.eos_token_id] if eos and tok.eos_token_id is not None else []
                encoded = [(r + eos_id, m + [True] * len(eos_id)) for r, m in zip(ids.responses, ids.masks, strict=True)]
                prompt_ids = ids.prompt
            else:
                encoded = [
                    encode_masked_response(tok, it.text, rec.action_spans(i), eos) for i, it in enumerate(rec.items)
                ]
                prompt_ids = encode_prompt(tok, rec.prompt)
            prompt, responses = fit_length(prompt_ids, [r for r, _ in encoded], cfg.max_length)
            masks = [m[: len(r)] for (_, m), r in zip(encoded, responses, strict=True)]
            keep = [i for i, m in enumerate(masks) if any(m)]
            if len(keep) < 2 or len({rec.items[i].score for i in keep}) < 2:
                continue
            steps = []
            for i in keep:
                offsets = token_offsets(tok, ids.responses[i]) if ids is not None else None
                per_token = token_steps(tok, rec.items[i].text, cfg.step_separator, len(responses[i]), offsets)
                steps.append([st for st, mine in zip(per_token, masks[i], strict=True) if mine])
            labels = [rec.items[i].score for i in keep]
            verified = [k for k, i in enumerate(keep) if correct[i] is True]
            nll_item = max(verified, key=lambda k: labels[k]) if verified else None
            out.append(
                ListExample(
                    prompt, [responses[i] for i in keep], labels, steps, [masks[i] for i in keep], nll_item
                )
            )
        return out

    def _scores(
        self, batch: list[ListExample]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Implicit rewards ``(B, K)``, labels, mask, the NLL ``(B,)`` of each list's best verified-correct
        item, and which lists have one."""
        cfg, dev = self.config, self.policy.device
        packed = pack(
            [Group(ex.prompt, ex.responses, masks=ex.masks) for ex in batch], self.policy.tokenizer.pad_token_id
        ).to(dev)
        pol = packed_logprobs(self.policy.model, packed, with_hidden=cfg.adaptive_steps)
        with torch.no_grad():
            ref = packed_logprobs(self.policy.reference, packed).values
        ratios = per_sequence(packed, pol.values - ref)
        logps = per_sequence(packed, pol.values)
        hidden = per_sequence(packed, pol.hidden) if pol.hidden is not None else None
        k_max = max(len(ex.responses) for ex in batch)
        scores = torch.zeros(len(batch), k_max, device=dev)
        labels = torch.zeros(len(batch), k_max, device=dev)
        mask = torch.zeros(len(batch), k_max, dtype=torch.bool, device=dev)
        nll = torch.zeros(len(batch), device=dev)
        has_nll = torch.zeros(len(batch), dtype=torch.bool, device=dev)
        i = 0
        for b, ex in enumerate(batch):
            k = len(ex.responses)
            seq = slice(i, i + k)
            i += k
            if cfg.adaptive_steps:
                s = self._adaptive(ex, ratios[seq], hidden[seq])
            else:
                s = torch.stack([r.sum() for r in ratios[seq]])
            scores[b, :k] = cfg.beta * s
            labels[b, :k] = torch.tensor(ex.labels, device=dev)
            mask[b, :k] = True
            if ex.nll_item is not None:
                nll[b] = -logps[seq][ex.nll_item].mean()
                has_nll[b] = True
        return scores, labels, mask, nll, has_nll

    def _adaptive(
        self, ex: ListExample, ratios: list[torch.Tensor], hidden: list[torch.Tensor]
    ) -> torch.Tensor:
        cfg = self.config
        dev = ratios[0].device
        n_steps = max(max(s) for s in ex.steps) + 1
        k = len(ratios)
        step_ratio = torch.zeros(k, n_steps, device=dev)
        emb = torch.zeros(k, n_steps, hidden[0].shape[-1], device=dev)
        mask = torch.zeros(k, n_steps, dtype=torch.bool, device=dev)
        for n in range(k):
            ids = torch.tensor(ex.steps[n], device=dev)
            count = torch.zeros(n_steps, device=dev).index_add(0, ids, torch.ones(len(ids), device=dev))
            present = count > 0
            step_ratio[n] = torch.zeros(n_steps, device=dev).index_add(0, ids, ratios[n]) / count.clamp(min=1)
            emb[n] = (
                torch.zeros(n_steps, emb.shape[-1], device=dev).index_add(0, ids, hidden[n].detach().float())
                / count.clamp(min=1)[:, None]
            )
            mask[n] = present
        anchor = max(range(k), key=lambda j: ex.labels[j]) if cfg.step_anchor == "best" else None
        w = losses.step_weights(emb, mask, cfg.step_weighting, anchor, cfg.weight_floor)
        return losses.adaptive_step_scores(step_ratio, w)

    def micro_loss(self, batch: list[ListExample], meter: StatsMeter) -> losses.LossOutput:
        """Listwise loss of a micro-batch of lists (+ NLL of each list's best item)."""
        scores, labels, mask, nll, has_nll = self._scores(batch)
        weights = torch.tensor([ex.weight for ex in batch], device=scores.device)
        out = losses.lipo_lambda_loss(scores, labels, mask, self.config.gain_scale, weights)
        total = out.loss
        n = len(batch)
        meter.add("rank_loss", out.loss.detach(), n)
        meter.add("pair_accuracy", out.stats["pair_accuracy"], n)
        meter.add("reward_margin", out.stats["margin"], n)
        if self.config.nll_weight > 0 and bool(has_nll.any()):
            # Mean over the lists that have a verified-correct item; the others add no NLL.
            w = weights * has_nll
            total = total + self.config.nll_weight * (nll * w).sum() / has_nll.sum()
            meter.add("nll_loss", (nll[has_nll]).mean().detach(), int(has_nll.sum()))
        s, lab = scores.detach().cpu(), labels.cpu()
        for b in range(n):
            k = int(mask[b].sum())
            meter.add("kendall_tau", kendall_tau(s[b, :k].tolist(), lab[b, :k].tolist()))
            meter.add("ndcg", ndcg(s[b, :k].tolist(), lab[b, :k].tolist()))
        return losses.LossOutput(total, out.stats)

    def _examples(self, data: PreferenceData | list[RankedListRecord]) -> list[ListExample]:
        lists = data.ranked_lists if isinstance(data, PreferenceData) else list(data)
        examples = self.prepare(lists)
        if not examples:
            raise ValueError(
                "TPOLearner.train needs at least one ranked list with two or more items of different scores"
            )
        return examples

    def train(self, data: PreferenceData | list[RankedListRecord]) -> dict[str, Any]:
        """One iteration over the ranked lists.

        Returns:
            Metrics: ``loss``, ``rank_loss``, ``nll_loss``, ``pair_accuracy``, ``reward_margin``,
            ``kendall_tau``, ``ndcg`` (of the implicit rewards against the labels, during the pass),
            ``grad_norm``, ``first_loss``, ``updates``, ``skipped_updates``, ``last_skip_reason``
            (if any), ``lists``, ``lists_per_s``, ``seconds``, ``healthy``.

        Raises:
            ValueError: No usable list.
        """
        examples = self._examples(data)
        self.policy.begin_iteration()
        metrics = run_epochs(self.policy, examples, self.micro_loss, unit="lists")
        metrics["lists"] = float(len(examples))
        return metrics

    @torch.no_grad()
    def evaluate(self, data: PreferenceData | list[RankedListRecord]) -> dict[str, float]:
        """Loss, pair accuracy, Kendall tau and NDCG of the current implicit rewards, no update."""
        return evaluate_batches(self._examples(data), self.micro_loss, self.config.batch_size)
