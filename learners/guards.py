"""The learner's guard rails and data rules, applied around ``Learner.train`` (plain Python, no Ray).

- What a learner may train on: ``within_staleness`` (the staleness bound on this iteration's rows),
  ``canonical_order`` (an order that does not depend on which chunk finished first) and
  ``usable_data`` (the part its algorithm uses, or why there is none).
- The control run's data: ``shuffled_control`` reverses preferences by a seeded coin flip.
- Whether an iteration's training may be deployed: ``update_is_deployable``, and ``train_guarded``,
  which puts the learner back to where it was before an iteration that may not be.

``workers.LearnerActor`` calls them in that order on each iteration's data; they use a learner
through the ``Learner`` protocol only (``learners.base``).
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import torch

from treeplay.learners.base import Learner
from treeplay.learners.config import MAX_UPDATE_RATIO
from treeplay.store.records import ACTION_SPANS, POLICY_VERSION, PreferenceData


def shuffled_control(data: Any, seed: int) -> Any:
    """The control run's data: the preference direction of each pair reversed by a seeded coin flip,
    the ranked lists' texts permuted among their ranks; nothing else moves.

    Only what says which text is better changes: a swapped pair's chosen slot holds the old rejected
    text (with its node and action spans, which describe that text) and vice versa, while weight,
    margin, label smoothing and the visit counts stay in their slots, so MCTS-DPO's alpha (from the
    chosen and rejected visits) and the loss's weighting are those of the real run. (Swapping the
    visits as well would make alpha 1/(N_l/N_w + 1), clipped to 0.5, which cancels the preference
    gradient: the control would measure NLL on wrong answers, not reversed preferences.) A ranked
    list keeps its scores, per-step rewards and ``correct`` flags in rank order and gets its texts
    shuffled: TPO's NLL term trains on the text in the slot of the best verified-correct item,
    whatever text now sits there, just as DPO's trains on whatever text sits in the chosen slot.
    The control reverses the preference signal, nothing else; a flag that moved with its text would
    keep an NLL on verified-correct answers in the control.
    """

    rng = random.Random(seed)
    pairs = [_swap_texts(p) if rng.random() < 0.5 else p for p in data.pairs]
    lists = [_permute_texts(r, rng) for r in data.ranked_lists]
    return dataclasses.replace(data, pairs=pairs, ranked_lists=lists)




def _swap_texts(p: Any) -> Any:

    info = dict(p.info) if p.info else p.info
    if info and isinstance(info.get(ACTION_SPANS), dict):
        spans = info[ACTION_SPANS]
        info[ACTION_SPANS] = {**spans, "chosen": spans.get("rejected"), "rejected": spans.get("chosen")}
    if info and isinstance(info.get("tokens"), dict):  # the ids of each text travel with it
        info["tokens"] = _reorder_token_ids(info["tokens"], [1, 0])
    return dataclasses.replace(p, chosen=p.rejected, rejected=p.chosen, chosen_node=p.rejected_node,
                               rejected_node=p.chosen_node, info=info)


def _reorder(info: dict, keys: tuple[str, ...], order: list[int]) -> None:
    """Put the per-item lists ``info[key]`` in ``order``, in place (lists of another length stay)."""
    for key in keys:
        if isinstance(info.get(key), list) and len(info[key]) == len(order):
            info[key] = [info[key][j] for j in order]


def _reorder_token_ids(tokens: dict, order: list[int]) -> dict:
    """A record's ``info["tokens"]`` with its responses (and their policy spans) in ``order``, so a
    text that moves keeps the ids the policy generated it as (else the learner re-tokenizes it)."""
    out = dict(tokens)
    _reorder(out, ("responses", "spans"), order)
    return out


def _permute_texts(r: Any, rng: Any) -> Any:

    order = list(range(len(r.items)))
    rng.shuffle(order)
    items = [dataclasses.replace(item, text=r.items[j].text, node=r.items[j].node)
             for item, j in zip(r.items, order, strict=True)]
    info = dict(r.info) if r.info else r.info
    if info:
        # A text's spans and end node describe it and travel with it; "correct" is the verifier's
        # label of the slot, the preference signal the control scrambles, and stays in rank order.
        _reorder(info, (ACTION_SPANS, "end_nodes"), order)
        if isinstance(info.get("tokens"), dict):
            info["tokens"] = _reorder_token_ids(info["tokens"], order)
    return dataclasses.replace(r, items=items, info=info)


def canonical_order(data: Any) -> Any:
    """The data in an order that does not depend on which chunk the store wrote first: by iteration,
    then task id, each task's records in their written order. With several rollout workers chunks
    finish in any order, and a resumed iteration writes its remaining chunks after the others; the
    learner's shuffle must see the same list either way."""

    def key(r: Any) -> tuple[int, str]:
        return (r.iteration if r.iteration is not None else -1, r.task_id or "")

    return dataclasses.replace(data, pairs=sorted(data.pairs, key=key), ranked_lists=sorted(data.ranked_lists, key=key))


def usable_data(trains_on: str, data: Any, who: str = "this learner") -> tuple[Any, str | None]:
    """The part of ``data`` a learner trains on, or a reason why there is nothing to train on.

    ``trains_on`` is what the learner declares (``LearnerOutput.trains_on``): "pairs" (the DPO
    family), "ranked_lists" (TPO, RFT) or "prompts" (SLHF, which samples its own answers to the
    prompts of both). ``who`` names the learner in the reason. Finer checks (TPO drops lists whose items are tied) are the learner's:
    ``train_guarded`` reports them.
    """
    if trains_on == "pairs":
        if not data.pairs:
            return data, f"no preference pairs ({len(data.ranked_lists)} ranked lists, which {who} does not use)"
        return PreferenceData(pairs=data.pairs), None
    if trains_on == "ranked_lists":
        if not data.ranked_lists:
            return data, f"no ranked lists ({len(data.pairs)} pairs, which {who} does not use)"
        return PreferenceData(ranked_lists=data.ranked_lists), None
    if trains_on != "prompts":
        raise ValueError(f"a learner trains on 'pairs', 'ranked_lists' or 'prompts', not {trains_on!r}")
    if len(data) == 0:
        return data, "no preference data (no pairs or ranked lists to take prompts from)"
    return data, None


def within_staleness(data: Any, iteration: int, learner_version: int, max_staleness: int) -> tuple[Any, dict[str, float]]:
    """The part of ``data`` the staleness bound lets the learner train on, and what it measured.

    A pair's or ranked list's staleness is the learner's weights version minus the version that
    produced it (``info["policy_version"]``, stamped by ``orchestrator.rollouts.stamp_version``). Rows of
    ``iteration`` staler than ``max_staleness`` are refused and counted. Rows of earlier iterations
    are the replay window the config asked for (``learner.replay``), old by design, and are kept;
    so are rows without a recorded version (written by an older treeplay).

    Returns:
        The data without the refused rows, and ``stale_refused`` (rows refused) plus, over this
        iteration's kept rows with a version, ``staleness_max``, ``staleness_mean``,
        ``data_version_min`` and ``data_version_max``.
    """

    kept_ages: list[int] = []
    refused = 0

    def keep(rec: Any) -> bool:
        nonlocal refused
        version = (rec.info or {}).get(POLICY_VERSION) if isinstance(rec.info, dict) else None
        if rec.iteration != iteration or not isinstance(version, int):
            return True
        if learner_version - version > max_staleness:
            refused += 1
            return False
        kept_ages.append(learner_version - version)
        return True

    out = dataclasses.replace(data, pairs=[p for p in data.pairs if keep(p)],
                              ranked_lists=[r for r in data.ranked_lists if keep(r)])
    counts = {"stale_refused": float(refused)}
    if kept_ages:
        counts.update(staleness_max=float(max(kept_ages)), staleness_mean=sum(kept_ages) / len(kept_ages),
                      data_version_min=float(learner_version - max(kept_ages)),
                      data_version_max=float(learner_version - min(kept_ages)))
    return out, counts


def update_is_deployable(metrics: dict[str, Any], applied: float, healthy: bool,
                         max_update_ratio: float = MAX_UPDATE_RATIO) -> bool:
    """Whether an iteration's training may be redeployed.

    The learner already skips single bad updates and rolls back to its last good weights; an
    iteration in which at least half of the updates were skipped (NaN/inf loss, exploding gradient)
    did not train in any meaningful sense, so the loop keeps serving the previous weights. Nor did
    one whose weights moved by more than ``max_update_ratio`` times their own norm
    (``metrics["update_ratio"]``, see ``update_ratio``): every loss can stay finite while the
    weights run off to huge values (a normalisation layer that overflows gives flat, finite logits).
    """
    skipped = float(metrics.get("skipped_updates", 0.0))
    ratio = float(metrics.get("update_ratio", 0.0))
    return healthy and applied > 0 and skipped < applied and not ratio > max_update_ratio


def update_ratio(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """``‖after - before‖ / ‖before‖`` over all tensors, in float64 (inf when the weights are not
    finite, or when they left zero; 0 when nothing moved).

    A sane iteration of fine-tuning moves the weights by a small fraction of their norm; a blown-up
    one by many times it."""
    moved = 0.0
    size = 0.0
    for name, old in before.items():
        new = after[name].detach().to(old.device)
        if not bool(torch.isfinite(new).all()):
            return math.inf
        # Norms accumulate in float64: squares of blown-up float32 weights overflow float32.
        moved += float(torch.linalg.vector_norm(new - old, dtype=torch.float64)) ** 2
        size += float(torch.linalg.vector_norm(old.detach(), dtype=torch.float64)) ** 2
    if size == 0.0:
        return 0.0 if moved == 0.0 else math.inf
    return math.sqrt(moved / size)


def train_guarded(learner: Learner, data: Any,
                  max_update_ratio: float = MAX_UPDATE_RATIO) -> tuple[dict[str, Any], bool]:
    """One ``learner.train(data)``; if the iteration may not be deployed, the learner is put back.

    The learner rolls single bad updates back itself, but weights blown up to huge *finite* values
    can still give finite losses and pass its checks; the loop then refuses to deploy them
    (``update_is_deployable``) and the next iteration must not start from them either. Nor from
    the optimizer moments, counters and RNG states the rejected iteration left: the whole training
    state goes back, so a rejected iteration leaves no trace (and a run resumed from the last
    checkpoint continues exactly as the uninterrupted one would).

    A learner that finds nothing to train on in ``data`` (e.g. TPO when every list's items are tied)
    says so with a ValueError before it starts the iteration; that is no update, not a failure.

    Returns:
        The learner's metrics (plus ``restored`` = 1 when the learner was put back, and
        ``no_update_reason`` when the update is not deployable) and whether the new weights may be
        deployed.
    """
    before = learner.state_dict()  # CPU copies
    state_before = learner.training_state()
    updates_before = float(learner.updates)
    calls_before = learner.train_calls
    try:
        metrics = dict(learner.train(data))
    except ValueError as e:
        if learner.train_calls != calls_before:
            raise  # the iteration had started: a real error
        return {"no_update_reason": f"nothing to train on: {e}"}, False
    applied = float(learner.updates) - updates_before
    if learner.healthy and applied > 0:
        metrics["update_ratio"] = update_ratio(before, learner.state_dict())
        if metrics["update_ratio"] > max_update_ratio:
            metrics["last_skip_reason"] = (f"the weights moved by {metrics['update_ratio']:.3g} times their norm "
                                           f"(max_update_ratio {max_update_ratio:g})")
    deployable = update_is_deployable(metrics, applied, learner.healthy, max_update_ratio)
    if not deployable:
        learner.load_weights(before)  # the full weights, or the adapter of a LoRA learner; healthy again
        # The reference cannot have changed in a way that matters: a fixed one never does, a
        # refreshed one is rebuilt from the policy at the next call.
        learner.load_training_state(state_before, check_reference=False)
        metrics["restored"] = 1.0
        metrics["no_update_reason"] = str(
            metrics.get("last_skip_reason") or "update rejected by the learner's guard rails")
    return metrics, deployable
