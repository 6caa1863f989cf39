"""The README's figures are the figures of the files they come from.

Speed figures come from the JSON that ``scripts/record_results.py`` keeps for each bench/ script in
docs/results/<bench>.json; the "Does it learn?" rows of the 5-seed study come from
docs/results/evidence-study.json. Each entry of ``FIGURES`` below names a README phrase (a regular
expression whose groups capture numbers as printed), the JSON file, the key path of each number and
how it is printed. The check formats the JSON value the way the README prints it and compares the
text, so an edited README number, or a re-recorded JSON that moved, fails here until both agree.

The README's rows that have no JSON (older studies, the demo) must quote figures that their doc
(docs/evidence.md, docs/demo.md) states, which ``DOC_FIGURES`` checks the same way.

Every docs/results/*.json that the README names must exist and have at least one checked figure,
and the two short tables keep their cells short.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results"

NUM = r"([−+-]?[\d,]*\d(?:\.\d+)?)"  # a printed number: sign (ASCII or Unicode minus), thousands commas


@dataclass(frozen=True)
class Figure:
    """Numbers of one README phrase: ``pattern``'s groups, in order, are ``paths`` in ``file``."""

    pattern: str
    file: str  # under docs/results/
    paths: tuple[tuple[str, ...], ...]  # key paths; "name=X" picks the item of a list whose name is X
    fmt: str = "{}"  # how the README prints the value (after ``scale``)
    scale: float = 1.0


def _vs_rft(row: str, cell: str) -> Figure:
    """A "Does it learn?" row: the T=1 change vs RFT and its interval, in points with one decimal."""
    return Figure(
        rf"\| {re.escape(row)} \| {NUM} \[{NUM}, {NUM}\]",
        "evidence-study.json",
        tuple(("cells", f"name={cell}", "vs_reference", k) for k in ("mean", "ci_low", "ci_high")),
        "{:+.1f}",
        100.0,
    )


FIGURES: list[Figure] = [
    # Does it learn? (5-seed evidence study)
    _vs_rft("MCTS-DPO (step pairs + NLL)", "mcts-dpo"),
    _vs_rft("TPO on the same trees", "tpo"),
    _vs_rft("outcome-DPO (DPO + NLL, pairs from 7 samples)", "outcome-dpo"),
    _vs_rft("MCTS-DPO, preferences shuffled (control)", "mcts-dpo-shuffled"),
    _vs_rft("no update (the warm-started policy)", "no-update"),
    Figure(
        rf"its greedy gain, {NUM} points, is below RFT's {NUM}\)",
        "evidence-study.json",
        (("cells", "name=outcome-dpo", "greedy_gain", "mean"), ("cells", "name=rft", "greedy_gain", "mean")),
        "{:+.1f}",
        100.0,
    ),
    # How fast (bench/ scripts)
    Figure(
        rf"\| {NUM} tree nodes/s; {NUM}x one ORM add per row",
        "store.json",
        (("chunked_nodes_per_s",), ("chunked_ratio_vs_naive",)),
        "{:,.0f}|{:.2f}",
    ),
    Figure(rf"\| {NUM}x the nodes/s of one tree at a time", "search.json", (("ratio",),), "{:.2f}"),
    Figure(
        rf"\| {NUM}x the tokens/s of a `generate` loop per prompt; prefix reuse {NUM}x on tree work",
        "engines.json",
        (("hf_vs_naive",), ("prefix_reuse_speedup",)),
        "{:.2f}",
    ),
    Figure(
        rf"\| {NUM}x faster on the HF engine, {NUM}x on vLLM",
        "engines.json",
        (("reload_vs_rebuild",), ("reload_vs_rebuild_vllm",)),
        "{:.2f}|{:.0f}",
    ),
    Figure(
        rf"\| {NUM}x one episode at a time \({NUM} prompts in {NUM} calls\)",
        "react.json",
        (("batched_speedup",), ("sequential_calls",), ("batched_calls",)),
        "{:.2f}|{}|{}",
    ),
    Figure(
        rf"\| {NUM} of the engine's direct token rate \({NUM} with 8 episodes\)",
        "gateway.json",
        (("gateway_throughput_fraction_b32",), ("gateway_throughput_fraction_b8",)),
        "{:.3f}",
    ),
    Figure(rf"\| {NUM}x the pairs/s \|", "learners.json", (("ratio",),), "{:.2f}"),
    Figure(
        rf"\| redeploy {NUM}x faster \(HF\), {NUM}x \(vLLM\); learner memory {NUM}x less",
        "lora.json",
        (("lora_redeploy_speedup",), ("lora_redeploy_speedup_vllm",), ("rss_saving",)),
        "{:.2f}",
    ),
    Figure(
        rf"\| {NUM}x: {NUM} s → {NUM} s per iteration \({NUM} iterations x 2 seeds\)",
        "loop.json",
        (("pipelined_speedup",), ("sync_s_per_iter",), ("async_s_per_iter",), ("iterations",)),
        "{:.2f}|{:.2f}|{:.2f}|{}",
    ),
    Figure(
        rf"\| {NUM} s per iteration with 1 rollout worker, {NUM} s with 2",
        "cluster.json",
        (("max_staleness_0", "iteration_s", "1"), ("max_staleness_0", "iteration_s", "2")),
        "{:.2f}",
    ),
]


@dataclass(frozen=True)
class DocFigure:
    """README numbers with no JSON behind them: the doc they come from states them, in the same order.

    ``at`` is a regex that finds the place in ``doc``: a table row (the numbers must be in that row)
    or the start of a paragraph (the numbers must be in that paragraph).
    """

    pattern: str
    doc: str
    at: str


DOC_FIGURES: list[DocFigure] = [
    DocFigure(rf"\| credit re-assigned by a step check \| {NUM} \[{NUM}, {NUM}\]", "docs/evidence.md",
              r"(?m)^\| multi-agent, credit re-assigned by the step check \|"),
    DocFigure(rf"\| panel of the policy and 2 other models \| {NUM} \[{NUM}, {NUM}\]", "docs/evidence.md",
              r"(?m)^\| panel of the policy and 2 frozen other models \|"),
    DocFigure(rf"\| SLHF, the leader's answer \| {NUM} \[{NUM}, {NUM}\]", "docs/evidence.md",
              r"(?m)^\| SLHF \(verifier oracle\), leader's answer \|"),
    DocFigure(rf"\| Co-ReAct \| {NUM} \[{NUM}, {NUM}\]", "docs/evidence.md",
              r"(?m)^\| rubric-guided ReAct, DPO on verify-and-retry pairs \|"),
    DocFigure(rf"goes from {NUM} to {NUM} greedy and from\s+{NUM} to {NUM} at T=1 in {NUM} s", "docs/demo.md",
              r"(?m)^`treeplay demo` \(the defaults\) on the final code"),
]


def _ascii(text: str) -> str:
    return text.replace("−", "-")


def _value(doc, path: tuple[str, ...]):
    if isinstance(doc, dict) and isinstance(doc.get("result"), dict):
        doc = doc["result"]  # scripts/record_results.py's wrapper; an older file is the bench's line itself
    for key in path:
        if key.startswith("name=") and isinstance(doc, list):
            [doc] = [item for item in doc if item.get("name") == key[len("name="):]]
        else:
            doc = doc[key]
    return doc


def _print(value, fmt: str, scale: float) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and scale != 1.0:
        value = value * scale
    return fmt.format(value)


def mismatches(readme: str, figures: list[Figure] = FIGURES, results: Path = RESULTS) -> list[str]:
    """What differs between ``readme`` and the JSON files; empty when every figure agrees."""
    found = []
    for fig in figures:
        path = results / fig.file
        if not path.is_file():
            found.append(f"{fig.file}: the README quotes it but docs/results/ has no such file")
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        matches = list(re.finditer(fig.pattern, readme))
        if len(matches) != 1:
            found.append(f"{fig.pattern!r}: found {len(matches)} times in the README, expected once")
            continue
        fmts = fig.fmt.split("|") if "|" in fig.fmt else [fig.fmt] * len(fig.paths)
        for printed, key_path, fmt in zip(matches[0].groups(), fig.paths, fmts, strict=True):
            expected = _print(_value(data, key_path), fmt, fig.scale)
            if _ascii(printed) != _ascii(expected):
                found.append(f"README prints {printed} where {fig.file} {'.'.join(key_path)} gives {expected}")
    return found


def doc_mismatches(readme: str, figures: list[DocFigure] = DOC_FIGURES, root: Path = ROOT) -> list[str]:
    """README figures that the doc they come from does not state."""
    found = []
    for fig in figures:
        matches = list(re.finditer(fig.pattern, readme))
        if len(matches) != 1:
            found.append(f"{fig.pattern!r}: found {len(matches)} times in the README, expected once")
            continue
        doc = _ascii((root / fig.doc).read_text(encoding="utf-8"))
        place = re.search(fig.at, doc)
        if place is None:
            found.append(f"{fig.doc}: nothing matches {fig.at!r}")
            continue
        rest = doc[place.start():]
        text = rest.split("\n", 1)[0] if rest.startswith("|") else rest.split("\n\n", 1)[0]
        pos = 0
        for printed in matches[0].groups():
            hit = re.search(rf"(?<![\d.]){re.escape(_ascii(printed))}(?![\d])", text[pos:])
            if hit is None:
                found.append(f"README prints {printed}, which {fig.doc} does not state at {fig.at!r}")
                break
            pos += hit.end()
    return found


def test_readme_figures_match_their_json():
    assert mismatches(README.read_text(encoding="utf-8")) == []


def test_readme_figures_without_json_match_their_doc():
    assert doc_mismatches(README.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("index", range(len(FIGURES)))
def test_an_edited_readme_number_is_caught(index):
    # The checks above passing means little unless they fail when a README number changes:
    # change the last digit of each figure's first number and expect exactly that figure to fail.
    readme = README.read_text(encoding="utf-8")
    fig = FIGURES[index]
    m = re.search(fig.pattern, readme)
    assert m is not None, fig.pattern
    start, end = m.span(1)
    digit = readme[end - 1]
    edited = readme[: end - 1] + str((int(digit) + 1) % 10) + readme[end:]
    problems = mismatches(edited, [fig])
    assert len(problems) == 1 and "README prints" in problems[0], problems


@pytest.mark.parametrize("index", range(len(DOC_FIGURES)))
def test_an_edited_readme_number_without_json_is_caught(index):
    readme = README.read_text(encoding="utf-8")
    fig = DOC_FIGURES[index]
    m = re.search(fig.pattern, readme)
    assert m is not None, fig.pattern
    end = m.end(1)
    edited = readme[: end - 1] + str((int(readme[end - 1]) + 1) % 10) + readme[end:]
    assert len(doc_mismatches(edited, [fig])) == 1


def test_every_results_file_the_readme_names_exists_and_is_checked():
    readme = README.read_text(encoding="utf-8")
    named = set(re.findall(r"docs/results/([\w.-]+\.json)", readme))
    assert named, "the README should cite docs/results/"
    assert sorted(n for n in named if not (RESULTS / n).is_file()) == []
    checked = {fig.file for fig in FIGURES}
    assert sorted(named - checked) == [], "a cited results file with no figure checked in FIGURES"
    assert sorted(checked - named) == [], "a checked file the README does not cite"


def _table_cells(readme: str, heading: str) -> list[str]:
    section = readme.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    cells = []
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("| ---"):
            cells += [c.strip() for c in line.strip().strip("|").split("|")]
    return cells


def _rendered(cell: str) -> str:
    cell = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", cell)  # [text](url) shows text
    cell = re.sub(r"\[([^\]]*)\]\[[^\]]*\]", r"\1", cell)  # [text][ref] shows text
    return cell.replace("`", "")


@pytest.mark.parametrize("heading", ["Does it learn?", "How fast"])
def test_the_short_tables_stay_short(heading):
    cells = _table_cells(README.read_text(encoding="utf-8"), heading)
    assert len(cells) >= 9
    assert [c for c in cells if len(_rendered(c)) > 100] == []
