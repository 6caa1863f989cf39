"""Benchmark: our DPO learner vs TRL's DPOTrainer on the same tiny model and pairs; TPO and SLHF steps/s.

    .venv/bin/python bench/learners.py [--pairs 512] [--batch 16] [--threads 1] [--repeats 2]

Setup (same process, same model, same data, same settings for both): a random-init Llama with the
char tokenizer (hidden 256, 4 layers), 512 pairs, each a ~100-token prompt shared by a ~40-token
chosen and a ~40-token rejected response, batch 16, lr 1e-4, beta 0.1, fp32, no gradient
checkpointing, sigmoid DPO without the NLL term (TRL's default loss), EOS appended by both.
One epoch is timed (TRL: ``trainer.train()`` after the trainer and its dataset are built; ours:
``learner.train()`` including tokenization). Loss equality: both take one update on the same 16
pairs from the same weights, then both losses on those pairs are compared (at the very first
step both are log 2 exactly, since policy = reference).

Human-readable lines first; the LAST stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from treeplay.engines.tiny import build_tiny_model
from treeplay.learners.config import DPOConfig
from treeplay.learners.dpo import DPOLearner
from treeplay.store.records import PairRecord, PreferenceData, RankedItem, RankedListRecord

WORDS = "alpha beta gamma delta step carry add sum total digit left right check answer so then".split()


def text(rng: random.Random, n: int) -> str:
    out = ""
    while len(out) < n:
        out += rng.choice(WORDS) + " "
    return out[:n]


def make_pairs(n: int, seed: int = 0) -> list[PairRecord]:
    rng = random.Random(seed)
    return [
        PairRecord(
            prompt=f"Q{i}: " + text(rng, 95),
            chosen=text(rng, rng.randint(36, 44)),
            rejected=text(rng, rng.randint(36, 44)),
            info={"final": True},
        )
        for i in range(n)
    ]


def trl_trainer(model_dir: Path, pairs: list[PairRecord], args_ns, out_dir: str, max_steps: int = -1):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = TRLConfig(
        output_dir=out_dir,
        beta=args_ns.beta,
        learning_rate=args_ns.lr,
        per_device_train_batch_size=args_ns.batch,
        num_train_epochs=1,
        max_steps=max_steps,
        bf16=False,
        gradient_checkpointing=False,
        max_length=None,
        report_to=[],
        use_cpu=True,
        logging_strategy="no",
        save_strategy="no",
        lr_scheduler_type="constant",
        dataloader_num_workers=0,
        seed=0,
    )
    data = Dataset.from_list(
        [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    )
    return DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=data, processing_class=tok)


def ours(model_dir: Path, args_ns) -> DPOLearner:
    return DPOLearner(
        model_dir,
        DPOConfig(
            lr=args_ns.lr,
            beta=args_ns.beta,
            batch_size=args_ns.batch,
            nll_weight=0.0,
            dtype="float32",
            max_length=1024,
            verify_at_end=False,
        ),
    )


def bench_dpo(model_dir: Path, pairs: list[PairRecord], a, tmp: str) -> dict:
    trl_rates, our_rates = [], []
    for r in range(a.repeats):
        trainer = trl_trainer(model_dir, pairs, a, f"{tmp}/trl{r}")
        t0 = time.perf_counter()
        trainer.train()
        trl_rates.append(len(pairs) / (time.perf_counter() - t0))
        learner = ours(model_dir, a)
        m = learner.train(PreferenceData(pairs=pairs))
        our_rates.append(m["pairs_per_s"])
        print(f"  repeat {r}: TRL {trl_rates[-1]:.1f} pairs/s, ours {our_rates[-1]:.1f} pairs/s")

    # Loss equality: one update on the same 16 pairs from the same weights, then both losses.
    few = pairs[: a.batch]
    trainer = trl_trainer(model_dir, few, a, f"{tmp}/trl-eq", max_steps=1)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_first = trainer.compute_loss(trainer.model, batch).item()
    trainer.train()
    with torch.no_grad():
        trl_after = trainer.compute_loss(trainer.model, batch).item()
    learner = ours(model_dir, a)
    first = learner.evaluate(few)["pair_loss"]
    learner.train(few)
    after = learner.evaluate(few)["pair_loss"]
    print(
        f"  first-step loss: TRL {trl_first:.6f} ours {first:.6f}; after one update: TRL {trl_after:.6f} ours {after:.6f}"
    )
    return {
        "pairs_per_s_trl": statistics.median(trl_rates),
        "pairs_per_s_ours": statistics.median(our_rates),
        "loss_diff_first_step": max(abs(trl_first - first), abs(trl_after - after)),
    }


def bench_tpo(model_dir: Path, a) -> float:
    from treeplay.learners.config import TPOConfig
    from treeplay.learners.tpo import TPOLearner

    rng = random.Random(1)
    lists = []
    for i in range(64):
        prompt = f"Q{i}: " + text(rng, 95)
        gold = [text(rng, 12) + "\n" for _ in range(4)]
        items = [RankedItem("".join(gold), 100.0)]
        for k in range(4):
            cut = rng.randint(1, 3)
            items.append(
                RankedItem("".join(gold[:cut] + [text(rng, 12) + "\n" for _ in range(4 - cut)]), 90 - 20 * k)
            )
        lists.append(RankedListRecord(prompt=prompt, items=items))
    learner = TPOLearner(model_dir, TPOConfig(lr=a.lr, batch_size=4, dtype="float32", verify_at_end=False))
    m = learner.train(PreferenceData(ranked_lists=lists))
    print(f"  TPO: {m['updates']:.0f} updates of 4 lists x 5 responses in {m['seconds']:.2f}s")
    return m["updates"] / m["seconds"]


def bench_slhf(model_dir: Path, a) -> float:
    from treeplay.learners.config import SLHFConfig
    from treeplay.learners.slhf import SLHFLearner

    rng = random.Random(2)
    prompts = [f"Q{i}: " + text(rng, 60) for i in range(32)]

    def oracle(prompt: str, x: str, y: str) -> float:
        return 0.5 + 0.5 * ((x.count("a") > y.count("a")) - (x.count("a") < y.count("a")))

    learner = SLHFLearner(
        model_dir,
        oracle,
        SLHFConfig(lr=a.lr, batch_size=8, max_new_tokens=32, dtype="float32", verify_at_end=False),
    )
    m = learner.train(prompts, steps=4)
    print(
        f"  SLHF: {m['updates']:.0f} steps of 8 prompts (sample leader+follower, 32 tokens, update) in {m['seconds']:.2f}s"
    )
    return m["updates"] / m["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only-dpo", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(
            Path(tmp) / "model", hidden_size=256, num_layers=4, num_heads=4, max_positions=512
        )
        pairs = make_pairs(a.pairs)
        print(
            f"learners bench: hidden 256, 4 layers, {a.pairs} pairs, batch {a.batch}, {a.threads} thread(s)"
        )
        result = {"bench": "learners"}
        result.update(bench_dpo(model_dir, pairs, a, tmp))
        result["ratio"] = result["pairs_per_s_ours"] / result["pairs_per_s_trl"]
        print(
            f"DPO: TRL {result['pairs_per_s_trl']:.1f} pairs/s, ours {result['pairs_per_s_ours']:.1f} pairs/s, ratio {result['ratio']:.2f}"
        )
        if not a.only_dpo:
            result["tpo_steps_per_s"] = bench_tpo(model_dir, a)
            result["slhf_steps_per_s"] = bench_slhf(model_dir, a)
    print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in result.items()}))


if __name__ == "__main__":
    main()
