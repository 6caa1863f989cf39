"""The docs stand on their own: nothing points outside the repository, and what they show runs.

- No tracked file names a file that a clone does not have: no notes kept beside the repository,
  no relative path that climbs out of it, no `docs/*.md` that does not exist, no broken relative
  link in a Markdown file.
- docs/environments.md: its YAML config loads as a ``RunConfig`` and makes the environment it
  names; its Python snippets run (with the example plug-in importable and a real scripted policy);
  its entry-point declaration is valid TOML in the group the registry reads.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV_DOC = ROOT / "docs" / "environments.md"
EXAMPLE_DIR = ROOT / "tests" / "helpers" / "plugin_example"

# Names of notes that lived next to the repository while it was written (spelled in pieces so that
# this file does not match itself). A clone has none of them; docs/algorithms.md and
# docs/tiny-models.md hold what the code needs from them.
OUTSIDE_NAMES = ["FIELD" + "-NOTES", "ALGORITHMS" + ".md", "ARCHITECTURE" + ".md"]
# A path that climbs out of a folder and names a file: it must land on a file of the repository.
CLIMBING_PATH = re.compile(r"(?:\.\./)+[\w.-][\w./-]*\.(?:md|py|ya?ml|txt|toml|json)\b")
DOCS_MENTION = re.compile(r"\bdocs/[\w.-]+\.md\b")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    files = []
    for name in names:
        path = ROOT / name
        if not path.is_file():
            continue  # deleted in the working tree, not yet committed
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def _problems(path: Path, root: Path = ROOT) -> list[str]:
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(root)
    found = []
    for name in OUTSIDE_NAMES:
        if name in text:
            found.append(f"{rel}: names {name}, which is not part of the repository")
    for m in CLIMBING_PATH.finditer(text):
        target = (path.parent / m.group(0)).resolve()
        if not target.is_relative_to(root) or not target.exists():
            found.append(f"{rel}: {m.group(0)} does not lead to a file of the repository")
    for m in DOCS_MENTION.finditer(text):
        if not (root / m.group(0)).is_file():
            found.append(f"{rel}: {m.group(0)} does not exist")
    if path.suffix == ".md":
        for m in MD_LINK.finditer(text):
            link = m.group(1).split("#", 1)[0]
            if not link or re.match(r"^[a-z][a-z0-9+.-]*:", link):
                continue  # same-page anchor, or a URL
            target = (path.parent / link).resolve()
            if not target.is_relative_to(root) or not target.exists():
                found.append(f"{rel}: link ({m.group(1)}) does not lead to a file of the repository")
    return found


def test_no_references_outside_repository():
    files = _tracked_text_files()
    assert any(p.name == "algorithms.md" for p in files), "docs/algorithms.md must be tracked"
    problems = [p for f in files for p in _problems(f)]
    assert problems == []


def test_the_reference_check_catches_what_it_is_for(tmp_path):
    # The check above passing means little unless it fails on the kinds of reference it looks for.
    # (The probe's paths are assembled here so that this file does not trip the check itself.)
    up, docs = "../", "docs/"
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "docs" / "architecture.md").write_text("# fine\n", encoding="utf-8")
    probe = repo / "docs" / "probe.md"
    probe.write_text(
        f"see {up * 2}shared/{OUTSIDE_NAMES[0]}.md and {up * 3}elsewhere/notes.md, {docs}missing.md,\n"
        f"{docs}architecture.md, [a link](nowhere.md), [fine](architecture.md), [web](https://example.org/x.md)\n",
        encoding="utf-8",
    )
    problems = _problems(probe, repo)
    assert len(problems) == 5, problems
    assert not any("architecture.md" in p or "example.org" in p for p in problems)


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", ENV_DOC.read_text(encoding="utf-8"), re.DOTALL)


@pytest.fixture
def plugin_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE_DIR))


def test_environments_doc_config_loads_and_makes_its_environment(plugin_importable):
    from treeplay.agents.registry import make_environment
    from treeplay.orchestrator.config import config_from_dict

    [block] = _blocks("yaml")
    cfg = config_from_dict(yaml.safe_load(block))
    assert cfg.env.name == "countdown_env:CountdownEnv" and cfg.env.kwargs == {"max_start": 5}
    env = make_environment(cfg.env.name, **cfg.env.kwargs)
    assert env.tasks("test", 2, seed=0)


def test_environments_doc_python_snippets_run(plugin_importable):
    from treeplay.agents.base import Environment
    from treeplay.agents.registry import missing_methods
    from treeplay.agents.scripted import ScriptedPolicy

    blocks = _blocks("python")
    assert len(blocks) >= 3  # the example listing, plugging it in, running episodes
    counting = ScriptedPolicy(lambda prompt, rng: f"{int(prompt.strip().splitlines()[-1]) - 1}\n")
    for block in blocks:
        namespace: dict = {"policy": counting, "__name__": "docs_snippet"}
        exec(compile(block, str(ENV_DOC), "exec"), namespace)  # noqa: S102 - our own docs
        if "CountdownEnv" in namespace and isinstance(namespace["CountdownEnv"], type):
            env = namespace["CountdownEnv"]()
            assert isinstance(env, Environment) and missing_methods(env) == []
        if "trajs" in namespace:
            assert [t.outcome for t in namespace["trajs"]] == [1.0] * len(namespace["tasks"])


def test_environments_doc_entry_point_declaration_is_valid():
    from treeplay.agents.registry import ENV_GROUP

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    [block] = _blocks("toml")
    declared = tomllib.loads(block)["project"]["entry-points"][ENV_GROUP]
    assert declared == {"countdown": "mypkg.envs:CountdownEnv"}


def test_every_treeplay_import_the_docs_show_resolves():
    """A `from treeplay.x import a, b` line in README.md or docs/ names a module and names that exist
    (a moved class must take the docs with it)."""
    import importlib

    line = re.compile(r"^\s*from (treeplay(?:\.\w+)*) import ([\w, ]+)$", re.M)
    missing = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for module, names in line.findall(path.read_text(encoding="utf-8")):
            mod = importlib.import_module(module)
            missing += [f"{path.name}: {module}.{n.strip()}" for n in names.split(",")
                        if n.strip() and not hasattr(mod, n.strip())]
    assert not missing, missing
