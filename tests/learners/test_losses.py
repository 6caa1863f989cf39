"""Every loss in learners/losses.py against numbers worked out by hand (math, no torch)."""

from __future__ import annotations

import math

import pytest
import torch

from treeplay.learners import losses


def softplus(x: float) -> float:
    """-log sigmoid(-x)."""
    return math.log1p(math.exp(x))


def t(*v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


PC, PR, RC, RR = t(-1.0, -2.0), t(-2.0, -1.0), t(-1.5, -1.5), t(-1.5, -1.5)


def test_dpo_sigmoid_by_hand():
    # h = [1, -1]; beta h = [0.5, -0.5]; loss = -log sigmoid(beta h) = softplus(-beta h).
    out = losses.dpo_loss(PC, PR, RC, RR, beta=0.5)
    expected = (softplus(-0.5) + softplus(0.5)) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.stats["chosen_rewards"].tolist() == pytest.approx([0.25, -0.25])
    assert out.stats["rejected_rewards"].tolist() == pytest.approx([-0.25, 0.25])
    assert out.stats["margins"].tolist() == pytest.approx([0.5, -0.5])
    assert out.stats["accuracies"].tolist() == [1.0, 0.0]


def test_dpo_label_smoothing_and_weights_by_hand():
    out = losses.dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.2)
    l1 = 0.8 * softplus(-0.5) + 0.2 * softplus(0.5)
    l2 = 0.8 * softplus(0.5) + 0.2 * softplus(-0.5)
    assert out.loss.item() == pytest.approx((l1 + l2) / 2, abs=1e-6)
    # Per-pair eps and weights: mean(w * l) with w = [2, 0].
    out = losses.dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=t(0.2, 0.0), weights=t(2.0, 0.0))
    assert out.loss.item() == pytest.approx(2 * l1 / 2, abs=1e-6)


def test_dpo_gradient_sign():
    pc = PC.clone().requires_grad_(True)
    losses.dpo_loss(pc, PR, RC, RR, beta=0.5).loss.backward()
    # d/dpc of softplus(-beta h)/B = -beta * sigmoid(-beta h) / B
    assert pc.grad.tolist() == pytest.approx(
        [-0.5 / (1 + math.exp(0.5)) / 2, -0.5 / (1 + math.exp(-0.5)) / 2], abs=1e-6
    )


def test_ipo_by_hand():
    # chosen log-ratios [0.5, -0.5] over lengths [2, 1]; rejected [-0.5, 0.5] over [1, 4].
    out = losses.ipo_loss(PC, PR, RC, RR, t(2, 1), t(1, 4), tau=0.25)
    h1 = 0.5 / 2 - (-0.5) / 1
    h2 = -0.5 / 1 - 0.5 / 4
    expected = ((h1 - 2.0) ** 2 + (h2 - 2.0) ** 2) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)


def test_visit_alpha_and_mcts_dpo_by_hand():
    alpha = losses.visit_alpha(torch.tensor([3, 1, 0, 8]), torch.tensor([1, 3, 0, 2]))
    # 1/(3/1+1) = .25; 1/(1/3+1) = .75 -> clipped .5; N_l = 0 -> 0 (only N_w is floored); 1/(8/2+1) = .2
    assert alpha.tolist() == pytest.approx([0.25, 0.5, 0.0, 0.2])
    out = losses.mcts_dpo_loss(PC, PR, RC, RR, torch.tensor([3, 8]), torch.tensor([1, 2]), beta=0.5)
    l1 = 0.75 * softplus(-0.5) + 0.25 * softplus(0.5)
    l2 = 0.8 * softplus(0.5) + 0.2 * softplus(-0.5)
    assert out.loss.item() == pytest.approx((l1 + l2) / 2, abs=1e-6)
    assert out.stats["alpha"].tolist() == pytest.approx([0.25, 0.2])


def test_nll_and_simpo_by_hand():
    assert losses.nll_loss(t(-4.0, -9.0), t(2, 3)).loss.item() == pytest.approx((2 + 3) / 2)
    out = losses.simpo_loss(t(-4.0, -3.0), t(-6.0, -1.0), t(2, 3), t(2, 1), beta=2.0, gamma=0.5)
    x1 = 2 * (-4 / 2) - 2 * (-6 / 2) - 0.5  # 1.5
    x2 = 2 * (-3 / 3) - 2 * (-1 / 1) - 0.5  # -0.5
    assert out.loss.item() == pytest.approx((softplus(-x1) + softplus(-x2)) / 2, abs=1e-6)


def test_lambda_weights_and_lipo_by_hand():
    scores = t(3.0, 1.0, 2.0)[None]
    labels = t(2.0, 0.0, 1.0)[None]
    # Labels rescale to [1, 0, .5]; gains G = 2^psi - 1 = [1, 0, sqrt2 - 1].
    # Ranks by score (descending): item0 -> 1, item2 -> 2, item1 -> 3; 1/D = 1/log2(1 + rank).
    g = [1.0, 0.0, math.sqrt(2) - 1]
    inv_d = [1 / math.log2(2), 1 / math.log2(4), 1 / math.log2(3)]
    d01 = abs(g[0] - g[1]) * abs(inv_d[0] - inv_d[1])
    d02 = abs(g[0] - g[2]) * abs(inv_d[0] - inv_d[2])
    d21 = abs(g[2] - g[1]) * abs(inv_d[2] - inv_d[1])
    w = losses.lambda_weights(scores, labels)[0]
    assert w[0, 1].item() == pytest.approx(d01, abs=1e-6)
    assert w[0, 2].item() == pytest.approx(d02, abs=1e-6)
    assert w[2, 1].item() == pytest.approx(d21, abs=1e-6)
    assert (
        w[1, 0].item() == 0 and w[1, 2].item() == 0 and w[2, 0].item() == 0 and w.diagonal().abs().sum() == 0
    )
    out = losses.lipo_lambda_loss(scores, labels)
    expected = d01 * softplus(-2.0) + d02 * softplus(-1.0) + d21 * softplus(-1.0)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.stats["pair_accuracy"].item() == 1.0
    assert out.stats["margin"].item() == pytest.approx((2 + 1 + 1) / 3)


def test_lipo_ignores_padding_items_and_gives_no_grad_to_weights():
    scores = t(0.5, -0.5, 9.0)[None].requires_grad_(True)
    labels = t(1.0, 0.0, 5.0)[None]
    mask = torch.tensor([[True, True, False]])
    out = losses.lipo_lambda_loss(scores, labels, mask)
    # Two real items: psi' = [1, 0], G = [1, 0], ranks [1, 2]: Delta = 1 * (1 - 1/log2 3).
    delta = 1 - 1 / math.log2(3)
    assert out.loss.item() == pytest.approx(delta * softplus(-1.0), abs=1e-6)
    out.loss.backward()
    # Gradient only through sigmoid: d/ds0 = -delta * sigmoid(-(s0 - s1)).
    assert scores.grad[0, 0].item() == pytest.approx(-delta / (1 + math.exp(1.0)), abs=1e-6)
    assert scores.grad[0, 2].item() == 0


def test_step_weights_and_adaptive_scores_by_hand():
    # Two responses, two steps: step 0 identical (cos 1), step 1 orthogonal (cos 0).
    emb = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[2.0, 0.0], [0.0, 3.0]]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    w = losses.step_weights(emb, mask, "dissimilar", floor=0.01)
    assert w.tolist() == [pytest.approx([0.01, 1.01]), pytest.approx([0.01, 1.01])]
    lr = t(1.0, 2.0, 3.0, -1.0).view(2, 2)
    s = losses.adaptive_step_scores(lr, w)
    assert s.tolist() == pytest.approx([(0.01 * 1 + 1.01 * 2) / 1.02, (0.01 * 3 - 1.01) / 1.02], abs=1e-6)
    # Released-code weighting, anchored on the gold response 0: w = 1 + cos.
    w = losses.step_weights(emb, mask, "similar", anchor=0)
    assert w.tolist() == [pytest.approx([2.0, 2.0]), pytest.approx([2.0, 1.0])]


def test_step_weights_missing_steps():
    # Response 2 has one step only; response 0's step 1 is compared with response 1's alone.
    emb = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [5.0, 5.0]]])
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    w = losses.step_weights(emb, mask, "dissimilar", floor=0.0)
    c = 1 / math.sqrt(2)
    assert w[0].tolist() == pytest.approx([1 - (0 + 1) / 2, 1 - c])
    assert w[1].tolist() == pytest.approx([1 - (0 + 0) / 2, 1 - c])
    assert w[2].tolist() == pytest.approx([1 - (1 + 0) / 2, 0.0])


def test_kl_estimates_by_hand():
    assert losses.kl_estimate(t(-1.0), t(-2.0), "k1").item() == pytest.approx(1.0)
    # k3 with d = ref - logp = -1: e^-1 + 1 - 1.
    assert losses.kl_estimate(t(-1.0), t(-2.0), "k3").item() == pytest.approx(math.exp(-1), abs=1e-6)
    assert losses.kl_estimate(t(-1.0), t(-1.0), "k3").item() == 0


def test_slhf_losses_by_hand():
    logps = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]], requires_grad=True)
    kl = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    p = t(1.0, 0.0)
    # Leader reward p: coeff = beta*k - (p - .5) -> row0 [.05-.5, .1-.5], row1 [.15+.5, -]
    lead = losses.slhf_leader_loss(logps, kl, mask, p, beta=0.5)
    assert lead.loss.item() == pytest.approx(((-0.45 * -1 + -0.4 * -2) + (0.65 * -3)) / 2, abs=1e-6)
    lead.loss.backward()
    assert logps.grad.tolist() == [pytest.approx([-0.225, -0.2]), pytest.approx([0.325, 0.0])]
    # Follower reward 1 - p: row0 [.05+.5, .1+.5], row1 [.15-.5, -]
    fol = losses.slhf_follower_loss(logps.detach(), kl, mask, p, beta=0.5)
    assert fol.loss.item() == pytest.approx(((0.55 * -1 + 0.6 * -2) + (-0.35 * -3)) / 2, abs=1e-6)
    assert fol.stats["reward"].tolist() == [0.0, 1.0]
    assert fol.stats["length"].tolist() == [2.0, 1.0]
