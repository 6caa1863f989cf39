"""treeplay: agentic self-improvement of language models (tree search, peer panels, credit
re-assignment and iterative preference learning on Ray).

Everything the project ships is importable under this one name: ``treeplay.agents``,
``treeplay.search``, ``treeplay.store``, ``treeplay.orchestrator``, ``treeplay.engines`` and
``treeplay.learners``. Their code lives in top-level folders of the repository (``agents/``,
``search/``, ...), mapped under ``treeplay`` by ``[tool.setuptools.package-dir]`` in
pyproject.toml (docs/architecture.md says why). This folder holds only the version.
"""

__version__ = "0.1.0"
