"""Versioned weights that travel once through Ray's object store and are applied in place.

A learner's ``state_dict`` becomes a ``WeightsPayload``: a version number plus a dict of numpy arrays.
Numpy arrays (not torch tensors) because Ray stores them in shared memory and hands every worker on a
node a zero-copy read-only view; the worker turns each view into a tensor without copying
(``torch.from_numpy``) and copies it straight into its live parameters. bfloat16 has no numpy dtype,
so it travels as int16 bits and is viewed back.

Nothing here imports Ray: the loop ``ray.put``s the payload once and passes the reference to every
worker (``orchestrator/workers.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class WeightsPayload:
    """One version of the policy's weights, ready for the object store."""

    version: int
    arrays: dict[str, np.ndarray]
    dtypes: dict[str, str]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def to_payload(version: int, state_dict: Mapping[str, torch.Tensor]) -> WeightsPayload:
    """Pack a state dict (any device/dtype) into numpy arrays on the CPU."""
    arrays, dtypes = {}, {}
    for name, t in state_dict.items():
        t = t.detach().to("cpu").contiguous()
        dtypes[name] = str(t.dtype).removeprefix("torch.")
        arrays[name] = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    return WeightsPayload(version=version, arrays=arrays, dtypes=dtypes)


def from_payload(payload: WeightsPayload) -> dict[str, torch.Tensor]:
    """Tensors viewing the payload's arrays (no copy). Read-only: copy them into parameters."""
    out = {}
    with warnings.catch_warnings():
        # Object-store arrays are read-only; we only ever read them (copy_ into parameters).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, arr in payload.arrays.items():
            t = torch.from_numpy(arr)
            if payload.dtypes[name] == "bfloat16":
                t = t.view(torch.bfloat16)
            out[name] = t
    return out


