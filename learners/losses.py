"""Preference losses as pure tensor functions: no models, no tokenizers, no state.

Every function takes per-sequence (or per-token) log-probabilities that a caller has already
computed and returns a ``LossOutput``: the scalar loss to back-propagate and a dict of detached
statistics (implicit rewards, margins, accuracies). Conventions follow ../docs/learners.md:

- ``*_logps`` are sums of response-token log-probs (prompt excluded), shape ``(B,)``;
- the implicit reward of a response is ``beta * (logp_policy - logp_ref)``;
- ``weights`` are per-example loss weights (``PairRecord.weight``); the loss is ``mean(w * l)``,
  so a weight of 2 counts a pair twice, and a batch of weight-1 pairs is the plain mean.

Losses: DPO (sigmoid, with conservative-DPO label smoothing), IPO, MCTS-DPO (visit-count label
smoothing; the caller sums log-probs from the first divergent token), the NLL term of iterative
RPO, SimPO, the LiPO-lambda / TPO listwise loss with the TPO adaptive step score, and the SLHF
leader and follower REINFORCE losses.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from treeplay.search.preferences import label_smoothing


class LossOutput(NamedTuple):
    """A loss and what to log about it.

    Attributes:
        loss: Scalar tensor to back-propagate.
        stats: Detached tensors (per example, or scalars) named for logging.
    """

    loss: Tensor
    stats: dict[str, Tensor]


def _weighted_mean(per_example: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return per_example.mean()
    return (per_example * weights.to(per_example)).mean()


def _pair_stats(chosen_rewards: Tensor, rejected_rewards: Tensor, per_example: Tensor) -> dict[str, Tensor]:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "margins": chosen_rewards - rejected_rewards,
        "accuracies": (chosen_rewards > rejected_rewards).float(),
        "per_example": per_example.detach(),
    }


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float | Tensor = 0.0,
    weights: Tensor | None = None,
) -> LossOutput:
    """Sigmoid DPO with conservative-DPO label smoothing.

    ``h = (logp_w - ref_w) - (logp_l - ref_l)``;
    ``l = -(1 - eps) * log sigmoid(beta h) - eps * log sigmoid(-beta h)``.

    Args:
        policy_chosen_logps: ``(B,)`` summed log-probs of the chosen responses under the policy.
        policy_rejected_logps: ``(B,)`` same for the rejected responses.
        ref_chosen_logps: ``(B,)`` chosen under the reference (no gradient needed).
        ref_rejected_logps: ``(B,)`` rejected under the reference.
        beta: Inverse temperature of the implicit reward.
        label_smoothing: ``eps``, a float or a ``(B,)`` tensor (per-pair, e.g. MCTS visit alphas).
        weights: Optional ``(B,)`` per-pair loss weights.

    Returns:
        LossOutput with stats ``chosen_rewards``, ``rejected_rewards``, ``margins``, ``accuracies``,
        ``per_example``.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    eps = torch.as_tensor(label_smoothing, dtype=logits.dtype, device=logits.device)
    per_pair = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    stats = _pair_stats(beta * chosen_logratios, beta * rejected_logratios, per_pair)
    return LossOutput(_weighted_mean(per_pair, weights), stats)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    tau: float = 0.1,
    weights: Tensor | None = None,
) -> LossOutput:
    """IPO with per-token averaged log-ratios (as TRL and MCTS-DPO's ``--ipo`` do).

    ``h = (logp_w - ref_w) / |y_w| - (logp_l - ref_l) / |y_l|``; ``l = (h - 1 / (2 tau))^2``.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``(B,)``.
        chosen_lengths: ``(B,)`` number of summed tokens of each chosen response.
        rejected_lengths: ``(B,)`` same for rejected.
        tau: The IPO regulariser (plays beta's role; rewards in stats are scaled by it).
        weights: Optional ``(B,)`` per-pair weights.

    Returns:
        LossOutput with the same stats as ``dpo_loss``.
    """
    chosen = (policy_chosen_logps - ref_chosen_logps) / chosen_lengths.clamp(min=1).to(policy_chosen_logps)
    rejected = (policy_rejected_logps - ref_rejected_logps) / rejected_lengths.clamp(min=1).to(
        policy_rejected_logps
    )
    per_pair = (chosen - rejected - 1 / (2 * tau)) ** 2
    stats = _pair_stats(tau * chosen, tau * rejected, per_pair)
    return LossOutput(_weighted_mean(per_pair, weights), stats)


def visit_alpha(chosen_visits: Tensor, rejected_visits: Tensor, max_alpha: float = 0.5) -> Tensor:
    """MCTS-DPO's label smoothing from visit counts: ``alpha = 1 / (N_w / N_l + 1)``, clipped.

    Elementwise ``search.preferences.label_smoothing`` (the formula's one definition: counts below 1
    read as 1, alpha clipped to ``max_alpha``), as float32 on the counts' device. The counts broadcast
    against each other; a batch holds a few dozen pairs, so the Python loop costs nothing.
    """
    nw, nl = torch.broadcast_tensors(chosen_visits, rejected_visits)
    alphas = [
        label_smoothing(n_w, n_l, max_alpha)
        for n_w, n_l in zip(nw.reshape(-1).tolist(), nl.reshape(-1).tolist(), strict=True)
    ]
    return torch.tensor(alphas, dtype=torch.float32, device=nw.device).reshape(nw.shape)


def mcts_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_visits: Tensor,
    rejected_visits: Tensor,
    beta: float = 0.1,
    weights: Tensor | None = None,
    fallback_smoothing: Tensor | None = None,
) -> LossOutput:
    """MCTS-DPO: conservative DPO whose smoothing is the visit-count alpha of the two siblings.

    The caller must sum log-probs only from the first token where chosen and rejected differ (the
    shared step prefix is excluded); ``DPOLearner`` does that by starting its sums at the first
    token the two responses do not share. Stats add ``alpha``.

    Args:
        fallback_smoothing: ``(B,)`` smoothing for pairs whose visit counts are unknown, marked by a
            negative count (pairs that did not come from a search tree); required if any is.
    """
    alpha = visit_alpha(chosen_visits, rejected_visits).to(policy_chosen_logps)
    unknown = (chosen_visits < 0) | (rejected_visits < 0)
    if bool(unknown.any()):
        if fallback_smoothing is None:
            raise ValueError("mcts_dpo_loss: some visit counts are unknown (< 0) and no fallback_smoothing was given")
        alpha = torch.where(unknown.to(alpha.device), fallback_smoothing.to(alpha), alpha)
    out = dpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        label_smoothing=alpha,
        weights=weights,
    )
    out.stats["alpha"] = alpha.detach()
    return out


def nll_loss(chosen_logps: Tensor, chosen_lengths: Tensor, weights: Tensor | None = None) -> LossOutput:
    """The NLL term of iterative RPO (Pang et al. 2024): length-normalised NLL of the chosen response.

    ``l = -logp_w / |y_w|``. Add it to a pairwise loss with weight ``nll_weight`` (1.0 is what made
    a tiny model learn from its own pairs, docs/tiny-models.md).
    """
    per = -chosen_logps / chosen_lengths.clamp(min=1).to(chosen_logps)
    return LossOutput(_weighted_mean(per, weights), {"per_example": per.detach()})


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    weights: Tensor | None = None,
) -> LossOutput:
    """SimPO (reference-free): ``-log sigmoid(beta logp_w/|y_w| - beta logp_l/|y_l| - gamma)``."""
    chosen = beta * policy_chosen_logps / chosen_lengths.clamp(min=1).to(policy_chosen_logps)
    rejected = beta * policy_rejected_logps / rejected_lengths.clamp(min=1).to(policy_rejected_logps)
    per_pair = -F.logsigmoid(chosen - rejected - gamma)
    return LossOutput(_weighted_mean(per_pair, weights), _pair_stats(chosen, rejected, per_pair))


def lambda_weights(
    scores: Tensor, labels: Tensor, mask: Tensor | None = None, gain_scale: float = 1.0
) -> Tensor:
    """LambdaLoss / LiPO-lambda pair weights ``Delta_ij`` (no gradient flows through them).

    ``Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|`` for ``psi_i > psi_j`` (0 elsewhere), with
    ``G = 2^psi' - 1``, ``D(tau) = log2(1 + tau)`` and ``tau`` the 1-based rank of each item when the
    list is sorted by the current ``scores`` (descending). Labels are first rescaled per list to
    ``psi' = gain_scale * (psi - min) / (max - min)``: raw judge scores (TPO's are in [-100, 100])
    would overflow ``2^psi``; the rescaling keeps the order and the relative gaps.

    Args:
        scores: ``(B, K)`` current scores ``s`` (implicit rewards).
        labels: ``(B, K)`` labels ``psi`` (higher is better).
        mask: ``(B, K)`` bool, False for padding items (lists shorter than K).
        gain_scale: Top of the rescaled label range.

    Returns:
        ``(B, K, K)`` weights; entry ``[b, i, j]`` weighs the term ``log sigmoid(s_i - s_j)``.
    """
    scores, labels = scores.detach().float(), labels.detach().float()
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    low = labels.masked_fill(~mask, math.inf).amin(dim=1, keepdim=True)
    high = labels.masked_fill(~mask, -math.inf).amax(dim=1, keepdim=True)
    span = (high - low).clamp(min=1e-12)
    psi = torch.where(mask, gain_scale * (labels - low) / span, torch.zeros_like(labels))
    gains = torch.exp2(psi) - 1
    # Rank by score; padding items sort last so they never take a real item's rank.
    order_key = scores.masked_fill(~mask, -math.inf)
    ranks = order_key.argsort(dim=1, descending=True).argsort(dim=1).float() + 1
    inv_discount = 1.0 / torch.log2(1 + ranks)
    delta = (gains[:, :, None] - gains[:, None, :]).abs() * (
        inv_discount[:, :, None] - inv_discount[:, None, :]
    ).abs()
    better = (labels[:, :, None] > labels[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    return torch.where(better, delta, torch.zeros_like(delta))


def lipo_lambda_loss(
    scores: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    gain_scale: float = 1.0,
    weights: Tensor | None = None,
) -> LossOutput:
    """Listwise LiPO-lambda loss, the ranking loss of TPO's paper form.

    ``L = mean over lists of  sum_{i,j: psi_i > psi_j} Delta_ij * -log sigmoid(s_i - s_j)``.

    Args:
        scores: ``(B, K)`` implicit rewards ``s_i`` (beta already applied), with gradient.
        labels: ``(B, K)`` item labels ``psi``.
        mask: ``(B, K)`` bool for valid items.
        gain_scale: See ``lambda_weights``.
        weights: Optional ``(B,)`` per-list weights.

    Returns:
        LossOutput with stats ``pair_accuracy`` (fraction of ordered pairs ``psi_i > psi_j`` with
        ``s_i > s_j``), ``margin`` (mean ``s_i - s_j`` over those pairs), ``per_example``.
    """
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    delta = lambda_weights(scores, labels, mask, gain_scale).to(scores)
    diff = scores[:, :, None] - scores[:, None, :]
    per_list = -(delta * F.logsigmoid(diff)).sum(dim=(1, 2))
    better = (labels[:, :, None] > labels[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    n_pairs = better.sum().clamp(min=1)
    d = diff.detach()
    stats = {
        "pair_accuracy": ((d > 0) & better).sum() / n_pairs,
        "margin": (d * better).sum() / n_pairs,
        "per_example": per_list.detach(),
    }
    return LossOutput(_weighted_mean(per_list, weights), stats)


def step_weights(
    step_embeddings: Tensor,
    step_mask: Tensor,
    weighting: str = "dissimilar",
    anchor: int | None = None,
    floor: float = 1e-2,
) -> Tensor:
    """TPO adaptive step weights from the cosine similarity of corresponding steps.

    ``c_{n,k}`` is the cosine between step k of response n and step k of the other responses: the
    mean over every other response that has a step k (``anchor=None``), or step k of response
    ``anchor`` alone (the released code uses the gold response, index 0; the anchor then gets
    ``c = 1``). A step k that no other response has gets ``c = 0``.

    - ``"dissimilar"`` (default, our reading of the paper): ``w = 1 - c + floor``. Steps that the
      other responses share contribute almost nothing to the sequence score, steps where the
      responses part ways dominate it. ``floor`` keeps a response whose every step is shared from
      dividing by zero.
    - ``"similar"`` (the released code): ``w = 1 + c``.

    Args:
        step_embeddings: ``(K, S, H)`` mean hidden state of each step (detached here).
        step_mask: ``(K, S)`` bool, True where response n has a step k.
        weighting: ``"dissimilar"`` or ``"similar"``.
        anchor: Compare with this response only, or with all others when None.
        floor: Added to dissimilar weights.

    Returns:
        ``(K, S)`` weights, zero where ``step_mask`` is False.
    """
    e = F.normalize(step_embeddings.detach().float(), dim=-1)
    m = step_mask.float()
    # cos[n, m, k]: response n vs response m at step k.
    cos = torch.einsum("nkh,mkh->nmk", e, e)
    both = m[:, None, :] * m[None, :, :]
    if anchor is None:
        others = both * (1 - torch.eye(len(m), device=m.device))[:, :, None]
        c = (cos * others).sum(1) / others.sum(1).clamp(min=1)
    else:
        c = cos[:, anchor, :] * both[:, anchor, :]
    if weighting == "dissimilar":
        w = 1 - c + floor
    elif weighting == "similar":
        w = 1 + c
    else:
        raise ValueError(f"unknown step weighting {weighting!r}; expected 'dissimilar' or 'similar'")
    return w * m


def adaptive_step_scores(step_logratios: Tensor, weights: Tensor) -> Tensor:
    """TPO sequence score: the weighted mean of per-step log-ratios, ``s_n = sum_k w l / sum_k w``.

    Args:
        step_logratios: ``(K, S)`` mean token log-ratio ``logp_policy - logp_ref`` of each step.
        weights: ``(K, S)`` from ``step_weights`` (zero on missing steps).

    Returns:
        ``(K,)`` scores (multiply by beta for the implicit reward).
    """
    w = weights.to(step_logratios)
    return (w * step_logratios).sum(-1) / w.sum(-1).clamp(min=1e-12)


def kl_estimate(logps: Tensor, ref_logps: Tensor, kind: str = "k1", clamp: float = 40.0) -> Tensor:
    """Per-token KL(policy || ref) estimates on samples from the policy.

    ``k1 = logp - ref``; ``k3 = exp(d) - d - 1`` with ``d = ref - logp`` clamped to ``[-clamp, clamp]``
    first (non-negative, lower variance; the clamp, 40 in the SLHF authors' trainer, keeps ``exp(d)``
    finite when the reference gives a sampled token almost no mass).
    """
    if kind == "k1":
        return logps - ref_logps
    if kind == "k3":
        d = (ref_logps - logps).clamp(-clamp, clamp)
        return torch.expm1(d) - d
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1' or 'k3'")


def reinforce_kl_loss(
    token_logps: Tensor,
    token_kl: Tensor,
    mask: Tensor,
    rewards: Tensor,
    beta: float,
    baseline: float = 0.5,
) -> LossOutput:
    """REINFORCE with a constant baseline and a detached per-token KL penalty.

    ``L = mean_b sum_t [beta * k_{b,t} - (r_b - baseline)] * logp_{b,t}`` over unmasked tokens; the
    bracket is a constant (no gradient), so the gradient is the score-function estimator of
    ``E[r] - beta KL``.

    Args:
        token_logps: ``(B, T)`` log-probs of the sampled tokens, with gradient.
        token_kl: ``(B, T)`` per-token KL estimates (detached here).
        mask: ``(B, T)`` 1 for response tokens, 0 for padding.
        rewards: ``(B,)`` per-sample rewards in [0, 1].
        beta: KL coefficient.
        baseline: Subtracted from the reward (0.5 = a coin flip under a preference oracle).

    Returns:
        LossOutput with stats ``reward``, ``kl`` (per-sequence sums), ``length``.
    """
    mask = mask.to(token_logps)
    coeff = beta * token_kl.detach() - (rewards.detach().to(token_logps) - baseline)[:, None]
    per_seq = (coeff * token_logps * mask).sum(-1)
    stats = {
        "reward": rewards.detach(),
        "kl": (token_kl.detach() * mask).sum(-1),
        "length": mask.sum(-1),
        "per_example": per_seq.detach(),
    }
    return LossOutput(per_seq.mean(), stats)


def slhf_leader_loss(
    token_logps: Tensor,
    token_kl: Tensor,
    mask: Tensor,
    preference: Tensor,
    beta: float,
    baseline: float = 0.5,
) -> LossOutput:
    """SLHF leader loss: REINFORCE on ``p(y > y' | x)``, the chance the leader's y beats the refinement.

    Args:
        token_logps: ``(B, T)`` log-probs of the leader's sampled tokens given x.
        token_kl: ``(B, T)`` per-token KL estimates against the reference.
        mask: ``(B, T)`` response-token mask.
        preference: ``(B,)`` oracle ``p(y_b > y'_b | x_b)``.
        beta: KL coefficient (tau^L).
        baseline: Score baseline (0.5).
    """
    return reinforce_kl_loss(token_logps, token_kl, mask, preference, beta, baseline)


def slhf_follower_loss(
    token_logps: Tensor,
    token_kl: Tensor,
    mask: Tensor,
    preference: Tensor,
    beta: float,
    baseline: float = 0.5,
) -> LossOutput:
    """SLHF follower loss: REINFORCE on ``1 - p(y > y' | x)``, the refinement's chance to win.

    Args are those of ``slhf_leader_loss`` with the follower's tokens (y' given the refinement
    prompt of (x, y)); ``preference`` is still ``p(y > y')`` and is flipped here.
    """
    return reinforce_kl_loss(token_logps, token_kl, mask, 1 - preference, beta, baseline)
