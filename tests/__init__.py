"""The test suite: one folder per package (agents, search, store, learners, engines, inspector,
orchestrator), shared fixtures in conftest.py, non-test helpers in helpers/."""
