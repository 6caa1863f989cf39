"""The BPE model's optional splits before merging (``model.tiny.pretokenizer: qwen2 | llama3``).

transformers 5 loads the tokenizer of a qwen2-architecture directory with Qwen2's own split, whatever
split it was saved with; a tokenizer trained with that split therefore encodes after loading exactly
as it did when trained, and keeps digits one token each (what lets a tiny model copy numbers from an
observation into a calculation, configs/react.yaml).
"""

from __future__ import annotations

import pytest

from treeplay.engines.bpe import build_bpe_model, train_bpe_tokenizer

CORPUS = ["Duia: population 28392; area 923\nsearch[Duia]\ncalculate[28392+923]\n47+38=85\n"] * 100


def test_a_qwen2_model_loads_its_tokenizer_as_trained(tmp_path):
    from transformers import AutoTokenizer

    trained = train_bpe_tokenizer(CORPUS, 300, pretokenizer="qwen2")
    path = build_bpe_model(tmp_path / "m", "qwen2", 32, 1, 2, vocab_size=300, tokenizer=trained)
    loaded = AutoTokenizer.from_pretrained(path)
    text = "Iren: population 5748; area 305\ncalculate[5748//305]\nanswer[18]\n"
    assert loaded(text, add_special_tokens=False).input_ids == trained(text, add_special_tokens=False).input_ids
    pieces = loaded.tokenize("calculate[28392+923]\n")
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("28392") + list("923")


def test_an_unknown_pretokenizer_is_one_line():
    with pytest.raises(ValueError, match="pretokenizer must be one of none, qwen2, llama3, got 'gpt2'"):
        train_bpe_tokenizer(CORPUS, 300, pretokenizer="gpt2")


def test_a_llama_model_loads_the_llama3_split_and_numbers_copy_as_the_same_tokens(tmp_path):
    from transformers import AutoTokenizer

    trained = train_bpe_tokenizer(CORPUS, 300, pretokenizer="llama3")
    loaded = AutoTokenizer.from_pretrained(build_bpe_model(tmp_path / "m", "llama", 32, 1, 2, tokenizer=trained))
    page, action = "Duia: population 28392; area 923\n", "calculate[28392+923]\n"
    assert loaded(page + action).input_ids == trained(page + action, add_special_tokens=False).input_ids

    def number(text: str, n: str) -> list[str]:
        pieces = loaded.tokenize(text)
        i = next(k for k in range(len(pieces)) if "".join(pieces[k:]).startswith(n))
        return pieces[i : i + 2]

    assert number(page, "28392") == number(action, "28392") == ["283", "92"]
