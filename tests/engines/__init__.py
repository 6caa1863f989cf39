"""Tests of treeplay.engines: the engine contract suite, BPE tokens."""
