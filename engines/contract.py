"""What both engines share so they agree token for token: prompt tokenization, request checks, stops.

Both engines tokenize here (vLLM receives token ids, never text), so a prompt is the same ids in
either engine, and ``score`` sees exactly the ids ``generate`` saw:

- raw text: ``tokenizer(text)`` with the tokenizer's special tokens (a BOS where it adds one);
- chat messages: the chat template rendered with ``add_generation_prompt=True``, then tokenized
  without adding special tokens again (templates write their own BOS);
- a continuation: tokenized on its own without special tokens and appended to the prompt ids;
  ``action_token_mask`` marks which of its tokens the policy wrote when the continuation also holds
  environment text (the learners use the same function, so engines and learners agree on the mask);
- ``agents.base.TokenIds``, as a prompt or a continuation: those ids as they are. With a merging
  tokenizer text does not pin down its tokens (a sampled "4" "6" decodes to the text whose own
  tokenization is "46"; a merge may span a prompt's end and a step's start), so search and the
  learners pass the ids the engine generated instead of text (``align_ids`` turns a sampled
  completion into ids of exactly the text kept of it).

Decoding keeps special tokens (``skip_special_tokens=False``) so that ``score(prompt, text)`` re-reads
exactly the tokens that were sampled; EOS is never part of a completion's ids or text.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from treeplay.agents.base import Scored, TokenIds


class EngineError(RuntimeError):
    """An engine could not be built or stopped working (bad model directory, dead worker process)."""


def check_model_dir(model_path: str | Path) -> Path:
    """Return ``model_path`` as a Path, or raise if it is not a Hugging Face model directory.

    Raises:
        EngineError: No directory, or no config.json in it.
    """
    path = Path(model_path)
    if not path.is_dir():
        raise EngineError(f"model path {str(path)!r} is not a directory (engines load local models only)")
    if not (path / "config.json").is_file():
        raise EngineError(f"model path {str(path)!r} is not a model: it has no config.json")
    return path


def prompt_token_ids(tokenizer: Any, prompt: str | list[dict[str, str]] | TokenIds) -> list[int]:
    """Token ids of one prompt (raw text, chat messages rendered with the chat template, or ids).

    Raises:
        ValueError: Chat messages for a tokenizer without a chat template, a prompt of another
            type, ids outside the vocabulary, or a prompt that tokenizes to nothing and the
            tokenizer has no BOS to stand in.
    """
    if isinstance(prompt, TokenIds):
        ids = check_token_ids(tokenizer, prompt.ids, "prompt")
    elif isinstance(prompt, str):
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    elif isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat-message prompt given but the tokenizer has no chat template; pass text")
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        raise ValueError(f"a prompt must be a str or a list of chat messages, got {type(prompt).__name__}")
    if not ids:
        if tokenizer.bos_token_id is None:
            raise ValueError("empty prompt and the tokenizer has no BOS token to start from")
        ids = [tokenizer.bos_token_id]
    return ids


def continuation_token_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a continuation, tokenized on its own (no special tokens added)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_token_ids(tokenizer: Any, ids: Sequence[int], what: str) -> list[int]:
    """``ids`` as a list, or a one-line ValueError if one is not a token of ``tokenizer``."""
    out = [int(i) for i in ids]
    size = len(tokenizer)
    bad = next((i for i in out if not 0 <= i < size), None)
    if bad is not None:
        raise ValueError(f"{what} token id {bad} is outside the tokenizer's vocabulary of {size}")
    return out


def align_ids(tokenizer: Any, sampled: Sequence[int], text: str) -> list[int]:
    """Token ids that decode to exactly ``text``, keeping as many of the ``sampled`` ids as possible.

    ``text`` is what a caller kept of a sampled completion (cut before a stop string, stripped, with
    the stop's newline put back). The longest run of leading sampled ids whose decoded text is a
    prefix of ``text`` is kept as sampled; the rest of ``text`` (the characters of a token that
    straddled the stop string, a newline) is tokenized on its own. With a character tokenizer
    this is the sampled ids plus the added characters.
    """
    kept, pos = 0, 0
    for i in range(1, len(sampled) + 1):
        piece = decode(tokenizer, sampled[:i])
        if not text.startswith(piece):
            break
        kept, pos = i, len(piece)
    return [int(t) for t in sampled[:kept]] + (continuation_token_ids(tokenizer, text[pos:]) if pos < len(text) else [])


def encode_continuation(
    tokenizer: Any, continuation: str | TokenIds, spans: Sequence[tuple[int, int]] | None
) -> tuple[list[int], list[bool] | None]:
    """A ``score`` continuation's ids and policy mask: text through ``action_token_mask``, ids as given.

    The mask is None when neither spans nor a ``TokenIds`` mask say which tokens are the policy's.

    Raises:
        ValueError: Action spans given with ``TokenIds`` (ids carry their own mask), or bad ids.
    """
    if isinstance(continuation, TokenIds):
        if spans is not None:
            raise ValueError("a TokenIds continuation carries its own mask; action spans are for text")
        ids = check_token_ids(tokenizer, continuation.ids, "continuation")
        return ids, None if continuation.mask is None else list(continuation.mask)
    ids, mask = action_token_mask(tokenizer, continuation, spans)
    return ids, mask if spans is not None else None


def encode_score_request(
    tokenizer: Any,
    prompts: Sequence[Any],
    continuations: Sequence[Any],
    action_spans: Sequence[Sequence[tuple[int, int]] | None] | None,
) -> tuple[list[list[int]], list[list[int]], list[list[bool] | None]]:
    """Both engines' ``score`` inputs: prompt ids, continuation ids and policy masks, checked.

    Raises:
        ValueError: Lengths that do not match, or a bad prompt or continuation.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"score() got {len(prompts)} prompts but {len(continuations)} continuations")
    if action_spans is not None and len(action_spans) != len(continuations):
        raise ValueError(f"score() got {len(action_spans)} action spans for {len(continuations)} continuations")
    p_ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    encoded = [
        encode_continuation(tokenizer, c, None if action_spans is None else action_spans[i])
        for i, c in enumerate(continuations)
    ]
    return p_ids, [ids for ids, _ in encoded], [mask for _, mask in encoded]


def action_token_mask(
    tokenizer: Any, text: str, spans: Sequence[tuple[int, int]] | None
) -> tuple[list[int], list[bool]]:
    """A continuation's token ids (as ``continuation_token_ids``) and which of them the policy wrote.

    A token counts as the policy's when its characters lie inside one of ``spans`` (character
    ``[start, end)`` offsets into ``text``: the actions); every other token (an observation, tool
    output, or a merged token that straddles an action and an observation) is context only. With
    ``spans=None`` every token is the policy's.

    Raises:
        ValueError: Spans given for a tokenizer that cannot report character offsets (a slow one).
    """
    if spans is None:
        ids = continuation_token_ids(tokenizer, text)
        return ids, [True] * len(ids)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"action spans need a fast tokenizer that reports character offsets; {type(tokenizer).__name__} does not"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = []
    for begin, end in enc["offset_mapping"]:
        # A zero-width token (rare: added markers) belongs where it sits.
        mask.append(any(s <= begin and (end <= e if end > begin else begin < e) for s, e in spans))
    return ids, mask


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """Decode ids faithfully: special tokens kept, no space clean-up."""
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def eos_token_ids(model_dir: Path, tokenizer: Any, config: Any) -> set[int]:
    """Every id that ends a completion: the tokenizer's EOS, the config's and generation config's."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    gen_cfg = model_dir / "generation_config.json"
    if gen_cfg.is_file():
        import json

        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(i) for i in eos)
    return ids


def check_request(num_prompts: int, n: int, max_tokens: int, temperature: float, top_p: float) -> None:
    """Reject a generate request that cannot mean anything.

    Raises:
        ValueError: One line naming the bad argument.
    """
    if num_prompts == 0:
        raise ValueError("generate() got an empty prompt list")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def check_context(ids: Sequence[Sequence[int]], extra: int | Sequence[int], max_len: int, what: str) -> None:
    """Raise if any prompt plus ``extra`` tokens does not fit in the model's context.

    Args:
        ids: Prompt token ids.
        extra: Tokens to be added per prompt (max_tokens for generate, continuation lengths for score).
        max_len: The model's context length.
        what: "max_tokens" or "continuation", for the message.

    Raises:
        ValueError: Naming the first prompt that does not fit.
    """
    for i, p in enumerate(ids):
        e = extra if isinstance(extra, int) else extra[i]
        if len(p) + e > max_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens + {what} {e} = {len(p) + e} > the model's context {max_len}"
            )


def cut_at_stop(
    tokenizer: Any, ids: list[int], logprobs: list[float], stop: Sequence[str]
) -> tuple[str, list[int], list[float], bool]:
    """Cut a completion before the first stop string.

    The text ends just before the stop string. The ids kept are the longest run of leading tokens
    whose decoded text is a prefix of that text: with a character tokenizer exactly the text; with
    merges, a token that straddles the stop string is dropped (its characters before the stop stay in
    ``text``).

    Returns:
        (text, ids, logprobs, stopped) where ``stopped`` says whether a stop string was found.
    """
    text = decode(tokenizer, ids)
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    if cut < 0:
        return text, ids, logprobs, False
    text = text[:cut]
    # Largest k with decode(ids[:k]) a prefix of text: decoded length grows with k, so bisect.
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(decode(tokenizer, ids[:mid])) and len(decode(tokenizer, ids[:mid])) <= len(text):
            lo = mid
        else:
            hi = mid - 1
    return text, ids[:lo], logprobs[:lo], True


def scored(token_logprobs: list[float], mask: list[bool] | None) -> Scored:
    """A ``Scored`` whose total sums the policy's tokens (all of them when ``mask`` is None)."""
    if mask is None:
        return Scored(total=float(sum(token_logprobs)), token_logprobs=token_logprobs)
    total = float(sum(lp for lp, mine in zip(token_logprobs, mask, strict=True) if mine))
    return Scored(total=total, token_logprobs=token_logprobs, action_mask=list(mask))


class TokenMethods:
    """What both engines offer callers that keep token ids (search; see ``agents.base.TokenIds``).

    Needs ``self.tokenizer``. A caller that finds ``encode`` on a policy may prompt it with ids.
    """

    tokenizer: Any

    def encode(self, text: str, prompt: bool = False) -> list[int]:
        """Token ids of ``text``: as a prompt (``prompt_token_ids``) or as a continuation (alone)."""
        return prompt_token_ids(self.tokenizer, text) if prompt else continuation_token_ids(self.tokenizer, text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens kept (``decode``)."""
        return decode(self.tokenizer, ids)

    def align(self, sampled: Sequence[int], text: str) -> list[int]:
        """Ids of exactly ``text``, keeping the sampled ids that spell its start (``align_ids``)."""
        return align_ids(self.tokenizer, sampled, text)
