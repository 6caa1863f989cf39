"""Per-token log-probs of responses given prompts, with prefix sharing, for every learner.

Preference data repeats context: chosen and rejected share the prompt (and, for step-level pairs,
often a prefix of the response); a ranked list shares it across K responses. Instead of running
the model once per (prompt, response) sequence, we build one row per *group*:

    [ trunk: prompt + common response prefix ][ branch 1 ][ branch 2 ] ... [ pad ]

with a 4D attention mask in which a branch token attends causally to the trunk and to earlier
tokens of its own branch only, and position ids that restart after the trunk for every branch
(the layout of "Accelerating Direct Preference Optimization with Prefix Sharing", Wang & Hegde
2024). A branch then sees exactly what it would see in its own sequence, so its log-probs equal
the unshared ones, while the trunk is computed once. Rows are padded only to the longest row of
the micro-batch. The language-model head runs only on the positions that predict scored tokens.

Tokenization matches the engines' ``score()``: the prompt and each response are tokenized
separately (the prompt with the tokenizer's special tokens, the response without) and
concatenated; an EOS is appended to a response only when the caller says it is final. A record
whose ``info["tokens"]`` holds the ids the policy was prompted with and generated (search run
token in, token out) is not re-tokenized: ``record_tokens`` hands those ids over, after checking
that they spell the record's text in this tokenizer. With a merging (BPE) tokenizer that is the
only way to score a step in the context it was generated in.

The action mask: a response may hold text the policy did not write (an agent's tool output or an
environment's observation between its actions). A group then carries a per-token mask; unmasked
tokens stay in the row as context (later tokens attend to them) but are never scored, so no
log-prob, sum, length or gradient target includes them. The mask comes from the response's action
spans through ``engines.contract.action_token_mask``, the function the engines' ``score`` uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from treeplay.engines.contract import action_token_mask, decode


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt (with the tokenizer's own special tokens, e.g. BOS)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_masked_response(
    tokenizer, text: str, spans: Sequence[tuple[int, int]] | None, eos: bool = False
) -> tuple[list[int], list[bool]]:
    """Token ids of a response and which of them the policy wrote (its ``spans``; None = all).

    ``eos`` appends the EOS id, marked as the policy's (stopping is its decision).
    """
    ids, mask = action_token_mask(tokenizer, text, spans)
    if eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        mask.append(True)
    return ids, mask


@dataclass
class RecordTokens:
    """A record's ids from ``info["tokens"]``: the prompt's, and per response its ids, policy mask
    and the token spans the policy wrote (one per run of its steps)."""

    prompt: list[int]
    responses: list[list[int]]
    masks: list[list[bool]]
    spans: list[list[tuple[int, int]]]


def record_tokens(tokenizer, prompt: str, texts: Sequence[str], info: dict | None) -> RecordTokens | None:
    """The token ids a record carries for its prompt and ``texts``, or None to tokenize the text.

    None when the record has no ``info["tokens"]``, or when its ids do not decode to exactly the
    record's prompt and texts in ``tokenizer`` (ids written with another tokenizer, or a record whose
    text was edited after the search): the text is then the truth, and re-tokenizing it is right.
    """
    tokens = (info or {}).get("tokens")
    if not isinstance(tokens, dict):
        return None
    try:
        p_ids = [int(t) for t in tokens["prompt"]]
        responses = [[int(t) for t in r] for r in tokens["responses"]]
        spans = [[(int(a), int(b)) for a, b in sp] for sp in tokens["spans"]]
    except (KeyError, TypeError, ValueError):
        return None
    size = len(tokenizer)
    if len(responses) != len(texts) or len(spans) != len(texts) or not p_ids:
        return None
    if any(not 0 <= t < size for ids in [p_ids, *responses] for t in ids):
        return None
    if decode(tokenizer, p_ids) != prompt or any(
        decode(tokenizer, r) != t for r, t in zip(responses, texts, strict=True)
    ):
        return None
    masks = []
    for ids, sp in zip(responses, spans, strict=True):
        mask = [False] * len(ids)
        for a, b in sp:
            if not 0 <= a <= b <= len(ids):
                return None
            mask[a:b] = [True] * (b - a)
        masks.append(mask)
    return RecordTokens(p_ids, responses, masks, spans)


def token_offsets(tokenizer, ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character ``[start, end)`` of each token in ``decode(ids)`` (by decoding growing prefixes)."""
    out, pos = [], 0
    for i in range(len(ids)):
        end = len(decode(tokenizer, ids[: i + 1]))
        out.append((pos, max(pos, end)))
        pos = max(pos, end)
    return out


def fit_length(
    prompt: list[int], responses: Sequence[list[int]], max_length: int
) -> tuple[list[int], list[list[int]]]:
    """Truncate so that prompt + the longest response fits ``max_length`` tokens.

    Responses are cut at the right to at most ``max_length - 1`` tokens; then the prompt loses
    tokens from the left (its end, next to the response, is what matters most) down to one token.
    """
    responses = [list(r[: max_length - 1]) for r in responses]
    longest = max((len(r) for r in responses), default=0)
    room = max(1, max_length - longest)
    return list(prompt[-room:]), responses


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token sequences (0 for fewer than two)."""
    if len(seqs) < 2:
        return 0
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


@dataclass
class Group:
    """One packed row: a prompt and the responses that share it.

    Attributes:
        prompt: Prompt token ids (at least one token: the first response token needs a predictor).
        responses: Response token ids, one list per response (may repeat; each gets its own entry).
        share_responses: Also move the responses' common prefix into the trunk.
        masks: Per response, per token: scored (the policy wrote it) or context only. None = all
            scored.
    """

    prompt: list[int]
    responses: list[list[int]]
    share_responses: bool = True
    masks: list[list[bool]] | None = None


@dataclass
class PackedBatch:
    """Tensors for one forward pass over packed groups, and where each response's tokens landed.

    Attributes:
        input_ids: ``(R, L)`` token ids, one row per group.
        position_ids: ``(R, L)`` positions (restarting after the trunk for each branch).
        segments: ``(R, L)`` segment id of each position: 0 trunk, b+1 branch b, -1 padding.
        pred_index: ``(U,)`` flat index (row * L + position) of the hidden state predicting each
            unique scored token.
        token_index: ``(U,)`` flat index of the scored token itself (for step embeddings).
        target_ids: ``(U,)`` the scored tokens.
        seq_tokens: For every response (groups in order, responses in order), the indices into
            the ``U`` unique tokens of its scored tokens (the policy's), in order.
    """

    input_ids: Tensor
    position_ids: Tensor
    segments: Tensor
    pred_index: Tensor
    token_index: Tensor
    target_ids: Tensor
    seq_tokens: list[list[int]] = field(default_factory=list)

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.seq_tokens]

    def attention_mask(self, dtype: torch.dtype) -> Tensor:
        """``(R, 1, L, L)`` additive mask: 0 where a query may attend to a key, dtype-min elsewhere."""
        seg = self.segments
        length = seg.shape[1]
        q, k = seg[:, :, None], seg[:, None, :]
        causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
        allowed = causal & ((k == 0) | (k == q)) & (q >= 0) & (k >= 0)
        # Padding queries attend to themselves, so no softmax row is empty (which gives NaN).
        allowed |= torch.eye(length, dtype=torch.bool, device=seg.device)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(
            self.input_ids.to(device),
            self.position_ids.to(device),
            self.segments.to(device),
            self.pred_index.to(device),
            self.token_index.to(device),
            self.target_ids.to(device),
            self.seq_tokens,
        )

    def gather(
        self, spans: Sequence[tuple[int, int]] | None = None, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor]:
        """Index tensors that pick each response's tokens out of a ``(U,)`` tensor.

        Args:
            device: Where to put the index tensors.
            spans: ``(response index, first token)`` per output; default every response from 0.

        Returns:
            ``(index, owner)``: ``token_values[index]`` lists the chosen tokens, ``owner`` says which
            output each belongs to (for ``index_add``).
        """
        if spans is None:
            spans = [(i, 0) for i in range(len(self.seq_tokens))]
        idx: list[int] = []
        own: list[int] = []
        for o, (s, start) in enumerate(spans):
            toks = self.seq_tokens[s][start:]
            idx.extend(toks)
            own.extend([o] * len(toks))
        return (
            torch.tensor(idx, dtype=torch.long, device=device),
            torch.tensor(own, dtype=torch.long, device=device),
        )


def pack(groups: Sequence[Group], pad_id: int) -> PackedBatch:
    """Lay groups out as rows of trunk + branches (see the module docstring).

    Args:
        groups: The groups of one micro-batch.
        pad_id: Token id used for padding (never attended to, never scored).

    Returns:
        A PackedBatch on the CPU.
    """
    rows: list[list[int]] = []
    positions: list[list[int]] = []
    segments: list[list[int]] = []
    seq_tokens: list[list[int]] = []
    unique_pred: list[tuple[int, int]] = []
    unique_tok: list[tuple[int, int]] = []
    targets: list[int] = []
    for r, g in enumerate(groups):
        if not g.prompt:
            raise ValueError(
                "a prompt must have at least one token (the first response token needs a predictor)"
            )
        masks = g.masks if g.masks is not None else [[True] * len(resp) for resp in g.responses]
        if len(masks) != len(g.responses) or any(
            len(m) != len(resp) for m, resp in zip(masks, g.responses, strict=True)
        ):
            raise ValueError("a group's masks must give one flag per response token")
        # The trunk holds the tokens the responses share, scored or not alike.
        keyed = [list(zip(resp, m, strict=True)) for resp, m in zip(g.responses, masks, strict=True)]
        shared = common_prefix_length(keyed) if g.share_responses and len(g.responses) > 1 else 0
        trunk = g.prompt + g.responses[0][:shared] if shared else list(g.prompt)
        ids, pos, seg = list(trunk), list(range(len(trunk))), [0] * len(trunk)
        trunk_scored = []
        for p in range(len(g.prompt), len(trunk)):
            if not masks[0][p - len(g.prompt)]:
                continue
            trunk_scored.append(len(targets))
            unique_pred.append((r, p - 1))
            unique_tok.append((r, p))
            targets.append(trunk[p])
        for b, resp in enumerate(g.responses):
            branch = resp[shared:]
            start = len(ids)
            mine = list(trunk_scored)
            for j, t in enumerate(branch):
                if not masks[b][shared + j]:
                    continue
                mine.append(len(targets))
                unique_pred.append((r, start + j - 1 if j else len(trunk) - 1))
                unique_tok.append((r, start + j))
                targets.append(t)
            ids.extend(branch)
            pos.extend(range(len(trunk), len(trunk) + len(branch)))
            seg.extend([b + 1] * len(branch))
            seq_tokens.append(mine)
        rows.append(ids)
        positions.append(pos)
        segments.append(seg)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    seg_t = torch.full((len(rows), length), -1, dtype=torch.long)
    for r, (ids, pos, seg) in enumerate(zip(rows, positions, segments, strict=True)):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        position_ids[r, : len(pos)] = torch.tensor(pos)
        seg_t[r, : len(seg)] = torch.tensor(seg)

    def flat(pairs: list[tuple[int, int]]) -> Tensor:
        return torch.tensor([r * length + p for r, p in pairs], dtype=torch.long)

    return PackedBatch(
        input_ids,
        position_ids,
        seg_t,
        flat(unique_pred),
        flat(unique_tok),
        torch.tensor(targets, dtype=torch.long),
        seq_tokens,
    )


@dataclass
class TokenLogprobs:
    """Output of ``packed_logprobs``: log-probs of the unique scored tokens of a PackedBatch.

    Attributes:
        values: ``(U,)`` float32 log-probs.
        hidden: ``(U, H)`` last-layer hidden state at each scored token's own position, if asked.
    """

    values: Tensor
    hidden: Tensor | None = None


def _decoder_and_head(model):
    base = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if base is None or head is None:
        raise TypeError(f"{type(model).__name__} does not expose a decoder and an output head")
    return base, head


def packed_logprobs(
    model, batch: PackedBatch, with_hidden: bool = False, temperature: float = 1.0
) -> TokenLogprobs:
    """Run the model once over a PackedBatch and return the log-probs of its scored tokens.

    Gradients flow if the caller has them enabled. Works for decoder-only Hugging Face models
    whose logits are ``lm_head(last_hidden_state)`` (Llama, Qwen, Mistral, ...); models that
    post-process logits (soft-capping, logit scales) are not handled.

    Args:
        model: A ``*ForCausalLM`` model.
        batch: The packed batch, on the model's device.
        with_hidden: Also return the last hidden state at each scored token.
        temperature: Divide the logits by this first: the log-probs of the distribution the tokens
            were sampled from when they were sampled at that temperature (SLHF's REINFORCE term).

    Returns:
        TokenLogprobs.
    """
    base, head = _decoder_and_head(model)
    dtype = next(model.parameters()).dtype
    out = base(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask(dtype),
        position_ids=batch.position_ids,
        use_cache=False,
    )
    hidden = out.last_hidden_state.flatten(0, 1)
    logits = head(hidden.index_select(0, batch.pred_index)).float()
    if temperature != 1.0:
        logits = logits / temperature
    values = logits.gather(1, batch.target_ids[:, None]).squeeze(1) - logits.logsumexp(-1)
    tok_hidden = hidden.index_select(0, batch.token_index) if with_hidden else None
    return TokenLogprobs(values, tok_hidden)


def sequence_sums(
    batch: PackedBatch, token_values: Tensor, spans: Sequence[tuple[int, int]] | None = None
) -> Tensor:
    """Sum ``token_values`` over each response's tokens (from a start token, per span).

    Args:
        batch: The PackedBatch the values came from.
        token_values: ``(U,)`` per-unique-token values (log-probs, log-ratios, ...).
        spans: ``(response index, first token)`` per output; default every response from 0.

    Returns:
        ``(len(spans),)`` sums.
    """
    n = len(spans) if spans is not None else len(batch.seq_tokens)
    index, owner = batch.gather(spans, token_values.device)
    return torch.zeros(n, dtype=token_values.dtype, device=token_values.device).index_add(
        0, owner, token_values.index_select(0, index)
    )


def per_sequence(batch: PackedBatch, token_values: Tensor) -> list[Tensor]:
    """Split ``(U,)`` values into one 1D tensor per response, in token order."""
    index, _ = batch.gather(device=token_values.device)
    return list(token_values.index_select(0, index).split(batch.lengths))


def padded(seqs: Sequence[Tensor], pad: float = 0.0) -> tuple[Tensor, Tensor]:
    """Stack 1D tensors into ``(B, T)`` right-padded values and a float mask."""
    values = torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=pad)
    lengths = torch.tensor([len(s) for s in seqs], device=values.device)
    mask = (torch.arange(values.shape[1], device=values.device)[None, :] < lengths[:, None]).float()
    return values, mask


