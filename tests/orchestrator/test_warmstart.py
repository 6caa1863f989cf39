"""The supervised warm start: a demonstration that ends teaches the policy to stop there.

A rubric or a verdict is generated without a stop string (agents/react.py), so a policy that never
saw an end-of-sequence token after one writes on to its token limit. Real parts: a tiny char model
trained for a few dozen steps, sampled greedily by the HF engine.
"""

from __future__ import annotations

from agents.base import Demonstration
from orchestrator.engines import make_engine
from orchestrator.engines.tiny import build_tiny_model
from orchestrator.warmstart import _encode, supervised_warm_start


def test_a_demonstration_that_ends_is_followed_by_the_end_of_sequence_token(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "m", 32, 1, 2))
    (plain, n_plain), (ends, n_ends) = _encode(tok, [("q:", "ab\n"), Demonstration("q:", "ab\n", ends=True)])
    assert n_plain == n_ends and ends == plain + [tok.eos_token_id]
    assert tok.eos_token_id not in plain


def test_the_policy_stops_where_a_demonstration_ended(tmp_path):
    model = build_tiny_model(tmp_path / "m", 64, 2, 2)
    examples = [Demonstration("verdict?\n", '{"pass": true}', ends=True), ("act?\n", "go[x]\n")]
    info = supervised_warm_start(model, examples, steps=80, batch_size=4, lr=3e-3, warmup=5, num_threads=1)
    assert info["examples"] == 2
    engine = make_engine("hf", model, num_threads=1)
    [[verdict]] = engine.generate(["verdict?\n"], max_tokens=30, temperature=0.0)
    assert verdict.text == '{"pass": true}' and verdict.finish_reason == "eos"
    # An action is taught without one: the caller stops it at its newline.
    [[action]] = engine.generate(["act?\n"], max_tokens=30, temperature=0.0, stop=["\n"])
    assert action.text == "go[x]" and action.finish_reason == "stop"
