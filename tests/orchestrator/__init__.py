"""Tests of the orchestrator: config, rollouts, workers, the loop, whole runs, studies, clusters."""
