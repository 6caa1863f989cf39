"""Tests of the search package: MCTS, trees, preference pairs."""
