"""Checkpoint I/O shared by the learners: the ``trainer/`` layout inside a checkpoint directory, the
process's RNG states, CPU copies of a training state, and writing a directory atomically.

``TrainablePolicy.training_state()`` (trainable.py) builds the state these save; ``LearnerOutput``
(base.py) writes it with the weights (``save_checkpoint``) and reads it back (``restore_checkpoint``);
the loop reads a checkpoint's summary with ``read_checkpoint_meta``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

# Inside a checkpoint directory (a Hugging Face model directory): what resuming training needs
# besides the weights. A subdirectory, so that engines loading the model never see it.
TRAINER_DIR = "trainer"
TRAINER_STATE = "state.pt"  # torch.save of training_state(), read back with weights_only=True
TRAINER_META = "meta.json"  # the small, human-readable part (counters, reference identity)
STATE_FORMAT = 1


def to_cpu(value: Any) -> Any:
    """A copy of a nest of dicts/lists/tuples with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return copy.deepcopy(value)


def rng_state() -> dict[str, Any]:
    """The process's RNG states (torch CPU, CUDA if in use, Python ``random``, numpy), loadable with
    ``torch.load(weights_only=True)``."""
    import numpy as np

    np_state = np.random.get_state(legacy=False)
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back ``rng_state()``'s output."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": n["bit_generator"],
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"],
        "gauss": n["gauss"],
    })
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_checkpoint_meta(path: str | Path) -> dict[str, Any] | None:
    """The ``trainer/meta.json`` of a checkpoint directory, or None when it holds weights only (a
    run's starting model, or a checkpoint written before training state was saved)."""
    meta = Path(path) / TRAINER_DIR / TRAINER_META
    if not meta.is_file():
        return None
    return json.loads(meta.read_text(encoding="utf-8"))


def write_directory_atomically(path: str | Path, write: Callable[[Path], None], replace: bool = False) -> Path:
    """Have ``write`` fill a temporary sibling directory, flush it to disk, then rename it to ``path``:
    a reader (or a resumed run) sees the whole directory or none of it.

    Args:
        replace: Replace a directory already at ``path`` (a checkpoint left by a crash between
            writing and recording it); otherwise an existing ``path`` is an error.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not replace:
        raise FileExistsError(f"'{out}' already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write(tmp)
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if out.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{out.name}.stale-", dir=out.parent))
            os.rename(out, stale / out.name)
            shutil.rmtree(stale)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)
    return out


def fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A short hash of the weights, to check that every worker runs the same ones."""
    h = hashlib.sha1()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
    return h.hexdigest()[:16]
