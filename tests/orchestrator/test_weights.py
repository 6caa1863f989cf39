"""Weights payloads: exact round trips (fp32 and bf16), zero-copy views, fingerprints."""

from __future__ import annotations

import numpy as np
import torch

from treeplay.learners.checkpoints import fingerprint
from treeplay.orchestrator.weights import from_payload, to_payload


def test_round_trip_is_exact_for_fp32_and_bf16():
    sd = {"a": torch.randn(4, 3), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(6)}
    p = to_payload(7, sd)
    assert p.version == 7
    assert all(isinstance(a, np.ndarray) for a in p.arrays.values())
    back = from_payload(p)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype
        assert torch.equal(back[k], v)
    assert fingerprint(back) == fingerprint(sd)


def test_from_payload_views_do_not_copy():
    p = to_payload(1, {"w": torch.ones(1000)})
    t = from_payload(p)["w"]
    assert t.data_ptr() == p.arrays["w"].__array_interface__["data"][0]


def test_fingerprint_changes_with_any_weight():
    sd = {"w": torch.zeros(3)}
    f0 = fingerprint(sd)
    sd["w"][1] = 1e-6
    assert fingerprint(sd) != f0

