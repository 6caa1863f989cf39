"""Golden tests: each loss computed by hand from its paper's formula on a small fixed example, in plain
Python floats (``math``), and compared with our tensor function to 1e-6.

The hand computations never call the code under test. Where a paper numbers the equation we cite
the number; where we could not check a number we cite the section instead of guessing one.
"""

from __future__ import annotations

import math

import pytest
import torch

from treeplay.learners import losses
from treeplay.search.preferences import label_smoothing


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# Two pairs: (policy chosen, policy rejected, ref chosen, ref rejected) summed log-probs.
PAIRS = [(-4.0, -6.5, -4.5, -6.0), (-10.0, -9.0, -11.0, -8.0)]
BETA = 0.1


def _tensors(rows):
    return [torch.tensor([r[i] for r in rows], dtype=torch.float64) for i in range(4)]


def test_golden_sigmoid_dpo():
    """DPO (Rafailov et al. 2023, Eq. 7) with conservative label smoothing ε (cDPO):

    h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))
    l = −(1 − ε) log σ(β h) − ε log σ(−β h), loss = mean over pairs.
    """
    eps = 0.2
    expected = []
    for pw, pl, rw, rl in PAIRS:
        h = (pw - rw) - (pl - rl)
        expected.append(-(1 - eps) * log_sigmoid(BETA * h) - eps * log_sigmoid(-BETA * h))
    out = losses.dpo_loss(*_tensors(PAIRS), beta=BETA, label_smoothing=eps)
    assert out.loss.item() == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    assert out.stats["per_example"].tolist() == pytest.approx(expected, abs=1e-6)


def test_golden_ipo():
    """IPO (Azar et al. 2023, the sampled loss of Eq. 17), with per-token averaged log-ratios as
    the MCTS-DPO and TRL implementations average them:

    h = (log π(y_w) − log π_ref(y_w)) / |y_w| − (log π(y_l) − log π_ref(y_l)) / |y_l|
    l = (h − 1/(2τ))², loss = mean over pairs.
    """
    tau, lengths_w, lengths_l = 0.1, [4, 10], [5, 8]
    expected = []
    for (pw, pl, rw, rl), nw, nl in zip(PAIRS, lengths_w, lengths_l, strict=True):
        h = (pw - rw) / nw - (pl - rl) / nl
        expected.append((h - 1 / (2 * tau)) ** 2)
    out = losses.ipo_loss(*_tensors(PAIRS), torch.tensor(lengths_w), torch.tensor(lengths_l), tau=tau)
    assert out.loss.item() == pytest.approx(sum(expected) / len(expected), abs=1e-6)


@pytest.mark.parametrize("visits", [(2, 0), (1, 0), (9, 3), (3, 3), (1, 5), (0, 0), (0, 2)])
def test_golden_mcts_dpo_alpha_and_loss(visits):
    """MCTS-DPO (Xie et al. 2024, the conservative step-level DPO loss of their Section 2): the pair's
    label smoothing is α = 1/(N_w/N_l + 1), with the authors' code's floor on the chosen count only
    (``calculate_preference_confidence``: confidence = 1/(1 + N_l/max(1, N_w)),
    α = min(1 − confidence, 0.5)); then the cDPO loss of ``test_golden_sigmoid_dpo`` with ε = α.
    """
    n_w, n_l = visits
    confidence = 1 / (1 + n_l / max(1, n_w))
    alpha = min(1 - confidence, 0.5)
    assert label_smoothing(n_w, n_l) == pytest.approx(alpha, abs=1e-12)
    expected = []
    for pw, pl, rw, rl in PAIRS:
        h = (pw - rw) - (pl - rl)
        expected.append(-(1 - alpha) * log_sigmoid(BETA * h) - alpha * log_sigmoid(-BETA * h))
    out = losses.mcts_dpo_loss(
        *_tensors(PAIRS), torch.tensor([n_w, n_w]), torch.tensor([n_l, n_l]), beta=BETA
    )
    assert out.loss.item() == pytest.approx(sum(expected) / 2, abs=1e-6)
    assert out.stats["alpha"].tolist() == pytest.approx([alpha, alpha], abs=1e-7)


def test_regression_mcts_dpo_alpha_floors_only_the_chosen_count():
    """A chosen step with 2 visits against a never-visited sibling (the usual one-step demo pair) gets
    α = 0 and the full DPO gradient: dl/dh = −β(1 − σ(βh)) = −0.05 at h = 0 and −0.0378 at h = 5.
    Flooring both counts at 1 gave α = 1/3 and −0.0167 / −0.0044 (the preference term stopped pushing
    at βh = ln 2), and 1 vs 0 gave α = 0.5, no preference gradient at all."""
    assert label_smoothing(2, 0) == 0.0 and label_smoothing(1, 0) == 0.0
    for h, expected in [(0.0, -0.0500), (5.0, -0.1 * (1 - sigmoid(0.5)))]:
        pw = torch.tensor([h], dtype=torch.float64, requires_grad=True)
        zero = torch.zeros(1, dtype=torch.float64)
        out = losses.mcts_dpo_loss(pw, zero, zero, zero, torch.tensor([2]), torch.tensor([0]), beta=0.1)
        out.loss.backward()
        assert pw.grad.item() == pytest.approx(expected, abs=1e-6)
    assert round(-0.1 * (1 - sigmoid(0.5)), 4) == -0.0378


def test_golden_lipo_lambda_listwise_loss():
    """TPO's ranking loss (Liao et al. 2025, the LiPO-λ objective of Liu et al. 2024, Section 4):

    L = Σ_{i,j: ψ_i > ψ_j} Δ_ij · −log σ(s_i − s_j),  Δ_ij = |G_i − G_j| · |1/D(τ_i) − 1/D(τ_j)|,
    G = 2^ψ' − 1 with ψ' the labels rescaled to [0, 1] per list, D(τ) = log2(1 + τ), τ the rank of
    the item under the current scores s (1 = highest).
    """
    s = [2.0, 0.5, 1.0]
    psi = [3.0, 1.0, 2.0]
    lo, hi = min(psi), max(psi)
    gains = [2 ** ((p - lo) / (hi - lo)) - 1 for p in psi]
    order = sorted(range(3), key=lambda i: -s[i])
    rank = {i: order.index(i) + 1 for i in range(3)}
    inv_d = {i: 1 / math.log2(1 + rank[i]) for i in range(3)}
    expected = 0.0
    for i in range(3):
        for j in range(3):
            if psi[i] > psi[j]:
                delta = abs(gains[i] - gains[j]) * abs(inv_d[i] - inv_d[j])
                expected += delta * -log_sigmoid(s[i] - s[j])
    out = losses.lipo_lambda_loss(torch.tensor([s]), torch.tensor([psi]))
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)


def test_golden_tpo_adaptive_step_score():
    """TPO's adaptive step reward (our reading, docs/learners.md): s_n = Σ_k w_nk l_nk / Σ_k w_nk with
    w = 1 − c + floor, c the mean cosine of step k of response n to step k of the other responses."""
    emb = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    ratios = torch.tensor([[0.5, -1.0], [0.25, 2.0]])
    cos1 = (1 * 0 + 1 * 1) / math.sqrt(2)  # step 1 of response 0 vs step 1 of response 1
    w = [[1 - 1 + 0.01, 1 - cos1 + 0.01], [1 - 1 + 0.01, 1 - cos1 + 0.01]]
    expected = [sum(w[n][k] * ratios[n, k].item() for k in range(2)) / sum(w[n]) for n in range(2)]
    weights = losses.step_weights(emb, mask, "dissimilar", None, 0.01)
    got = losses.adaptive_step_scores(ratios, weights)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def _slhf_by_hand(token_logps, token_refs, reward, beta, baseline, kind):
    total = 0.0
    for lp, rf, r in zip(token_logps, token_refs, reward, strict=True):
        seq = 0.0
        for a, b in zip(lp, rf, strict=True):
            if kind == "k1":
                k = a - b
            else:
                d = max(-40.0, min(40.0, b - a))
                k = math.expm1(d) - d
            seq += (beta * k - (r - baseline)) * a
        total += seq
    return total / len(token_logps)


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_golden_slhf_leader_and_follower_terms(kind):
    """SLHF (Pásztor et al.), StackelbergGDA's REINFORCE terms as the authors' trainer writes them:

    leader:   L_L = mean_b Σ_t [β k_t − (p_b − 0.5)] · log π(y_t)        (p = p(y ≻ y'|x))
    follower: L_F = mean_b Σ_t [β k'_t − ((1 − p_b) − 0.5)] · log ω(y'_t)
    k1 = log π − log π_ref; k3 = e^d − d − 1 with d = log π_ref − log π clamped to [−40, 40].
    (The bracket carries no gradient; the loss value is what we compare.)
    """
    logps = [[-0.5, -1.25, -2.0], [-0.1, -3.0, 0.0]]
    refs = [[-0.75, -1.0, -2.5], [-0.2, -45.0, 0.0]]  # -45: the clamp matters for k3
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    p = [0.8, 0.3]
    lp = [row[: int(m.sum())] for row, m in zip(logps, mask, strict=True)]
    rf = [row[: int(m.sum())] for row, m in zip(refs, mask, strict=True)]
    t_lp, t_rf = torch.tensor(logps), torch.tensor(refs)
    kl = losses.kl_estimate(t_lp, t_rf, kind)
    lead = losses.slhf_leader_loss(t_lp, kl, mask, torch.tensor(p), beta=0.1)
    fol = losses.slhf_follower_loss(t_lp, kl, mask, torch.tensor(p), beta=0.1)
    assert lead.loss.item() == pytest.approx(_slhf_by_hand(lp, rf, p, 0.1, 0.5, kind), abs=1e-5)
    assert fol.loss.item() == pytest.approx(_slhf_by_hand(lp, rf, [1 - x for x in p], 0.1, 0.5, kind), abs=1e-5)
    assert torch.isfinite(kl).all()


def test_regression_slhf_k3_is_clamped():
    """k3 with a reference 60 nats above the sample's log-prob: e^60 without the clamp, e^40 − 41
    with the authors' clamp of the log-ratio to [−40, 40]."""
    got = losses.kl_estimate(torch.tensor([-70.0], dtype=torch.float64), torch.tensor([-10.0], dtype=torch.float64), "k3")
    assert got.item() == pytest.approx(math.expm1(40.0) - 40.0, rel=1e-9)
