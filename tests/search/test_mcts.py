"""MCTS-DPO search and pair extraction on a toy environment with a known answer and scripted policies."""

from __future__ import annotations

import math
import random
import time

import pytest

from treeplay.agents.base import StepResult, Task
from treeplay.agents.scripted import ScriptedPolicy
from treeplay.search.expansion import normalise_step, prior
from treeplay.search.mcts import puct, search, search_many
from treeplay.search.preferences import (
    curriculum,
    label_smoothing,
    node_stats,
    ranked_lists,
    smallest_margin_first,
    step_pairs,
    tree_result,
)
from treeplay.search.state import MCTSConfig
from treeplay.search.tree import PreferenceTree
from treeplay.store.records import PairRecord


class DigitEnv:
    """Spell the task's answer one digit per step; the episode ends after len(answer) steps.

    Reward 1.0 at the end iff the digits spell the answer. ``boom`` actions raise (a broken tool).
    """

    name = "digits"

    def __init__(self) -> None:
        self.task: Task | None = None
        self.steps: list[str] = []

    def tasks(self, split: str, n: int, seed: int) -> list[Task]:
        return [
            Task(id=f"{split}-{seed}-{i}", prompt=f"spell {i}\n", answer="210", env=self.name)
            for i in range(n)
        ]

    def reset(self, task: Task) -> str:
        self.task, self.steps = task, []
        return task.prompt

    def step(self, action: str) -> StepResult:
        assert self.task is not None and self.task.answer is not None
        if action == "boom":
            raise RuntimeError("tool exploded")
        self.steps.append(action.strip())
        done = len(self.steps) >= len(self.task.answer)
        correct = done and "".join(self.steps) == self.task.answer
        return StepResult("", 1.0 if correct else 0.0, done, {})

    def score(self, task, trajectory) -> float:
        return 0.0


def digit_tasks(n: int, answer: str = "210", offset: int = 0) -> list[Task]:
    return [
        Task(id=f"t{offset + i}", prompt=f"spell {offset + i}\n", answer=answer, env="digits")
        for i in range(n)
    ]


def random_digits(prompt: str, rng: random.Random) -> str:
    return str(rng.randint(0, 2))


WIDE = dict(root_width=4, width=4, breadth_limit=4, depth_limit=3)


# ------------------------------------------------------------------------------- formulas
def test_prior_puct_and_normalisation_by_hand():
    # exp(Σ logπ / L^1.25) with 4 tokens of log-prob -0.5: exp(-2 / 4**1.25)
    assert prior([-0.5] * 4, 1.25) == pytest.approx(math.exp(-2 / 4**1.25))
    assert prior([], 1.25) == 1.0
    # Q + c·p·sqrt(N)/(1+n); a fresh parent counts as N = 1
    assert puct(0.2, 0.5, 16, 3, 1.0) == pytest.approx(0.2 + 0.5 * 4 / 4)
    assert puct(0.2, 0.5, 0, 0, 2.0) == pytest.approx(0.2 + 2.0 * 0.5)
    assert normalise_step("  12 + 5 =17\n") == normalise_step("12+5= 17") == "12+5=17"
    assert label_smoothing(9, 3) == pytest.approx(0.25)
    assert label_smoothing(1, 10) == 0.5 and label_smoothing(4, 4) == 0.5  # clipped
    assert label_smoothing(0, 2) == 0.5  # only the chosen count is floored at 1: 2/(1+2), clipped
    assert label_smoothing(3, 0) == 0.0 and label_smoothing(0, 0) == 0.0  # unvisited rejected: trust the pair


def test_backup_formula_by_hand():
    from treeplay.search.mcts import _backup

    t = PreferenceTree("p\n")
    a = t.add_child(t.root, "a", reward=0.5, value=0.5)
    b = t.add_child(t.root, "b", reward=-0.2, value=-0.2, visits=3)
    c = t.add_child(a, "c", reward=0.25)
    t.add_child(a, "d", reward=1.0, value=1.0, visits=0)
    _backup(t, [t.root, a, c], gamma=1.0)
    assert t[c]["value"] == pytest.approx(0.25) and t[c]["visits"] == 1
    # V(a) = (1·0.25 + max(1,0)·1.0) / 2; Q(a) = r + V
    assert t[a]["V"] == pytest.approx(0.625) and t[a]["value"] == pytest.approx(1.125)
    # root: (1·1.125 + 3·(-0.2)) / 4
    assert t[t.root]["V"] == pytest.approx((1.125 - 0.6) / 4) and t[t.root]["visits"] == 1
    assert t[b]["value"] == pytest.approx(-0.2)


# ------------------------------------------------------------------------------- search quality
def test_more_iterations_find_the_answer_more_often():
    solved = {}
    for iters in (1, 8):
        total = 0
        for seed in range(4):
            policy = ScriptedPolicy(random_digits, seed=seed)
            trees = search_many(
                digit_tasks(30),
                DigitEnv,
                policy,
                MCTSConfig(iterations=iters, first_root_multiplier=1, seed=seed, **WIDE),
            )
            total += sum(t.solved() for t in trees)
        solved[iters] = total
    assert solved[8] >= solved[1] + 25, solved  # measured: 28 vs 64 of 120


def test_invariants_after_search():
    policy = ScriptedPolicy(random_digits, seed=3)
    cfg = MCTSConfig(iterations=6, seed=3, **WIDE)
    trees = search_many(digit_tasks(24), DigitEnv, policy, cfg)
    n_pairs = 0
    for t in trees:
        t.validate()
        sel = t.selected_path()
        # receding horizon ends at a terminal node
        assert t[sel[-1]]["terminal"]
        assert t.info["search"]["stopped"] is None
        stale = set(sel[:-1])  # ancestors of the final root are not updated after the root moved on
        for n in t.nodes():
            d = t[n]
            kids = t.children(n)
            if kids and d["visits"] and n not in stale:
                w = [max(1, t[c]["visits"]) for c in kids]
                expect = sum(wi * t[c]["value"] for wi, c in zip(w, kids, strict=True)) / sum(w)
                assert d["V"] == pytest.approx(expect), (t.task_id, n)
            if n != t.root and d["visits"] and n not in stale:
                assert d["value"] == pytest.approx(d["reward"] + cfg.gamma * d["V"])
            if d["terminal"] and not d["error"]:
                assert d["correct"] == (t.text(n).endswith("2\n1\n0\n"))
        for filt in (True, False):
            for p in step_pairs(t, filter_incorrect=filt):
                assert p.info["chosen_q"] >= p.info["rejected_q"]
                assert p.margin == pytest.approx(p.info["chosen_q"] - p.info["rejected_q"]) and p.margin > 0
                n_pairs += 1
    assert n_pairs > 10


def test_batching_one_generate_call_per_wave():
    def by_count():
        counts: dict[str, int] = {}

        def respond(prompt: str, rng: random.Random) -> str:
            counts[prompt] = counts.get(prompt, 0) + 1
            return str(counts[prompt] % 3)  # the same answers in every tree, whatever its task line

        return ScriptedPolicy(respond, score_fn=lambda p, c: -1.0 if c == "A" else -2.0)

    cfg = MCTSConfig(iterations=3, self_eval=True, **WIDE)
    one, many = by_count(), by_count()
    t1 = search_many(digit_tasks(1), DigitEnv, one, cfg)
    t16 = search_many(digit_tasks(16), DigitEnv, many, cfg)
    gen1 = [c for c in one.calls if c.method == "generate"]
    gen16 = [c for c in many.calls if c.method == "generate"]
    assert len(gen16) == len(gen1) > 3
    assert all(len(c.prompts) == 16 for c in gen16) and all(len(c.prompts) == 1 for c in gen1)
    assert gen16[0].n == 4 and gen16[0].kwargs["stop"] == ["\n"]
    score1 = [c for c in one.calls if c.method == "score"]
    score16 = [c for c in many.calls if c.method == "score"]
    assert len(score16) == len(score1) == len(gen1)  # one score call per wave, for all trees
    assert len(t16[5]) == len(t1[0])
    assert t16[0].info["search"]["generate_calls"] == len(gen16)


def test_self_eval_values_and_reference_visibility():
    answer_steps = ["2", "1", "0"]

    def score_fn(prompt: str, cont: str) -> float:
        # "B" (correct) is likely exactly when the proposed solution follows the answer so far
        sol = prompt.split("Proposed solution:\n", 1)[1].split("\nThe answer is (", 1)[0].split("\n")
        good = sol == answer_steps[: len(sol)]
        return math.log(0.9 if (cont == "B") == good else 0.1)

    policy = ScriptedPolicy(random_digits, score_fn=score_fn, seed=1)
    task = Task(id="r", prompt="spell r\n", answer="210", reference="2\n1\n0\n", env="digits")
    tree = search(task, DigitEnv, policy, MCTSConfig(iterations=4, self_eval=True, seed=1, **WIDE))
    evals = [tree[n]["self_eval"] for n in tree.nodes() if n != tree.root]
    assert all(e == pytest.approx(0.9) or e == pytest.approx(0.1) for e in evals)
    # v = C / max(depth_parent - 3, 1) (+ outcome at terminals); r = v - v_parent
    for n in list(tree.nodes())[1:]:
        d, parent = tree[n], tree[tree.parent(n)]
        outcome = (1.0 if d["correct"] else -1.0) if d["terminal"] else 0.0
        assert d["estimate"] == pytest.approx(d["self_eval"] + outcome)
        assert d["reward"] == pytest.approx(d["estimate"] - parent["estimate"])
    score_prompts = [p for c in policy.calls if c.method == "score" for p in c.prompts]
    assert score_prompts and not any("Example answer" in p for p in score_prompts)

    policy2 = ScriptedPolicy(random_digits, score_fn=score_fn, seed=1)
    cfg = MCTSConfig(iterations=2, self_eval=True, self_eval_sees_reference=True, **WIDE)
    search(task, DigitEnv, policy2, cfg)
    assert all(
        "Example answer:\n2\n1\n0\n" in p for c in policy2.calls if c.method == "score" for p in c.prompts
    )


def test_reference_steps_are_injected_as_candidates():
    policy = ScriptedPolicy(lambda p, rng: "1")  # never proposes the right first digit on its own
    task = Task(id="g", prompt="spell g\n", answer="210", reference="2\n1\n0\n", env="digits")
    tree = search(task, DigitEnv, policy, MCTSConfig(iterations=3, include_reference_steps=True, **WIDE))
    injected = [n for n in tree.nodes() if tree[n]["info"].get("from_reference")]
    assert [tree[n]["step"] for n in injected][:1] == ["2"]
    assert tree.solved()
    assert all(tree[n]["tokens"] > 0 for n in injected)  # priors were scored by the policy


# ------------------------------------------------------------------------------- failures and limits
def test_empty_garbage_and_raising_steps_are_recorded_and_search_finishes():
    def respond(prompt: str, rng: random.Random) -> str:
        return rng.choice(["", "   ", "boom", "\x00\x01garbage", "2", "1", "0"])

    policy = ScriptedPolicy(respond, seed=5)
    trees = search_many(digit_tasks(8), DigitEnv, policy, MCTSConfig(iterations=3, seed=5, **WIDE))
    errors = [t[n] for t in trees for n in t.nodes() if t[n]["error"]]
    kinds = {e["error"].split(":")[0] for e in errors}
    assert "empty step" in kinds and "environment raised RuntimeError" in kinds
    assert all(e["terminal"] and e["correct"] is False and e["env_reward"] == 0.0 for e in errors)
    for t in trees:
        t.validate()
        assert t[t.final_node()]["terminal"]
        # error nodes are never a side of a pair
        for p in step_pairs(t, filter_incorrect=False):
            assert not t[p.chosen_node]["error"] and not t[p.rejected_node]["error"]


def test_policy_and_reset_failures_are_recorded():
    class Broken(ScriptedPolicy):
        def generate(self, *args, **kwargs):
            raise RuntimeError("engine down")

    tree = search(digit_tasks(1)[0], DigitEnv, Broken(random_digits), MCTSConfig(iterations=2))
    kids = tree.children(tree.root)
    assert len(kids) == 1 and "engine down" in tree[kids[0]]["error"] and tree[kids[0]]["terminal"]

    class NoReset(DigitEnv):
        def reset(self, task):
            raise OSError("sandbox gone")

    tree = search(digit_tasks(1)[0], NoReset, ScriptedPolicy(random_digits), MCTSConfig(iterations=2))
    assert all("sandbox gone" in tree[c]["error"] for c in tree.children(tree.root))


def test_depth_limit_stops_an_endless_episode():
    class Endless(DigitEnv):
        def step(self, action):
            return StepResult("ok", 0.0, False, {})

    tree = search(
        digit_tasks(1)[0], Endless, ScriptedPolicy(random_digits), MCTSConfig(iterations=2, max_depth=5)
    )
    end = tree[tree.final_node()]
    assert end["depth"] == 5 and end["terminal"] and end["info"]["truncated"]
    assert max(tree[n]["depth"] for n in tree.nodes()) <= 5
    assert tree.text(tree.final_node()).count("ok\n") == 5  # observations are part of the context


def test_time_limit_is_respected():
    def slow(prompt: str, rng: random.Random) -> str:
        time.sleep(0.02)
        return str(rng.randint(0, 9))

    class Endless(DigitEnv):
        def step(self, action):
            return StepResult("", 0.0, False, {})

    cfg = MCTSConfig(iterations=50, max_depth=50, time_limit_s=0.3, **WIDE)
    start = time.monotonic()
    trees = search_many(digit_tasks(2), Endless, ScriptedPolicy(slow), cfg)
    assert time.monotonic() - start < 0.3 + 2 * (2 * 4 * 0.02) + 0.5  # one wave may overrun
    for t in trees:
        assert t.info["search"]["stopped"] == "time_limit"
        assert len(t.selected_path()) >= 2  # still committed greedily along what it had


# ------------------------------------------------------------------------------- pairs and lists
def test_pairs_lists_and_bundle_from_a_solved_tree():
    policy = ScriptedPolicy(random_digits, seed=11)
    trees = search_many(digit_tasks(12), DigitEnv, policy, MCTSConfig(iterations=8, seed=11, **WIDE))
    solved = [t for t in trees if t.solved()]
    unsolved = [t for t in trees if not t.solved()]
    assert solved and unsolved
    assert all(step_pairs(t) == [] for t in unsolved)  # filter_incorrect

    t = solved[0]
    pairs = step_pairs(t)
    assert pairs and len(step_pairs(t, max_pairs=1)) == 1
    for p in pairs:
        parent = p.info["parent_node"]
        assert p.prompt == t.text(parent) and p.task_id == t.task_id and p.source == "mcts"
        assert t.parent(p.chosen_node) == t.parent(p.rejected_node) == parent
        assert p.chosen == t.continuation(p.info["chosen_end"], parent)
        assert p.chosen.startswith(t[p.chosen_node]["step"] + "\n")
        assert p.chosen[: p.shared_prefix_chars] == p.rejected[: p.shared_prefix_chars]
        assert p.label_smoothing == pytest.approx(label_smoothing(p.chosen_visits, p.rejected_visits))
        qs = [node_stats(t, c)[0] for c in t.children(parent) if not t[c]["error"]]
        assert p.info["chosen_q"] == max(qs) and p.info["rejected_q"] == min(qs)
    second = step_pairs(t, choose_worst=False)
    assert all(p.info["rejected_q"] >= q.info["rejected_q"] for p, q in zip(second, pairs, strict=False))

    lists = ranked_lists(t, tree_index=3)
    assert lists
    for rl in lists:
        scores = [it.score for it in rl.items]
        assert scores == sorted(scores, reverse=True) and len(rl.items) >= 2
        assert rl.info["tree_index"] == 3 and rl.task_id == t.task_id
        for it in rl.items:
            assert it.step_rewards and len(it.step_rewards) == it.text.count("\n")

    task = digit_tasks(12)[int(t.task_id[1:])]
    res = tree_result(t, task)
    assert res.task_id == t.task_id and res.answer == "210" and res.environment == "digits"
    assert len(res.trees) == 1 and res.pairs == pairs and res.ranked_lists == ranked_lists(t)
    keys = {n.key for n in res.trees[0].nodes}
    assert all(p.chosen_node in keys and p.rejected_node in keys for p in res.pairs)


def test_smallest_margin_first_and_curriculum():
    pairs = [
        PairRecord(prompt=str(i), chosen="a", rejected="b", margin=m)
        for i, m in enumerate([0.5, 2.0, 0.1, 1.0])
    ]
    picked = smallest_margin_first(pairs, [0.3, -0.05, 2.0, -1.0], budget=2)
    assert [p.prompt for p in picked] == ["1", "0"]
    with pytest.raises(ValueError):
        smallest_margin_first(pairs, [1.0], budget=1)
    stages = curriculum(pairs, 3)
    assert [[p.prompt for p in s] for s in stages] == [["1", "3"], ["0"], ["2"]]
    assert [[p.prompt for p in s] for s in curriculum(pairs, 2, margins=[4, 3, 2, 1])] == [
        ["0", "1"],
        ["2", "3"],
    ]
    with pytest.raises(ValueError):
        curriculum(pairs, 0)


def test_regression_pair_statistics_are_read_at_commit_time():
    """MCTS-DPO's pair at a level uses the siblings' Q and N from when that level's step was
    committed (the authors' trainer records them right after the search at that root). The
    committed child keeps gaining visits and Q from the searches below it; reading the finished
    tree shrank its alpha and informed its Q better than the reference does."""
    policy = ScriptedPolicy(random_digits, seed=11)
    trees = search_many(digit_tasks(12), DigitEnv, policy, MCTSConfig(iterations=8, seed=11, **WIDE))
    t = next(t for t in trees if t.solved())
    root_pair = step_pairs(t)[0]
    assert root_pair.info["parent_node"] == t.root
    chosen = root_pair.chosen_node
    commit_n, final_n = t[chosen]["commit_visits"], t[chosen]["visits"]
    assert commit_n is not None and final_n > commit_n  # the search went on below the committed step
    assert root_pair.chosen_visits == commit_n
    assert root_pair.label_smoothing == pytest.approx(label_smoothing(commit_n, root_pair.rejected_visits))
    assert root_pair.info["chosen_q"] == t[chosen]["commit_value"]
    late = step_pairs(t, stats="final")[0]
    assert late.chosen_visits == final_n  # the other reading stays one argument away
    # the snapshot survives the store's record round trip
    back = PreferenceTree.from_record(t.to_record())
    assert step_pairs(back)[0] == root_pair


def test_sibling_ties_are_broken_by_the_commit_policy_not_the_prior():
    """Equal Q: the authors sort by the visit policy π next (the most visited sibling wins), then r,
    v and N; the prior no longer decides."""
    t = PreferenceTree("q\n")
    a = t.add_child(t.root, "1", value=0.5, visits=1, prior=0.9, terminal=True, correct=False)
    b = t.add_child(t.root, "2", value=0.5, visits=4, prior=0.1, terminal=True, correct=True)
    c = t.add_child(t.root, "3", value=-1.0, visits=1, prior=0.5, terminal=True, correct=False)
    t[b]["selected"] = True
    [rl] = ranked_lists(t)
    assert [it.node for it in rl.items] == [b, a, c]
    [pair] = step_pairs(t)
    assert (pair.chosen_node, pair.rejected_node) == (b, c)
