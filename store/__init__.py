"""The one source of truth: a SQL store (SQLite by default, PostgreSQL by URL) behind a small API.

The rest of treeplay talks to it through ``store.queries`` with the plain records in
``store.records``; it knows rows, not models."""
