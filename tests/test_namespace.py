"""Everything installs under the one import name ``treeplay`` (docs/architecture.md, "Layout").

The code stays in the repository's top-level folders (agents/, engines/, learners/, orchestrator/,
search/, store/); pyproject.toml's ``[tool.setuptools.package-dir]`` maps each to its
``treeplay.*`` name. So:

- the explicit package list in pyproject.toml is every folder holding an ``__init__.py`` under the
  mapped folders, no more, no less (a new subpackage left off the list would be missing from a
  wheel while a checkout still imports it);
- no Python file of the repository imports a folder by its bare name (``import agents``,
  ``from store.records import ...``) or relatively: once installed those names do not exist, and
  inside a checkout they would load a second copy of the module beside the ``treeplay.*`` one;
- an installed treeplay is importable as ``treeplay.*`` from any directory and does not make the
  generic names (``agents`` clashes with the OpenAI Agents SDK) importable.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("agents", "engines", "learners", "orchestrator", "search", "store")
# Folders that hold no source of the repository: virtual environments, build outputs, caches.
SKIPPED_DIRS = {"build", "dist", "node_modules", "__pycache__"}
# Calls that take a module path as a string argument.
MODULE_PATH_CALLS = {"import_module", "find_spec", "load_prompt", "files", "load_object", "make_environment"}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _package_folders(name: str, folder: Path) -> set[str]:
    """``name`` and the dotted name of every folder below ``folder`` that holds an ``__init__.py``."""
    found = set()
    for init in folder.rglob("__init__.py"):
        rel = init.parent.relative_to(folder)
        if SKIPPED_DIRS & set(rel.parts):
            continue
        found.add(".".join((name, *rel.parts)))
    return found


def test_the_package_list_is_every_folder_with_an_init_under_the_mapped_folders():
    setuptools = _pyproject()["tool"]["setuptools"]
    package_dir = setuptools["package-dir"]
    assert package_dir == {"treeplay": "treeplay", **{f"treeplay.{p}": p for p in SUBPACKAGES}}
    on_disk = set()
    for name, folder in package_dir.items():
        assert (ROOT / folder / "__init__.py").is_file(), f"{folder}/ is mapped to {name} but has no __init__.py"
        on_disk |= _package_folders(name, ROOT / folder)
    listed = setuptools["packages"]
    assert len(listed) == len(set(listed)), "a package is listed twice"
    assert set(listed) == on_disk, (
        f"missing from pyproject's packages: {sorted(on_disk - set(listed))}; "
        f"listed without a folder: {sorted(set(listed) - on_disk)}"
    )
    # A top-level folder with an __init__.py that is not mapped would not be installed at all.
    top = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert top - set(package_dir.values()) == {"tests"}


def test_treeplay_folder_holds_only_the_version():
    assert sorted(p.name for p in (ROOT / "treeplay").iterdir() if p.name != "__pycache__") == ["__init__.py"]
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "treeplay.__version__"}
    assert "version" in _pyproject()["project"]["dynamic"]


def test_entry_points_name_treeplay_modules():
    project = _pyproject()["project"]
    assert project["scripts"] == {"treeplay": "treeplay.orchestrator.cli:app"}
    for target in project["entry-points"]["treeplay.environments"].values():
        assert target.startswith("treeplay.agents.envs."), target


def _python_files() -> list[Path]:
    """Every .py file of the repository, not descending into hidden folders (.venv, .git), build
    outputs or caches."""
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not (d.startswith(".") or d in SKIPPED_DIRS or d.endswith(".egg-info"))]
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    return sorted(files)


def _bare(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in SUBPACKAGES


def _bad_imports(path: Path) -> list[str]:
    rel = path.relative_to(ROOT)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(rel))):
        if isinstance(node, ast.Import):
            found += [f"{rel}:{node.lineno}: import {a.name}" for a in node.names if _bare(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append(f"{rel}:{node.lineno}: relative import from {'.' * node.level}{node.module or ''}")
            elif _bare(node.module):
                found.append(f"{rel}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in MODULE_PATH_CALLS:
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and " " not in arg.value:
                        module = arg.value.partition(":")[0]
                        if _bare(module) and not module.endswith((".txt", ".yaml")):
                            found.append(f"{rel}:{node.lineno}: {name}({arg.value!r})")
    return found


def test_no_file_imports_a_folder_by_its_bare_name():
    files = _python_files()
    assert ROOT / "agents" / "registry.py" in files and ROOT / "tests" / "test_namespace.py" in files
    bad = [b for path in files for b in _bad_imports(path)]
    assert bad == [], "use the treeplay.* name:\n" + "\n".join(bad)


def test_the_import_check_catches_what_it_is_for(tmp_path, monkeypatch):
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent("""\
        import agents
        import store.database as database
        from orchestrator.engines import make_engine
        from learners import losses
        from .sibling import thing
        import importlib
        importlib.import_module("search.mcts")
        load_prompt("self_eval.txt", "search")
        import treeplay.agents
        from treeplay.store import queries
        from tests.helpers import postgres_server
        import searchlight
        load_prompt("rubric_verifier.txt")
    """), encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert [b.split(": ", 1)[0] for b in _bad_imports(probe)] == [f"probe.py:{n}" for n in (1, 2, 3, 4, 5, 7, 8)]


def test_installed_treeplay_imports_from_anywhere_and_leaves_the_generic_names_free(tmp_path):
    """From a directory outside the repository (so that neither the current directory nor pytest's
    sys.path reaches the folders): every ``treeplay.*`` package imports, and ``import agents`` (or
    any other folder's bare name) does not find ours."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = textwrap.dedent(f"""\
        import importlib, importlib.util, json, pathlib, sys
        root = pathlib.Path({str(ROOT)!r})
        if importlib.util.find_spec("treeplay") is None:
            print(json.dumps({{"installed": False}}))
            raise SystemExit
        import treeplay.agents, treeplay.store, treeplay.engines, treeplay.learners, treeplay.search
        import treeplay.orchestrator
        bare = {{}}
        for name in {SUBPACKAGES!r}:
            try:
                module = importlib.import_module(name)
            except ModuleNotFoundError as e:
                bare[name] = "ModuleNotFoundError: " + str(e)
            else:  # another distribution's package of that name (the OpenAI Agents SDK's agents) is fine
                origin = pathlib.Path(getattr(module, "__file__", None) or "/").resolve()
                venv = pathlib.Path(sys.prefix).resolve()  # a venv inside the repository holds theirs
                ours = origin.is_relative_to(root) and not origin.is_relative_to(venv)
                bare[name] = "ours: " + str(origin) if ours else "theirs"
        print(json.dumps({{"installed": True, "bare": bare, "version": treeplay.__version__,
                           "agents": treeplay.agents.__name__}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["installed"]:
        pytest.skip(f"treeplay is not installed in {sys.executable} (pip install -e . first)")
    assert result["agents"] == "treeplay.agents" and result["version"]
    # Not found, or the OpenAI Agents SDK's (the dev extra installs it beside treeplay).
    assert result["bare"]["agents"].startswith("ModuleNotFoundError") or result["bare"]["agents"] == "theirs"
    assert not [n for n, r in result["bare"].items() if r.startswith("ours")], result["bare"]
