"""``HFEngine``: a transformers model behind the Policy contract, with its own batched sampling loop.

Why not ``model.generate``: we need control over three things it does not give together.

1. The n samples of a prompt share ONE prompt forward: the prompt's KV cache is computed once and
   repeated n times, never recomputed.
2. Prompts that share a long token prefix (tree search: one task prompt, many partial paths) run the
   shared prefix once per group; its K/V stay one copy per group, and a custom attention function
   (``hf_kernels.shared_prefix_attention``) lets every member row attend to it with one batched matmul per
   group, so members only run, store and re-read their own suffixes. Explicit position ids and
   per-row masks keep every row's positions exact despite padding.
3. Per-token log-probs, stop strings and early exit: finished rows are dropped from the batch when
   that pays back its cache copy, and the loop ends when all rows are done.

Log-prob definition (shared with ``VLLMEngine``): each generated token's log-probability under the
model's raw next-token distribution, ``log_softmax(logits)`` at temperature 1, before temperature or
top-p. That is the policy's own probability of the token, what ``score`` returns for the same text
and what policy-gradient and DPO learners need; the sampling distribution differs when temperature
!= 1 or top_p < 1.

Usage:

    engine = HFEngine("runs/tiny-model", seed=0)
    out = engine.generate(["2+3="], n=4, max_tokens=8, stop=["\\n"])
    engine.score(["2+3="], ["5"])
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AttentionInterface

from treeplay.agents.base import Completion, Prompt, Scored, TokenIds
from treeplay.engines import hf_kernels
from treeplay.engines.contract import (
    EngineError,
    TokenMethods,
    check_context,
    check_model_dir,
    check_request,
    cut_at_stop,
    decode,
    encode_score_request,
    eos_token_ids,
    prompt_token_ids,
)
from treeplay.engines.contract import (
    scored as _scored,
)
from treeplay.engines.hf_kernels import (
    ATTENTION_NAME,
    AttentionPlan,
    preallocated_cache,
    sample_tokens,
    shared_prefix_attention,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFEngine(TokenMethods):
    """A transformers causal LM that samples and scores in batches.

    Args:
        model_path: Local Hugging Face model directory.
        device: torch device ("cpu", "cuda", "cuda:1").
        dtype: "float32", "bfloat16" or "float16"; None means float32 on CPU, bfloat16 on GPU.
        seed: Seeds the engine's sampling generator: the same seed and the same calls give the same
            outputs. A ``seed`` passed to ``generate`` overrides it for that call.
        num_threads: torch intra-op threads, set process-wide; None leaves torch's setting alone.
        max_batch_size: Most sequences (prompts x n) decoded together; larger requests run in chunks.
        prefix_reuse: Run a prefix shared by several prompts once (see the module docstring).
        min_shared_prefix: Shortest shared prefix, in tokens, worth its own forward.
        max_lora_rank: The largest LoRA rank ``load_weights`` accepts (None: any); vLLM needs it up
            front, so a run config may give it to either engine.
    """

    def __init__(
        self,
        model_path: str | Path,
        device: str = "cpu",
        dtype: str | None = None,
        seed: int = 0,
        num_threads: int | None = None,
        max_batch_size: int = 256,
        prefix_reuse: bool = True,
        min_shared_prefix: int = 16,
        max_lora_rank: int | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_path = check_model_dir(model_path)
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if dtype is None:
            dtype = "float32" if device == "cpu" else "bfloat16"
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        from treeplay.engines.lora import adapter_base, read_adapter

        try:
            base = adapter_base(self.model_path)  # a LoRA directory: its base, then the adapter
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)
            model = AutoModelForCausalLM.from_pretrained(
                base or self.model_path, dtype=_DTYPES[dtype], attn_implementation=ATTENTION_NAME
            )
        except Exception as e:  # transformers raises many types; one clear line is what callers need
            raise EngineError(f"could not load a model from {str(self.model_path)!r}: {e}") from e
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.max_len = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.eos_ids = eos_token_ids(base or self.model_path, self.tokenizer, model.config)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = next(iter(self.eos_ids), 0)
        self.max_batch_size = max_batch_size
        self.prefix_reuse = prefix_reuse
        self.min_shared_prefix = min_shared_prefix
        self.version = 0
        self.last_load_seconds = 0.0
        self._generator = torch.Generator(device="cpu").manual_seed(seed)
        self._eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=self.device)
        self._eos_cpu = self._eos.cpu()
        self._params = _live_tensors(self.model)
        self._adapter: tuple[int, list[str]] | None = None  # (rank, target modules) once injected
        self.max_lora_rank = max_lora_rank
        self._closed = False
        if base is not None:
            self.load_weights(0, read_adapter(self.model_path))

    # ---------------------------------------------------------------- Policy contract

    def generate(
        self,
        prompts: Sequence[Prompt],
        n: int = 1,
        max_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> list[list[Completion]]:
        """Sample ``n`` completions for each prompt.

        Args:
            prompts: Raw texts or chat-message lists.
            n: Samples per prompt.
            max_tokens: Most new tokens per sample.
            temperature: 0 is greedy.
            top_p: Nucleus sampling mass.
            stop: Strings that end a sample; the stop string is not part of the text.
            seed: Seeds this call alone (same seed, same request: same output).

        Returns:
            ``n`` completions per prompt, in prompt order. Log-probs are under the raw
            (temperature-1, unfiltered) distribution; see the module docstring.
        """
        self._check_open()
        check_request(len(prompts), n, max_tokens, temperature, top_p)
        ids = [prompt_token_ids(self.tokenizer, p) for p in prompts]
        check_context(ids, max_tokens, self.max_len, "max_tokens")
        gen = self._generator if seed is None else torch.Generator(device="cpu").manual_seed(seed)
        stops = [s for s in (stop or []) if s]
        results: list[list[Completion]] = [[] for _ in prompts]
        for chunk in self._chunks(self._groups(ids), n):
            self._generate_chunk(ids, chunk, n, max_tokens, temperature, top_p, stops, gen, results)
        return results

    def score(
        self,
        prompts: Sequence[Prompt],
        continuations: Sequence[str | TokenIds],
        action_spans: Sequence[Sequence[tuple[int, int]] | None] | None = None,
    ) -> list[Scored]:
        """Log-probability of each continuation after its prompt, by teacher forcing.

        Prompt and continuation are tokenized separately and their ids concatenated, as ``generate``
        produced them: ``score(p, TokenIds(c.token_ids))`` matches ``c.logprobs`` for a completion
        ``c`` of ``p``, and so does ``score(p, c.text)`` whenever re-tokenizing the text gives the
        sampled ids back (always with the char tokenizer; not always with BPE).

        Returns:
            One ``Scored`` per pair: the sum and the per-token log-probs of the continuation tokens.
        """
        self._check_open()
        p_ids, c_ids, masks = encode_score_request(self.tokenizer, prompts, continuations, action_spans)
        if not prompts:
            return []
        check_context(p_ids, [len(c) for c in c_ids], self.max_len, "continuation")
        out: list[Scored | None] = [None] * len(prompts)
        # Similar lengths together, so padding stays small.
        order = sorted(range(len(prompts)), key=lambda i: len(p_ids[i]) + len(c_ids[i]))
        for start in range(0, len(order), self.max_batch_size):
            batch = order[start : start + self.max_batch_size]
            for i, lps in zip(
                batch, self._score_batch([p_ids[i] for i in batch], [c_ids[i] for i in batch]), strict=True
            ):
                out[i] = _scored(lps, masks[i])
        return out  # type: ignore[return-value]

    def load_weights(self, version: int, state_dict: Mapping[str, Any]) -> None:
        """Copy new weights into the live parameters (no rebuild) and set ``version``.

        Args:
            version: The policy version these weights are.
            state_dict: Hugging Face parameter names (``model.layers.0.self_attn.q_proj.weight``...) to
                tensors; a subset is fine. A ``module.`` prefix (DDP) is stripped.

        A LoRA adapter (``engines.lora`` form: only ``<layer>.lora_A/B.weight`` names) is loaded as
        an adapter with peft: the first one wraps its layers (in place), later ones are copied into
        the same adapter tensors; the base weights stay as they are.

        Raises:
            ValueError: An unknown name or a shape that does not match (or an adapter of another
                rank or other layers than the one loaded before); nothing is copied then.
        """
        from treeplay.engines.lora import is_adapter

        self._check_open()
        t0 = time.perf_counter()
        if is_adapter(state_dict):
            state_dict = self._adapter_params(state_dict)
        pairs = []
        for name, value in state_dict.items():
            key = name.removeprefix("module.")
            key = self._aliases.get(key, key)
            if key not in self._params:
                raise ValueError(f"load_weights: {name!r} is not a parameter of this model")
            target = self._params[key]
            value = torch.as_tensor(value)
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"load_weights: {name!r} has shape {tuple(value.shape)}, the model has {tuple(target.shape)}"
                )
            pairs.append((target, value))
        with torch.no_grad():
            # One fused call instead of a Python loop of copy_ (matters for many small tensors).
            torch._foreach_copy_([t for t, _ in pairs], [v.to(t.device) for t, v in pairs])
        self.version = int(version)
        self.last_load_seconds = time.perf_counter() - t0

    _aliases: dict[str, str] = {}  # a base weight's name before peft wrapped its layer -> its name now

    def _adapter_params(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        """The adapter's tensors under this model's parameter names, injecting the adapter first."""
        from treeplay.engines.lora import adapter_shape, to_module_tensors

        rank, targets, _ = adapter_shape(tensors)
        if self.max_lora_rank is not None and rank > self.max_lora_rank:
            raise ValueError(f"load_weights: adapter rank {rank} is above max_lora_rank {self.max_lora_rank}")
        if self._adapter is None:
            from peft import LoraConfig, inject_adapter_in_model

            # alpha = rank: the sender folded the scale into lora_B.
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets,
                                               bias="none"), self.model)
            self.model.eval()
            self._adapter = (rank, targets)
            self._params = _live_tensors(self.model)
            self._aliases = {k.replace(".base_layer.", "."): k for k in self._params if ".base_layer." in k}
        elif self._adapter != (rank, targets):
            raise ValueError(f"load_weights: an adapter of rank {rank} on {targets} after one of rank "
                             f"{self._adapter[0]} on {self._adapter[1]}")
        return to_module_tensors(tensors, "default", 1.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the current weights (Hugging Face names), e.g. to restore after a test."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def close(self) -> None:
        """Drop the model; later calls raise EngineError."""
        self._closed = True
        self.model = None  # type: ignore[assignment]
        self._params = {}

    # ---------------------------------------------------------------- batching plan

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("engine is closed")

    def _groups(self, ids: list[list[int]]) -> list[tuple[int, list[int]]]:
        """Group prompts by shared token prefix: [(prefix_len, [prompt indices])].

        Sorted prompts put shared prefixes next to each other; a group's prefix is the common prefix
        of its first and last member (capped one short of the shortest member, so every member has a
        suffix token whose logits start sampling). A prompt alone forms a group whose "prefix" is all
        but its last token, which is a plain prompt forward.
        """
        order = sorted(range(len(ids)), key=lambda i: ids[i])
        groups: list[tuple[int, list[int]]] = []

        def shared(a: list[int], b: list[int]) -> int:
            k, m = 0, min(len(a), len(b)) - 1
            while k < m and a[k] == b[k]:
                k += 1
            return k

        for i in order:
            if groups and self.prefix_reuse:
                plen, members = groups[-1]
                # Sorted order: the prefix shared with the first member only shrinks along the group.
                s = min(shared(ids[members[0]], ids[i]), plen)
                if s >= self.min_shared_prefix:
                    groups[-1] = (s, members + [i])
                    continue
            groups.append((len(ids[i]) - 1, [i]))
        return groups

    def _chunks(self, groups: list[tuple[int, list[int]]], n: int):
        """Yield lists of groups whose rows (members x n) fit in max_batch_size."""
        per_chunk = max(1, self.max_batch_size // n)
        chunk: list[tuple[int, list[int]]] = []
        size = 0
        for plen, members in groups:
            for start in range(0, len(members), per_chunk):
                part = members[start : start + per_chunk]
                if size + len(part) > per_chunk and chunk:
                    yield chunk
                    chunk, size = [], 0
                chunk.append((plen, part))
                size += len(part)
        if chunk:
            yield chunk

    # ---------------------------------------------------------------- the sampling loop

    def _forward(self, input_ids, plan: AttentionPlan, positions, cache, logits_to_keep: int = 1):
        """One model forward whose attention follows ``plan`` (see ``hf_kernels.shared_prefix_attention``)."""
        hf_kernels.active.plan = plan
        try:
            return self.model(
                input_ids=input_ids,
                position_ids=positions,
                past_key_values=cache,
                use_cache=cache is not None,
                logits_to_keep=logits_to_keep,
            ).logits
        finally:
            hf_kernels.active.plan = None

    @torch.inference_mode()
    def _generate_chunk(self, ids, chunk, n, max_tokens, temperature, top_p, stops, gen, results) -> None:
        dev = self.device
        members = [i for _, m in chunk for i in m]
        prefix_len = [plen for plen, m in chunk]
        # Stage 1: each group's shared prefix once, left padded. Its K/V stay one copy per group.
        width = max(prefix_len)
        suffixes = [ids[i][prefix_len[g] :] for g, (_, m) in enumerate(chunk) for i in m]
        swidth = max(len(s) for s in suffixes)
        mask_a = torch.zeros(len(chunk), width, dtype=torch.bool)
        tok_a = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        for g, (plen, m) in enumerate(chunk):
            if plen:
                tok_a[g, width - plen :] = torch.tensor(ids[m[0]][:plen])
                mask_a[g, width - plen :] = True
        group_of = torch.tensor([g for g, (_, m) in enumerate(chunk) for _ in m], dtype=torch.long)
        prefix = None
        if width:
            prefix_cache = preallocated_cache(self.model.config, width)
            pos_a = (mask_a.long().cumsum(-1) - 1).clamp(min=0)
            self._forward(tok_a.to(dev), AttentionPlan(mask_a.to(dev)), pos_a.to(dev), prefix_cache)
            prefix = (
                [layer.keys for layer in prefix_cache.layers],
                [layer.values for layer in prefix_cache.layers],
                mask_a.to(dev),
            )
        # Stage 2: members run their own suffixes, attending to their group's prefix.
        cache = preallocated_cache(self.model.config, swidth + max_tokens)
        mask = torch.zeros(len(members), swidth, dtype=torch.bool)
        tok_b = torch.full((len(members), swidth), self.pad_id, dtype=torch.long)
        for r, s in enumerate(suffixes):
            tok_b[r, swidth - len(s) :] = torch.tensor(s)
            mask[r, swidth - len(s) :] = True
        start = torch.tensor([prefix_len[g] for g in group_of.tolist()], dtype=torch.long)
        pos_b = (start[:, None] + mask.long().cumsum(-1) - 1).clamp(min=0)
        mask, row_group = mask.to(dev), group_of.to(dev)
        logits = self._forward(tok_b.to(dev), AttentionPlan(mask, prefix, row_group), pos_b.to(dev), cache)[
            :, -1
        ]
        # Stage 3: the n samples of each prompt share its prompt forward: its own cache is repeated,
        # the group prefix is not copied at all.
        if n > 1:
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, dim=0)
            mask = mask.repeat_interleave(n, dim=0)
            row_group = row_group.repeat_interleave(n)
            pos_b = pos_b.repeat_interleave(n, dim=0)
        next_pos = pos_b[:, -1].to(dev) + 1
        rows = len(members) * n
        out_tok = torch.zeros(rows, max_tokens, dtype=torch.long)
        out_lp = torch.zeros(rows, max_tokens, dtype=torch.float32)
        length = torch.full((rows,), max_tokens, dtype=torch.long)
        finish = ["length"] * rows
        live = torch.arange(rows)  # original row of each batch row
        active = torch.ones(rows, dtype=torch.bool)  # batch rows still sampling
        window = max((len(s) for s in stops), default=0) + 1
        for t in range(max_tokens):
            # One uniform per original row each step: a row's draws do not depend on which other
            # rows are still running, so stop strings or EOS elsewhere never change its sample.
            uniform = torch.rand(rows, generator=gen)[live]
            tok, lp = sample_tokens(logits, temperature, top_p, uniform)
            tok_cpu, lp_cpu = tok.cpu(), lp.float().cpu()
            rec = live[active]
            out_tok[rec, t] = tok_cpu[active]
            out_lp[rec, t] = lp_cpu[active]
            if len(self._eos):
                eos = torch.isin(tok_cpu, self._eos_cpu) & active
                for r in torch.nonzero(eos).flatten().tolist():
                    length[live[r]] = t  # EOS is not part of the completion
                    finish[live[r]] = "eos"
                active &= ~eos
            cand = torch.nonzero(active).flatten().tolist() if stops else []
            if cand:  # batch_decode([]) returns [''], so never call it with no rows
                lo = max(0, t + 1 - window)
                tails = self.tokenizer.batch_decode(
                    out_tok[live[cand], lo : t + 1].tolist(),
                    skip_special_tokens=False,
                    clean_up_tokenization_spaces=False,
                )
                for r, tail in zip(cand, tails, strict=True):
                    if any(s in tail for s in stops):
                        active[r] = False
                        length[live[r]] = t + 1
                        finish[live[r]] = "stop"
            n_active = int(active.sum())
            if t == max_tokens - 1 or n_active == 0:
                break
            remaining = max_tokens - 1 - t
            if n_active <= 0.5 * len(live) or (n_active <= 0.75 * len(live) and remaining >= 16):
                # Each drop copies the whole cache, so drop finished rows only when enough of the
                # batch is done and enough steps remain for the smaller batch to pay that back.
                keep = torch.nonzero(active).flatten()
                keep_dev = keep.to(dev)
                cache.batch_select_indices(keep_dev)
                live, active = live[keep], active[keep]
                tok, mask, next_pos, row_group = (
                    tok[keep_dev],
                    mask[keep_dev],
                    next_pos[keep_dev],
                    row_group[keep_dev],
                )
            mask = torch.cat([mask, torch.ones(len(live), 1, dtype=torch.bool, device=dev)], dim=1)
            plan = AttentionPlan(mask, prefix, row_group)
            logits = self._forward(tok[:, None], plan, next_pos[:, None], cache)[:, -1]
            next_pos = next_pos + 1
        for r in range(rows):
            toks = out_tok[r, : length[r]].tolist()
            lps = out_lp[r, : length[r]].tolist()
            if finish[r] == "stop":
                text, toks, lps, _ = cut_at_stop(self.tokenizer, toks, lps, stops)
            else:
                text = decode(self.tokenizer, toks)
            results[members[r // n]].append(Completion(text, toks, lps, finish[r]))

    @torch.inference_mode()
    def _score_batch(self, p_ids: list[list[int]], c_ids: list[list[int]]) -> list[list[float]]:
        seqs = [p + c for p, c in zip(p_ids, c_ids, strict=True)]
        width = max(len(s) for s in seqs)
        keep = max(len(c) for c in c_ids)
        if keep == 0:
            return [[] for _ in seqs]
        tok = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.bool)
        for r, s in enumerate(seqs):
            tok[r, width - len(s) :] = torch.tensor(s)
            mask[r, width - len(s) :] = True
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        dev = self.device
        # Left padding puts every continuation at the right end: only those logits are needed.
        logits = self._forward(
            tok.to(dev), AttentionPlan(mask.to(dev)), pos.to(dev), None, logits_to_keep=keep + 1
        )
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        target = tok[:, width - keep :].to(dev)
        picked = logp.gather(-1, target[..., None]).squeeze(-1).cpu()
        return [picked[r, keep - len(c) :].tolist() for r, c in enumerate(c_ids)]


def _live_tensors(model) -> dict[str, torch.Tensor]:
    """Every name a state dict of ``model`` may use, mapped to the live tensor: parameters, buffers
    and tied aliases (a tied model's ``lm_head.weight`` is its embedding, and learners' state dicts
    carry both names)."""
    return dict(model.state_dict(keep_vars=True))
