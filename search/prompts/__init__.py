"""Prompt files of the search package (data, read with ``importlib.resources``-free path lookups)."""
