"""Prompt files of the search package: plain-text templates that search.mcts reads by path."""
