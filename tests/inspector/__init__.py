"""Tests of the inspector (orchestrator.inspector and orchestrator.web): API, CLI, browser, TRL export."""
