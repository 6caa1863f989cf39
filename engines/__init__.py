"""Policy engines: language models behind the ``agents.base.Policy`` contract.

Two real engines implement the same contract (see docs/engines.md):

- ``hf``: ``HFEngine`` (engines/hf.py), transformers with a hand-written batched
  sampling loop: one prompt forward shared by the n samples, shared-prefix reuse for tree search.
- ``vllm``: ``VLLMEngine`` (engines/vllm.py), vLLM's ``LLM`` with prefix caching.

Use ``make_engine("hf" | "vllm", model_path, **kwargs)``. Importing this package is cheap: torch and
vllm load only when an engine is made. ``contract.py`` holds what both engines share, their
error (``EngineError``) included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ENGINE_KINDS = ("hf", "vllm")


def make_engine(kind: str, model_path: str | Path, **kwargs: Any):
    """Build a policy engine by name.

    Args:
        kind: "hf" or "vllm".
        model_path: A local Hugging Face model directory.
        **kwargs: Passed to the engine's constructor (``HFEngine`` or ``VLLMEngine``).

    Returns:
        An object implementing ``agents.base.Policy``.

    Raises:
        ValueError: ``kind`` is not a known engine.
    """
    if kind == "hf":
        from treeplay.engines.hf import HFEngine

        return HFEngine(model_path, **kwargs)
    if kind == "vllm":
        from treeplay.engines.vllm import VLLMEngine

        return VLLMEngine(model_path, **kwargs)
    raise ValueError(f"unknown engine kind {kind!r}; expected one of {', '.join(ENGINE_KINDS)}")


__all__ = ["ENGINE_KINDS", "make_engine"]
