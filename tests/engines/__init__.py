"""Tests of orchestrator.engines: the engine contract suite, BPE tokens."""
