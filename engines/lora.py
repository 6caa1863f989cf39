"""LoRA adapters as they travel between a learner and the engines.

One form everywhere (the learner's ``state_dict()``, the redeploy payload, ``load_weights``): a
dict of tensors named ``<layer>.lora_A.weight`` (rank × in) and ``<layer>.lora_B.weight``
(out × rank) where ``<layer>`` is the Hugging Face name of the adapted linear layer
(``model.layers.0.self_attn.q_proj``) and the adapter's scale alpha/rank is already folded into
B. So an engine needs no config besides the tensors: the rank is A's first dimension, the target
layers are the names, and alpha equals the rank (scale 1).

On disk an adapter is a peft directory (``adapter_config.json`` + ``adapter_model.safetensors``,
keys ``base_model.model.<layer>.lora_A.weight``), which peft, transformers and vLLM load, plus the
base model's ``config.json`` and the tokenizer so that it also passes for a model directory; its
``base_model_name_or_path`` names the base. ``adapter_base`` tells whether a directory is one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def is_adapter(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state dict is an adapter in our form (every name ends in ``.lora_A/B.weight``)."""
    return bool(state_dict) and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state_dict)


def adapter_shape(state_dict: Mapping[str, Any]) -> tuple[int, list[str], list[str]]:
    """``(rank, target module names, adapted layers)`` of an adapter in our form.

    Raises:
        ValueError: A layer with only one of A and B, or ranks that differ between layers.
    """
    layers = sorted({k.rsplit(".lora_", 1)[0] for k in state_dict})
    ranks = set()
    for layer in layers:
        a, b = state_dict.get(f"{layer}.lora_A.weight"), state_dict.get(f"{layer}.lora_B.weight")
        if a is None or b is None:
            raise ValueError(f"adapter layer {layer!r} needs both lora_A and lora_B")
        ranks.add(int(a.shape[0]))
        if int(b.shape[1]) != int(a.shape[0]):
            raise ValueError(f"adapter layer {layer!r}: lora_B has rank {b.shape[1]}, lora_A {a.shape[0]}")
    if len(ranks) != 1:
        raise ValueError(f"adapter layers have different ranks {sorted(ranks)}")
    return ranks.pop(), sorted({layer.rsplit(".", 1)[-1] for layer in layers}), layers


def adapter_tensors(named_parameters: Mapping[str, Any], adapter: str, scale: float) -> dict[str, Any]:
    """Our form of a peft adapter named ``adapter`` in a model's parameters (CPU copies, scale folded)."""
    out = {}
    for name, p in named_parameters.items():
        for part in ("lora_A", "lora_B"):
            tag = f".{part}.{adapter}.weight"
            if name.endswith(tag):
                t = p.detach().to("cpu", copy=True)
                out[name[: -len(tag)] + f".{part}.weight"] = t * scale if part == "lora_B" else t
    return out


def to_module_tensors(tensors: Mapping[str, Any], adapter: str, scale: float) -> dict[str, Any]:
    """Our form back to a peft model's parameter names for ``adapter`` whose scale is ``scale``."""
    import torch

    out = {}
    for name, t in tensors.items():
        layer, part = name.rsplit(".lora_", 1)
        part = "lora_" + part.removesuffix(".weight")
        value = torch.as_tensor(t)
        out[f"{layer}.{part}.{adapter}.weight"] = value / scale if part == "lora_B" and scale != 1.0 else value
    return out


def adapter_base(path: str | Path) -> Path | None:
    """The base model a LoRA directory names, or None when ``path`` is not an adapter directory.

    Raises:
        ValueError: The adapter names a base that is not a model directory here.
    """
    cfg = Path(path) / ADAPTER_CONFIG
    if not cfg.is_file():
        return None
    base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise ValueError(f"the LoRA adapter in '{path}' names base model {base!r}, which is not a model directory here")
    return Path(base)


def read_adapter(path: str | Path) -> dict[str, Any]:
    """An adapter directory's tensors in our form (its alpha/rank folded into B)."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    scale = float(cfg.get("lora_alpha", cfg["r"])) / float(cfg["r"])
    out = {}
    for name, t in load_file(str(Path(path) / ADAPTER_WEIGHTS)).items():
        key = name.removeprefix(_PEFT_PREFIX)
        out[key] = t * scale if ".lora_B." in key else t
    return out


def write_adapter(out: str | Path, tensors: Mapping[str, Any], base: str | Path, model_config: Any = None) -> Path:
    """Write an adapter in our form as a peft directory (alpha = rank: the scale is in B).

    Args:
        out: Directory (created).
        tensors: The adapter, in our form.
        base: The base model directory, recorded as ``base_model_name_or_path`` (made absolute).
        model_config: The base's transformers config, written as ``config.json`` when given.
    """
    import torch
    from safetensors.torch import save_file

    rank, targets, _ = adapter_shape(tensors)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({_PEFT_PREFIX + k: torch.as_tensor(v).contiguous() for k, v in tensors.items()}, str(out / ADAPTER_WEIGHTS))
    (out / ADAPTER_CONFIG).write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "inference_mode": True,
        "base_model_name_or_path": str(Path(base).resolve()),
    }, indent=1) + "\n")
    if model_config is not None:
        model_config.save_pretrained(out)
    return out
