"""No credential reaches the store: the redaction rule (store/redact.py), ``start_run`` on both
backends, the migration that cleans rows written before the rule, and ``resume_config``."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
import sqlalchemy as sa

from treeplay.orchestrator.config import ConfigError, RunConfig, load_config, resume_config
from treeplay.store import queries
from treeplay.store.database import head_revision, open_store, upgrade
from treeplay.store.redact import REDACTED, is_secret_key, redact, redact_url, redacted_keys

SECRET = "Sup3rSecretPw"


def _config_with_secrets(url: str) -> dict:
    cfg = RunConfig().model_dump(mode="json")
    cfg["store"]["url"] = url
    cfg["env"]["kwargs"] = {"ops": 1, "api_key": f"sk-{SECRET}", "endpoint": f"https://bot:{SECRET}@api.example/v1"}
    cfg["engine"]["kwargs"] = {"HF_TOKEN": f"hf_{SECRET}", "pad_token": "<pad>", "max_tokens": 7, "password": None}
    return cfg


@pytest.mark.parametrize(
    ("url", "clean"),
    [
        (f"postgresql://tp:{SECRET}@db:5432/treeplay", "postgresql://tp@db:5432/treeplay"),
        (f"postgresql+psycopg://tp:{SECRET}@db/treeplay", "postgresql+psycopg://tp@db/treeplay"),
        # SQLAlchemy takes everything up to the "@" as the password, unescaped "/" and "?" included
        (f"postgresql://tp:a/b?{SECRET}@db/treeplay", "postgresql://tp@db/treeplay"),
        (f"postgresql://:{SECRET}@db/treeplay", "postgresql://db/treeplay"),
        (f"postgresql://tp@db/treeplay?sslpassword={SECRET}&application_name=x", "postgresql://tp@db/treeplay?application_name=x"),
        (f"postgresql://tp@db/treeplay?password={SECRET}", "postgresql://tp@db/treeplay"),
        (f"https://u:{SECRET}@h.example/p?api_key={SECRET}&q=1#frag", "https://u@h.example/p?q=1#frag"),
        ("https://h.example:8080/x?mail=a@b", "https://h.example:8080/x?mail=a@b"),  # no userinfo: unchanged
        ("sqlite:///runs/treeplay.db", "sqlite:///runs/treeplay.db"),
        ("user:pw@not-a-url", "user:pw@not-a-url"),
    ],
)
def test_redact_url(url, clean):
    assert redact_url(url) == clean
    assert redact_url(clean) == clean


def test_secret_keys_by_name_but_not_tokenizer_settings():
    secret = ["api_key", "OPENAI_API_KEY", "apiKey", "hf_token", "HFToken", "token", "password", "db_passwd",
              "sslpassword", "client_secret", "aws_secret_access_key", "aws_access_key_id", "Authorization",
              "cookie", "private_key", "credentials"]
    plain = ["pad_token", "eos_token_id", "max_tokens", "max_new_tokens", "max_step_tokens", "tokenizer",
             "key", "auth_mode", "url", "name", "num_tokens"]
    assert [k for k in secret if not is_secret_key(k)] == []
    assert [k for k in plain if is_secret_key(k)] == []


def test_redact_keeps_shape_and_every_run_config_key():
    defaults = RunConfig().model_dump(mode="json")
    assert redact(defaults) == defaults  # no default setting looks like a credential
    cfg = _config_with_secrets(f"postgresql://tp:{SECRET}@db/treeplay")
    clean = redact(cfg)
    assert SECRET not in json.dumps(clean)
    assert clean["store"]["url"] == "postgresql://tp@db/treeplay"
    assert clean["env"]["kwargs"] == {"ops": 1, "api_key": REDACTED, "endpoint": "https://bot@api.example/v1"}
    assert clean["engine"]["kwargs"] == {"HF_TOKEN": REDACTED, "pad_token": "<pad>", "max_tokens": 7, "password": None}
    assert sorted(redacted_keys(clean)) == ["engine.kwargs.HF_TOKEN", "env.kwargs.api_key"]
    assert redact(clean) == clean


def _dump_text(store) -> str:
    """Every row of every table of the store as text (what someone with read access could see)."""
    out = []
    with store.read() as conn:
        for table in sa.inspect(conn).get_table_names():
            for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')):
                out.append(repr(tuple(row)))
    return "\n".join(out)


def test_regression_start_run_stores_no_credentials(store_url):
    with open_store(store_url) as store:
        run_id = queries.start_run(store, "r", _config_with_secrets(f"postgresql://tp:{SECRET}@db/treeplay"))
        stored = queries.get_run(store, run_id).config
        assert stored["store"]["url"] == "postgresql://tp@db/treeplay"
        assert stored["env"]["kwargs"]["api_key"] == REDACTED
        assert SECRET not in _dump_text(store)


def test_regression_migration_removes_credentials_from_existing_runs(store_url):
    """A store written before the rule (schema 0001) holds passwords; upgrading removes them."""
    assert upgrade(store_url, "0001_initial") == "0001_initial"
    dirty = _config_with_secrets(f"postgresql://tp:{SECRET}@db/treeplay")
    runs = sa.table("runs", sa.column("name", sa.String), sa.column("config", sa.JSON),
                    sa.column("status", sa.String), sa.column("created", sa.DateTime))
    engine = sa.create_engine(store_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.execute(sa.insert(runs), [
            {"name": "old", "config": dirty, "status": "done", "created": datetime(2026, 1, 1)},
            {"name": "clean", "config": {"tasks": 3}, "status": "done", "created": datetime(2026, 1, 1)},
        ])
    engine.dispose()
    assert upgrade(store_url) == head_revision()
    with open_store(store_url, create=False) as store:
        assert SECRET not in _dump_text(store)
        old = queries.get_run(store, "old").config
        assert old == redact(dirty) and old["store"]["url"] == "postgresql://tp@db/treeplay"
        assert queries.get_run(store, "clean").config == {"tasks": 3}


def test_resume_config_takes_the_store_url_and_redacted_values_given_again():
    stored = redact(load_config(None, ["env.kwargs.api_key=sk-1", f"store.url=postgresql://tp:{SECRET}@db/t"])
                    .model_dump(mode="json"))
    url = f"postgresql://tp:{SECRET}@db2/t"
    cfg = resume_config(stored, url, ["env.kwargs.api_key=sk-2"])
    assert cfg.store.url == url and cfg.env.kwargs["api_key"] == "sk-2"
    with pytest.raises(ConfigError, match=r"stored with env.kwargs.api_key redacted; give it again: "
                                          r"treeplay resume RUN env.kwargs.api_key=\.\.\.$"):
        resume_config(stored, url)
    with pytest.raises(ConfigError, match="override 'iterations': a resumed run keeps its stored config"):
        resume_config(stored, url, ["env.kwargs.api_key=sk-2", "iterations=99"])
    with pytest.raises(ConfigError, match="override 'store.url'"):
        resume_config(stored, url, ["env.kwargs.api_key=sk-2", "store.url=sqlite:///x.db"])


def test_config_errors_do_not_echo_credentials():
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"store=postgresql://tp:{SECRET}@db/t"])
    assert SECRET not in str(e.value) and "postgresql://tp@db/t" in str(e.value)
