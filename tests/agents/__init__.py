"""Tests of the agents package: environments, episodes, ReAct, panels and credit, the plug-in registry."""
