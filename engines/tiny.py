"""Tiny models made on the spot: a character-level tokenizer and a small random-init Llama.

There is no model hub here (tests, CI, the demo): we build a real Hugging Face model directory that
both engines (transformers and vLLM) load like any other checkpoint. Run it directly to make one:

    python -m treeplay.engines.tiny runs/tiny-model --hidden 128 --layers 4
"""

from __future__ import annotations

import json
import string
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# Printable ASCII plus newline: enough for arithmetic, tool calls and rubric text.
CHARS = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
# A plain chat template; every character of it is in the vocabulary.
CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def char_tokenizer():
    """A character-level fast tokenizer (one token per character, no merges).

    Returns:
        transformers.PreTrainedTokenizerFast with pad/bos/eos/unk set and a chat template.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *CHARS])}
    # BPE with an empty merge list and no pre-tokenizer splits text into single characters.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()
    core.add_special_tokens([PAD, BOS, EOS, UNK])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(
    path: str | Path,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    seed: int = 0,
) -> Path:
    """Write a random-init Llama and the char tokenizer to ``path`` as a Hugging Face directory.

    Args:
        path: Output directory (created).
        hidden_size: Model width; the head dimension is hidden_size // num_heads.
        num_layers: Transformer blocks.
        num_heads: Attention heads (key/value heads equal; no GQA at this size).
        intermediate_size: MLP width; defaults to 4 * hidden_size.
        max_positions: Context length (prompt + completion, in characters).
        seed: torch seed for the random init, so the same arguments give the same weights.

    Returns:
        The directory, loadable by ``AutoModelForCausalLM`` and by vLLM.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "treeplay-tiny.json").write_text(
        json.dumps({"hidden_size": hidden_size, "num_layers": num_layers, "seed": seed}) + "\n"
    )
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(build_tiny_model(a.path, a.hidden, a.layers, a.heads, seed=a.seed))
