"""Tests of the store package, on SQLite and PostgreSQL."""
