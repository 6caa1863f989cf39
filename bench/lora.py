"""Benchmark: LoRA against full fine-tuning on a real-shaped model: redeploy time, learner memory, pairs/s.

    .venv/bin/python bench/lora.py [--hidden 512] [--layers 8] [--pairs 32] [--rank 16] [--vllm]

Model: a random-init Qwen2 with a byte-level BPE tokenizer built here (engines/bpe.py;
hidden 512, 8 layers, 8 heads / 4 KV heads, vocabulary 4096: ~26M parameters), fp32, 1 thread.

- **Redeploy** (what the loop does after each learner update, minus Ray's object store): the
  learner's ``state_dict()`` -> ``to_payload`` -> ``from_payload`` -> the engine's ``load_weights``,
  once with the full weights (a full fine-tuning learner) and once with the adapter (a LoRA learner,
  rank ``--rank`` on q/k/v/o and the MLP), each on a live HF engine (and a vLLM one with
  ``--vllm``); medians of ``--repeats``. ``lora_redeploy_speedup`` = full / adapter.
- **Learner memory and speed**: each learner runs in its own process (so peak RSS is its own):
  build, one DPO ``train()`` over ``--pairs`` pairs (batch 8, sigmoid + NLL, fixed reference);
  ``peak_rss_mb`` is that process's peak RSS (VmHWM), ``pairs_per_s`` the learner's figure. Full
  fine-tuning holds a second copy of the weights as its reference and AdamW moments for every
  weight; LoRA holds neither.

Human-readable lines first; the LAST stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(tempfile.gettempdir(), "treeplay-vllm-cache"))


def make_pairs(n: int):
    from treeplay.store.records import PairRecord

    out = []
    for i in range(n):
        a, b, c = 10 + i, 37 + 3 * i, 5 + i % 7
        prompt = f"{a}+{b}-{c}\n"
        good = f"{a}+{b}={a + b}\n{a + b}-{c}={a + b - c}\n"
        bad = f"{a}+{b}={a + b + 1}\n{a + b + 1}-{c}={a + b + 1 - c}\n"
        out.append(PairRecord(prompt=prompt, chosen=good, rejected=bad, source="mcts", info={"final": True}))
    return out


def learner_job(model_dir: str, pairs: int, lora: dict | None, queue) -> None:
    """One learner in its own process: build, train once, report pairs/s and peak RSS."""
    import torch

    torch.set_num_threads(1)
    from treeplay.learners.config import LoRAConfig
    from treeplay.learners.dpo import DPOLearner

    learner = DPOLearner(model_dir, num_threads=1, batch_size=8, lr=1e-4, reference="fixed",
                         lora=LoRAConfig(**lora) if lora else None)
    m = learner.train(make_pairs(pairs))
    trainable = sum(p.numel() for p in learner.policy.params)
    queue.put({"pairs_per_s": m["pairs_per_s"], "peak_rss_mb": _peak_rss_mb(),
               "trainable_params": trainable, "loss": m["loss"]})


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux keeps ru_maxrss across the exec that
    starts a spawned child, so it would report the parent's size at the fork."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_learner(model_dir: Path, pairs: int, lora: dict | None) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=learner_job, args=(str(model_dir), pairs, lora, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def redeploy_seconds(engine, state_dict, repeats: int) -> float:
    from treeplay.orchestrator.weights import from_payload, to_payload

    # One untimed load first: the engine's first adapter wraps its layers (once per engine, not per
    # redeploy), and the first full load pays allocator warm-up.
    payload = to_payload(engine.version + 1, state_dict())
    engine.load_weights(payload.version, from_payload(payload))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        payload = to_payload(engine.version + 1, state_dict())
        engine.load_weights(payload.version, from_payload(payload))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--vllm", action="store_true", help="also time redeploy on a vLLM engine")
    ap.add_argument("--model", help="an existing model directory instead of building one")
    a = ap.parse_args()
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    from treeplay.engines import make_engine
    from treeplay.engines.bpe import build_bpe_model, environment_corpus, parameter_count
    from treeplay.learners.config import LoRAConfig
    from treeplay.learners.dpo import DPOLearner

    lora = {"rank": a.rank, "alpha": 2.0 * a.rank}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(a.model) if a.model else build_bpe_model(
            Path(tmp) / "model", hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads,
            vocab_size=a.vocab, max_positions=1024, corpus=environment_corpus(tasks_per_env=500))
        params = parameter_count(model_dir) or 0
        print(f"lora bench: {params / 1e6:.1f}M parameters, rank {a.rank}, {a.pairs} pairs, 1 thread")
        result: dict = {"bench": "lora", "parameters": params, "rank": a.rank}

        full = DPOLearner(model_dir, num_threads=1)
        adapter = DPOLearner(model_dir, num_threads=1, lora=LoRAConfig(**lora))
        adapter.train(make_pairs(8))  # a trained (non-zero) adapter
        kinds = [("hf", {"num_threads": 1})]
        if a.vllm:
            kinds.append(("vllm", {"dtype": "float32", "max_model_len": 1024, "max_lora_rank": a.rank}))
        for kind, kwargs in kinds:
            engine = make_engine(kind, model_dir, **kwargs)
            t_full = redeploy_seconds(engine, full.state_dict, a.repeats)
            t_lora = redeploy_seconds(engine, adapter.state_dict, a.repeats)
            engine.close()
            suffix = "" if kind == "hf" else "_vllm"
            result[f"redeploy_full_ms{suffix}"] = 1e3 * t_full
            result[f"redeploy_lora_ms{suffix}"] = 1e3 * t_lora
            result[f"lora_redeploy_speedup{suffix}"] = t_full / t_lora
            print(f"{kind}: redeploy full {1e3 * t_full:.1f} ms, adapter {1e3 * t_lora:.1f} ms, "
                  f"speedup {t_full / t_lora:.1f}x")
        result["payload_full_mb"] = sum(v.numel() * v.element_size() for v in full.state_dict().values()) / 2**20
        result["payload_lora_mb"] = sum(v.numel() * v.element_size() for v in adapter.state_dict().values()) / 2**20
        del full, adapter

        for name, cfg in (("full", None), ("lora", lora)):
            r = run_learner(model_dir, a.pairs, cfg)
            result[f"peak_rss_mb_{name}"] = r["peak_rss_mb"]
            result[f"pairs_per_s_{name}"] = r["pairs_per_s"]
            result[f"trainable_params_{name}"] = r["trainable_params"]
            print(f"learner {name}: {r['pairs_per_s']:.2f} pairs/s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                  f"{r['trainable_params'] / 1e6:.2f}M trainable")
        result["rss_saving"] = result["peak_rss_mb_full"] / result["peak_rss_mb_lora"]
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}))


if __name__ == "__main__":
    main()
