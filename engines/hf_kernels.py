"""The parts of ``HFEngine``'s sampling loop that work below the engine, on tensors and the model's
layers: the attention function that lets rows share their group's prefix (``shared_prefix_attention``,
with the ``AttentionPlan`` each forward follows), a KV cache that writes into buffers sized for the
whole request (``preallocated_cache``), and the sampler (``sample_tokens``). hf.py registers the
attention function with transformers and drives all three; nothing else uses them.
"""

from __future__ import annotations

import threading

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

ATTENTION_NAME = "treeplay_shared_prefix"


class AttentionPlan:
    """What the attention of one forward may see, set by the engine around each forward.

    Keys come in two parts. The row's own keys (the KV cache of this forward: suffix and generated
    tokens, or everything when there is no shared prefix) are masked by ``own_mask`` [rows, keys]
    (padding) and causally. Optionally, each row also attends to its group's shared prefix, kept
    ONCE per group: ``prefix = (keys per layer, values per layer, mask [groups, prefix_len])`` and
    ``row_group`` [rows] names each row's group. Rows of a group must be contiguous.
    """

    def __init__(self, own_mask: torch.Tensor, prefix=None, row_group: torch.Tensor | None = None) -> None:
        self.own_mask = own_mask
        self.prefix = prefix
        self.row_group = row_group
        if prefix is not None:
            groups = prefix[2].shape[0]
            counts = torch.bincount(row_group, minlength=groups)
            starts = counts.cumsum(0) - counts
            self.row_slot = torch.arange(len(row_group), device=row_group.device) - starts[row_group]
            self.slots = int(counts.max())


# The plan of the forward running on this thread: ``HFEngine`` sets it around each forward.
active = threading.local()


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over [group prefix | own keys] without copying the prefix to every row.

    Registered with transformers as the model's attention function. The prefix part is one batched
    matmul per group (rows of a group padded to the same count), so a prefix shared by many rows is
    read once, not once per row; the two parts share one softmax.
    """
    plan: AttentionPlan | None = getattr(active, "plan", None)
    if plan is None:  # the model called outside the engine: plain causal attention
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=query.shape[2] > 1
        )
    rows, heads, q_len, dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    x = heads // kv_heads * q_len  # the query heads sharing a KV head fold into the query axis
    qf = query.reshape(rows, kv_heads, x, dim)
    scale = scaling if scaling is not None else dim**-0.5
    low = torch.finfo(torch.float32).min  # finite: a fully masked (padding) query gives no NaN
    own_mask = plan.own_mask[:, None, None, -n_keys:]
    if q_len > 1:
        q_pos = torch.arange(n_keys - q_len, n_keys, device=query.device)
        causal = torch.arange(n_keys, device=query.device)[None, :] <= q_pos[:, None]
        own_mask = own_mask & causal.repeat(heads // kv_heads, 1)
    scores = (qf @ key.transpose(-1, -2)).float() * scale
    if plan.prefix is None:
        probs = scores.masked_fill(~own_mask, low).softmax(-1).to(value.dtype)
        out = probs @ value
    else:
        pk, pv, pmask = plan.prefix[0][module.layer_idx], plan.prefix[1][module.layer_idx], plan.prefix[2]
        groups, n_prefix = pk.shape[0], pk.shape[2]
        g, slot, m = plan.row_group, plan.row_slot, plan.slots

        def to_groups(t: torch.Tensor) -> torch.Tensor:  # [rows, kvh, x, c] -> [groups, kvh, m*x, c]
            padded = t.new_zeros(groups, m, *t.shape[1:])
            padded[g, slot] = t
            return padded.transpose(1, 2).reshape(groups, kv_heads, m * x, t.shape[-1])

        def to_rows(t: torch.Tensor) -> torch.Tensor:  # [groups, kvh, m*x, c] -> [rows, kvh, x, c]
            return t.view(groups, kv_heads, m, x, t.shape[-1]).transpose(1, 2)[g, slot]

        prefix_scores = to_rows(to_groups(qf) @ pk.transpose(-1, -2)).float() * scale
        mask = torch.cat(
            [pmask[g][:, None, None, :].expand(rows, 1, x, n_prefix), own_mask.expand(rows, 1, x, n_keys)], -1
        )
        probs = torch.cat([prefix_scores, scores], -1).masked_fill(~mask, low).softmax(-1).to(value.dtype)
        out = to_rows(to_groups(probs[..., :n_prefix].contiguous()) @ pv) + probs[..., n_prefix:] @ value
    return out.reshape(rows, heads, q_len, dim).transpose(1, 2).contiguous(), None


class PreallocatedLayer(DynamicLayer):
    """A KV cache layer that writes into a buffer sized for the whole request.

    ``DynamicLayer`` concatenates on every step, copying the whole cache each token; here a step
    writes one column in place and attention reads a view of the filled part.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self._k = key_states.new_empty(b, h, self.capacity, d)
        self._v = value_states.new_empty(b, value_states.shape[1], self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def _regather(self, rows: torch.Tensor) -> None:
        # Copy only the filled part into fresh buffers.
        k = self._k.new_empty(len(rows), *self._k.shape[1:])
        v = self._v.new_empty(len(rows), *self._v.shape[1:])
        k[:, :, : self.length] = self._k[rows, :, : self.length]
        v[:, :, : self.length] = self._v[rows, :, : self.length]
        self._k, self._v = k, v
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            rows = torch.arange(self._k.shape[0], device=self._k.device).repeat_interleave(repeats)
            self._regather(rows)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._regather(indices)


def preallocated_cache(config, capacity: int):
    """A ``DynamicCache`` whose layers are ``PreallocatedLayer``s of ``capacity`` positions."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(capacity) for _ in range(config.get_text_config().num_hidden_layers)]
    return cache


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, uniform: torch.Tensor):
    """Pick one token per row by inverse CDF on ``uniform``; return it and its raw log-prob."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    if temperature == 0:
        tok = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest set of top tokens whose mass reaches top_p (always the first).
            sorted_p[(sorted_p.cumsum(-1) - sorted_p) >= top_p] = 0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        cdf = probs.cumsum(dim=-1)
        target = uniform.to(cdf.device)[:, None] * cdf[:, -1:]
        # side="right" never lands on a zero-probability token (its CDF step is flat).
        tok = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)
