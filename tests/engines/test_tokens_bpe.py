"""Token in, token out on a byte-level BPE model: what the learners train on is what the engine
was prompted with and generated.

With the char tokenizer text and tokens are the same thing. With BPE they are not: a random or
young model samples non-canonical splits ("4" "6" where the tokenizer writes "46"), a stop string
can fall inside a token ("7\\n1"), and merges cross the boundary between a prompt and a step. These
tests run the real search with the real HF engine on the session's BPE model (``bpe_model_dir``),
record every prompt the engine got and every completion it returned, and check the trees, the
pairs and lists, the store round trip, export and the inspector, and every learner against that record.
"""

from __future__ import annotations

import pytest

from treeplay.agents.base import TokenIds
from treeplay.agents.envs.arithmetic import ArithmeticEnv
from treeplay.engines import make_engine
from treeplay.engines.contract import align_ids, cut_at_stop, decode
from treeplay.search.mcts import search_many
from treeplay.search.preferences import ranked_lists, step_pairs, tree_result
from treeplay.search.state import MCTSConfig


class Recording:
    """The real engine, with a log of the token ids of every prompt and every completion."""

    def __init__(self, engine):
        self.engine = engine
        self.calls: list[tuple[list[int], list]] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts, **kwargs):
        out = self.engine.generate(prompts, **kwargs)
        for p, samples in zip(prompts, out, strict=True):
            ids = list(p.ids) if isinstance(p, TokenIds) else self.engine.encode(p, prompt=True)
            self.calls.append((ids, samples))
        return out


@pytest.fixture(scope="module")
def engine(bpe_model_dir):
    e = make_engine("hf", bpe_model_dir, seed=0, num_threads=1)
    yield Recording(e)
    e.close()


@pytest.fixture(scope="module")
def trees(engine):
    env = ArithmeticEnv(ops=2, digits=2)
    tasks = env.tasks("train", 6, seed=3)
    cfg = MCTSConfig(iterations=2, first_root_multiplier=2, root_width=4, width=3, breadth_limit=4,
                     max_step_tokens=10, include_reference_steps=True, seed=5)
    return search_many(tasks, lambda: ArithmeticEnv(ops=2, digits=2), engine, cfg)


def _pairs(trees):
    return [p for i, t in enumerate(trees) for p in step_pairs(t, filter_incorrect=False, tree_index=i)]


def test_tree_keeps_the_context_the_engine_was_given(engine, trees):
    """Every expansion was prompted with its path's ids; those ids spell the path's text; and with
    this tokenizer re-tokenizing the text would have given the engine something else."""
    prompted = {tuple(ids) for ids, _ in engine.calls}
    joint_differs = 0
    for tree in trees:
        for node in tree.nodes():
            d = tree[node]
            if d["error"]:
                continue
            ctx = tree.token_context(node)
            assert decode(engine.tokenizer, ctx) == tree.text(node)
            if node != tree.root:
                assert decode(engine.tokenizer, d["token_ids"]) == d["step"] + "\n"
            if tree.children(node) and not tree[node]["terminal"]:
                assert tuple(ctx) in prompted
            joint_differs += engine.encode(tree.text(node), prompt=True) != ctx
    assert joint_differs > 0, "the BPE tokenizer should merge across a step boundary somewhere here"


def test_steps_keep_the_sampled_ids(engine, trees):
    """A sampled step's ids start with the ids the engine sampled (all of those that spell the kept
    text); only what a stop string cut out of a token and the newline are tokenized on their own."""
    sampled: dict[tuple[int, ...], list] = {}
    for ids, samples in engine.calls:
        sampled.setdefault(tuple(ids), []).extend(samples)
    checked = 0
    for tree in trees:
        for node in tree.nodes():
            d = tree[node]
            if node == tree.root or d["error"] or d["info"].get("from_reference"):
                continue
            parent = tree.parent(node)
            comps = [c for c in sampled[tuple(tree.token_context(parent))] if c.text.strip() == d["step"]]
            assert comps, "every sampled step comes from a completion the engine returned there"
            assert any(d["token_ids"] == align_ids(engine.tokenizer, c.token_ids, d["step"] + "\n") for c in comps)
            checked += 1
    assert checked > 10


def test_regression_pairs_train_on_generated_tokens(engine, trees, bpe_model_dir):
    """DPO's chosen/rejected ids are the ids the engine generated in context, not the text
    re-tokenized alone (which for this model differs on some pair: the check would then fail)."""
    from treeplay.learners.dpo import DPOLearner

    pairs = _pairs(trees)
    assert pairs, "the injected reference steps should give pairs with a margin"
    learner = DPOLearner(bpe_model_dir, num_threads=1, max_length=512)
    examples = learner.prepare(pairs)
    assert len(examples) == len(pairs)
    text_differs = 0
    for pair, ex in zip(pairs, examples, strict=True):
        tree = trees[pair.tree_index]
        parent = pair.info["parent_node"]
        assert list(ex.prompt) == tree.token_context(parent)
        for side, ids in (("chosen", ex.chosen), ("rejected", ex.rejected)):
            end = pair.info[f"{side}_end"]
            assert list(ids) == tree.token_context(end)[len(ex.prompt):]
            text_differs += engine.encode(getattr(pair, side)) != list(ids)
    assert text_differs > 0, "some generated step must differ from its re-tokenized text on this model"


def test_stop_string_inside_a_token(bpe_model_dir):
    """A token that holds the stop newline and the next line's start: the step keeps the characters
    before the newline, and its ids spell exactly the step and its newline."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bpe_model_dir)
    straddling = sorted(i for i in tok.get_vocab().values() if "\n" in decode(tok, [i]).strip("\n"))
    assert straddling, "the tokenizer was trained to merge across newlines"
    head = tok("12+3=1", add_special_tokens=False)["input_ids"]
    sampled = head + [straddling[0]]
    text, ids, _, stopped = cut_at_stop(tok, sampled, [0.0] * len(sampled), ["\n"])
    assert stopped and ids == head and text == decode(tok, head) + decode(tok, [straddling[0]]).split("\n")[0]
    aligned = align_ids(tok, sampled, text + "\n")
    assert decode(tok, aligned) == text + "\n" and aligned[: len(head)] == head


def test_store_round_trip_keeps_tokens(trees, bpe_model_dir, tmp_path):
    """Pairs and lists read back from the store still carry their ids, and DPO uses them."""
    from treeplay.learners.dpo import DPOLearner
    from treeplay.store import queries
    from treeplay.store.database import open_store

    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    run = queries.start_run(store, "bpe", {})
    queries.start_iteration(store, run, 0, 0)
    for t in trees:
        queries.write_task_result(store, run, 0, tree_result(t, pairs=True, lists=True, filter_incorrect=False))
    data = queries.preference_data(store, run, 0)
    assert data.pairs and all("tokens" in p.info for p in data.pairs)
    assert all("tokens" in rec.info for rec in data.ranked_lists)
    learner = DPOLearner(bpe_model_dir, num_threads=1)
    trees_by_prompt = {}
    for t in trees:
        for n in t.nodes():
            trees_by_prompt.setdefault(t.text(n), t.token_context(n))
    for p, ex in zip(data.pairs, learner.prepare(data.pairs), strict=True):
        assert list(ex.prompt) == trees_by_prompt[p.prompt]
    store.close()


def test_export_and_inspector_read_a_bpe_store(engine, trees, tmp_path):
    """A store of BPE trees through ``treeplay export`` and the inspector: a tree exported as JSON
    reads back with every node's token context, and each context spells the text the inspector
    shows for that node; GraphML and DOT take the id lists; the TRL rows are the pairs' text."""
    import json

    import networkx as nx
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from treeplay.orchestrator.cli import app
    from treeplay.orchestrator.web.app import create_app
    from treeplay.search.tree import PreferenceTree
    from treeplay.store import queries
    from treeplay.store.database import open_store

    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = open_store(url)
    run = queries.start_run(store, "bpe", {})
    queries.start_iteration(store, run, 0, 0)
    for t in trees:
        queries.write_task_result(store, run, 0, tree_result(t, pairs=True, lists=True, filter_incorrect=False))
    stored = queries.list_trees(store, run)
    pairs = queries.list_pairs(store, run)
    store.close()
    assert len(stored) == len(trees) and pairs

    def cli(*args: str) -> str:
        result = CliRunner().invoke(app, [*args, "--db", url])
        assert result.exit_code == 0, (args, result.output)
        return result.stdout

    checked = 0
    with TestClient(create_app(url), base_url="http://127.0.0.1:8765") as client:
        for summary in stored:
            back = PreferenceTree.from_json(cli("export", "tree", str(summary.id), "--format", "json"))
            assert len(back) == summary.n_nodes
            for node in back.nodes():
                if back[node]["error"]:
                    continue
                ctx = back.token_context(node)
                detail = client.get(f"/api/nodes/{node}/detail").json()
                assert decode(engine.tokenizer, ctx) == back.text(node) == detail["text"]
                checked += 1
            graphml = tmp_path / f"{summary.id}.graphml"
            cli("export", "tree", str(summary.id), "--format", "graphml", "--out", str(graphml))
            assert nx.read_graphml(graphml).number_of_nodes() == len(back)
            assert cli("export", "tree", str(summary.id), "--format", "dot").startswith("digraph")
    assert checked > len(trees)
    rows = [json.loads(line) for line in cli("export", "pairs", "bpe", "--format", "trl-jsonl").splitlines()]
    assert rows == [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]


def test_text_is_the_truth_when_ids_do_not_spell_it(trees, bpe_model_dir):
    """Ids that do not decode to the record's text (another tokenizer, edited text) are ignored."""
    from treeplay.learners.dpo import DPOLearner

    pair = _pairs(trees)[0]
    pair.info["tokens"]["responses"][0] = pair.info["tokens"]["responses"][0][:-1]
    learner = DPOLearner(bpe_model_dir, num_threads=1)
    ex = learner.prepare([pair])[0]
    assert list(ex.chosen) == learner.policy.tokenizer(pair.chosen, add_special_tokens=False)["input_ids"]


def test_packing_matches_plain_forwards_on_bpe(trees, bpe_model_dir):
    """Prefix-shared packing of generated ids: the shared trunk ends on a token boundary (ids are
    compared, not text), and every response's packed log-probs equal its own plain forward."""
    import torch

    from tests.helpers.reference_logprobs import unshared_logprobs
    from treeplay.learners.dpo import DPOLearner
    from treeplay.learners.logprobs import (
        Group,
        pack,
        packed_logprobs,
        per_sequence,
    )

    learner = DPOLearner(bpe_model_dir, num_threads=1, loss_type="mcts_dpo")
    examples = learner.prepare(_pairs(trees))[:6]
    groups = [Group(list(ex.prompt), [list(ex.chosen), list(ex.rejected)]) for ex in examples]
    model = learner.policy.model
    with torch.no_grad():
        packed = pack(groups, learner.policy.tokenizer.pad_token_id)
        values = per_sequence(packed, packed_logprobs(model, packed).values)
        for g, (a, b) in zip(groups, zip(values[::2], values[1::2], strict=True), strict=True):
            for resp, got in zip(g.responses, (a, b), strict=True):
                assert got.tolist() == pytest.approx(unshared_logprobs(model, g.prompt, resp).tolist(), abs=1e-5)


def test_every_learner_trains_on_bpe_records(trees, bpe_model_dir):
    """DPO family, TPO, RFT and SLHF each make an update on the BPE model's own records."""
    from treeplay.learners.dpo import DPOLearner
    from treeplay.learners.rft import RFTLearner
    from treeplay.learners.slhf import SLHFLearner
    from treeplay.learners.tpo import TPOLearner
    from treeplay.store.records import PreferenceData

    pairs = _pairs(trees)
    lists = [rec for i, t in enumerate(trees) for rec in ranked_lists(t, tree_index=i)]
    for rec in lists:  # RFT trains on verified-correct items; the reference steps are
        assert "tokens" in rec.info
    data = PreferenceData(pairs=pairs, ranked_lists=lists)
    for loss in ("mcts_dpo", "ipo"):
        m = DPOLearner(bpe_model_dir, num_threads=1, loss_type=loss, batch_size=8).train(data)
        assert m["updates"] >= 1 and m["healthy"]
    m = TPOLearner(bpe_model_dir, num_threads=1, batch_size=4).train(data)
    assert m["updates"] >= 1
    if any(True in (rec.info.get("correct") or []) for rec in lists):
        assert RFTLearner(bpe_model_dir, num_threads=1).train(data)["updates"] >= 1
    slhf = SLHFLearner(bpe_model_dir, lambda prompt, a, b: 0.5 + 0.5 * ((len(a) > len(b)) - (len(a) < len(b))),
                       num_threads=1, max_new_tokens=8, batch_size=2)
    assert slhf.train([t.prompt for t in trees[:2]], steps=1)["updates"] >= 1


def test_regression_nul_step_does_not_break_the_store_write(tmp_path):
    """A byte-level model can sample a NUL byte (the BPE engine did in this suite's search); such a
    step used to reach the store and fail the whole task's write. It is now a failed step."""
    from treeplay.agents.scripted import ScriptedPolicy
    from treeplay.store import queries
    from treeplay.store.database import open_store

    env = ArithmeticEnv(ops=1, digits=2)
    tasks = env.tasks("train", 2, seed=0)
    policy = ScriptedPolicy(lambda prompt, rng: rng.choice(["1\x002", "3+4=7", "9"]))
    found = search_many(tasks, lambda: ArithmeticEnv(ops=1, digits=2), policy,
                        MCTSConfig(iterations=1, root_width=6, breadth_limit=6, seed=1))
    errors = [t[n]["error"] for t in found for n in t.nodes() if t[n]["error"]]
    assert "step contains a NUL character" in errors
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    run = queries.start_run(store, "nul", {})
    queries.start_iteration(store, run, 0, 0)
    for t in found:
        queries.write_task_result(store, run, 0, tree_result(t, filter_incorrect=False))
    store.close()


@pytest.mark.slow
def test_run_builds_a_bpe_model_from_the_config(tmp_path):
    """``model.tiny.tokenizer: bpe`` builds the tokenizer on the run's environment and warm-starts the
    model with each demonstration line tokenized on its own (as search's contexts hold them)."""
    from transformers import AutoConfig, AutoTokenizer

    from treeplay.orchestrator.config import load_config
    from treeplay.orchestrator.run_start import prepare_model

    cfg = load_config(None, ["model.tiny.tokenizer=bpe", "model.tiny.hidden_size=64", "model.tiny.num_layers=1",
                             "model.tiny.num_heads=2", "model.tiny.vocab_size=400", "warm_start.steps=3",
                             "warm_start.examples=50", "warm_start.batch_size=4"])
    path, info = prepare_model(cfg, tmp_path)
    assert AutoConfig.from_pretrained(path).model_type == "qwen2" and info["loss"] > 0
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == 400 and tok.chat_template and tok.bos_token is None
