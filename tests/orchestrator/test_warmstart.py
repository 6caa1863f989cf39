"""The supervised warm start: a demonstration that ends teaches the policy to stop there; context
lines are read, not trained on; a mix of kinds fills every batch by its shares.

A rubric or a verdict is generated without a stop string (agents/react.py), so a policy that never
saw an end-of-sequence token after one writes on to its token limit. Real parts: a tiny char model
trained for a few dozen steps, sampled greedily by the HF engine.
"""

from __future__ import annotations

import pytest

from treeplay.agents.base import Demonstration
from treeplay.engines import make_engine
from treeplay.engines.tiny import build_tiny_model
from treeplay.orchestrator.config import ConfigError, load_config
from treeplay.orchestrator.warmstart import _encode, batch_counts, supervised_warm_start


def test_a_demonstration_that_ends_is_followed_by_the_end_of_sequence_token(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "m", 32, 1, 2))
    (plain, plain_mask), (ends, ends_mask) = _encode(tok, [("q:", "ab\n"), Demonstration("q:", "ab\n", ends=True)])
    assert ends == plain + [tok.eos_token_id] and ends_mask == plain_mask + [True]
    assert tok.eos_token_id not in plain and plain_mask == [False] * 2 + [True] * 3


def test_context_lines_are_read_not_trained_on(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "m", 32, 1, 2))
    demo = Demonstration("q\n", "a1\nobs\na2\n", context=(1,))
    [(ids, mask)] = _encode(tok, [demo])
    assert ids == tok("q\na1\nobs\na2\n", add_special_tokens=False).input_ids
    assert mask == [False] * 2 + [True] * 3 + [False] * 4 + [True] * 3
    assert demo.targets() == [("q\n", "a1\n"), ("q\na1\nobs\n", "a2\n")]


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


def test_batch_counts_follow_the_shares():
    assert batch_counts({"actions": 0.5, "rubrics": 0.25, "verdicts": 0.25}, 16) == {
        "actions": 8, "rubrics": 4, "verdicts": 4}
    assert batch_counts({"a": 1, "b": 1, "c": 1}, 4) == {"a": 2, "b": 1, "c": 1}
    assert batch_counts({"a": 100, "b": 1}, 8) == {"a": 7, "b": 1}  # every kind gets a slot
    with pytest.raises(ValueError, match="cannot hold one example of each of 3 kinds"):
        batch_counts({"a": 1, "b": 1, "c": 1}, 2)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("warm_start.demonstrations={actions: 0}", "each kind's share must be a positive number"),
        ("warm_start.demonstrations={speeches: 1}", "config key 'warm_start.demonstrations.speeches.[key]'"),
        ("warm_start.demonstrations={}", "config key 'warm_start.demonstrations'"),
    ],
)
def test_a_bad_mix_is_one_line_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="batch_size 2 cannot hold one example of each of 3 kinds"):
        load_config(None, ["warm_start.batch_size=2", "warm_start.demonstrations={actions: 1, rubrics: 1, verdicts: 1}"])


def test_a_mixed_warm_start_fills_every_batch_by_the_shares_and_learns_each_kind(tmp_path):
    model = build_tiny_model(tmp_path / "m", 64, 2, 2)
    long_prompt = "a much longer prompt that stands for a rubric generator's\n"
    mix = {"actions": [("act?\n", "go[x]\n")], "rubrics": [Demonstration(long_prompt, "1. [1.00] x", ends=True)]}
    info = supervised_warm_start(model, mix, steps=80, batch_size=4, lr=3e-3, warmup=5, num_threads=1,
                                 shares={"actions": 0.5, "rubrics": 0.5})
    assert info["examples"] == 2
    engine = make_engine("hf", model, num_threads=1)
    [[action]] = engine.generate(["act?\n"], max_tokens=10, temperature=0.0, stop=["\n"])
    [[rubric]] = engine.generate([long_prompt], max_tokens=30, temperature=0.0)
    assert action.text == "go[x]" and (rubric.text, rubric.finish_reason) == ("1. [1.00] x", "eos")
    with pytest.raises(ValueError, match="warm start got no examples of kind rubrics"):
        supervised_warm_start(model, {"actions": mix["actions"], "rubrics": []}, steps=1, batch_size=2)


def test_a_list_of_kinds_is_equal_shares_and_a_repeat_is_one_line():
    # The form configs used before shares were a setting still loads, as equal shares.
    cfg = load_config(None, ["warm_start.demonstrations=[actions, rubrics]"])
    assert cfg.warm_start.demonstrations == {"actions": 1.0, "rubrics": 1.0}
    with pytest.raises(ConfigError, match="demonstration kinds must be distinct"):
        load_config(None, ["warm_start.demonstrations=[actions, actions]"])
