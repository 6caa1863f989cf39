"""The import picture of the packages: no circles, and light modules stay light.

Every ``import`` of a ``treeplay`` module counts, also those inside functions (a lazy import hides a
circle from the interpreter, not from a reader): the graph of module -> imported module has no
cycle. A module that imports a package's submodule through the package (``from treeplay.engines
import hf_kernels``) counts as importing the submodule. Imports under ``if TYPE_CHECKING:`` count
too, as a circle of types is still a circle.

Loading and checking a run's config (``treeplay.orchestrator.config``) imports no torch,
transformers or Ray, so ``treeplay run --help``-style checks and config validation stay fast.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agents", "engines", "learners", "orchestrator", "search", "store", "treeplay")


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) if parts[0] == "treeplay" else ".".join(["treeplay", *parts])


def _exists(module: str) -> bool:
    parts = module.split(".")[1:]
    if not parts:
        return True
    base = ROOT / "treeplay" if parts[0] == "treeplay" else ROOT.joinpath(*parts)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def import_graph(root: Path = ROOT) -> nx.DiGraph:
    graph = nx.DiGraph()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            source = _module_of(path)
            graph.add_node(source)
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("treeplay"):
                    for alias in node.names:
                        child = f"{node.module}.{alias.name}"
                        graph.add_edge(source, child if _exists(child) else node.module)
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.startswith("treeplay"):
                            graph.add_edge(source, alias.name)
    graph.remove_edges_from(nx.selfloop_edges(graph))
    return graph


def test_no_module_imports_itself_back_through_others():
    cycles = sorted(nx.simple_cycles(import_graph()), key=len)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_the_circle_check_sees_lazy_imports(tmp_path):
    """A circle closed by an import inside a function is found (what the check is for)."""
    graph = import_graph()
    graph.add_edge("treeplay.search.state", "treeplay.search.mcts")  # as a lazy import would add
    assert any("treeplay.search.mcts" in c and "treeplay.search.state" in c for c in nx.simple_cycles(graph))


def test_loading_a_config_imports_no_torch_transformers_or_ray(tmp_path):
    code = (
        "import sys\n"
        "from treeplay.orchestrator.config import load_config\n"
        "load_config('configs/demo.yaml', ['learner.algorithm=slhf'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'ray', 'vllm') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"loading a config imported {out.stdout.strip()}"


def test_only_the_orchestrator_imports_the_orchestrator():
    """The runtime sits on top: agents, engines, learners, search and store never import it (not
    even inside a function), so each can be used, and tested, without the loop, Ray or the CLI."""
    graph = import_graph()
    upward = sorted((a, b) for a, b in graph.edges
                    if b.startswith("treeplay.orchestrator") and not a.startswith("treeplay.orchestrator"))
    assert not upward, upward
