"""Pairs exported by ``treeplay export pairs --format trl-jsonl`` load with ``datasets`` and train one
step of TRL's DPOTrainer (the tiny real model, on CPU)."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from tests.inspector.inspect_store import build_inspect_store
from treeplay.orchestrator.cli import app


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model_dir):
    return build_inspect_store(tmp_path_factory.mktemp("inspect"), tiny_model_dir)


def test_exported_jsonl_trains_one_dpo_step(data, tiny_model_dir, tmp_path):
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    out = tmp_path / "pairs.jsonl"
    args = ["export", "pairs", data.run_name, "--format", "trl-jsonl", "--out", str(out), "--db", data.url]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    dataset = load_dataset("json", data_files=str(out), split="train")
    assert dataset.column_names == ["prompt", "chosen", "rejected"] and len(dataset) >= 4

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to=[],
        logging_strategy="no",
        save_strategy="no",
        dataset_num_proc=None,
        max_length=256,
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    stats = trainer.train()
    assert stats.global_step == 1 and math.isfinite(stats.training_loss)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(moved) == len(before)  # one optimiser step touched every parameter
