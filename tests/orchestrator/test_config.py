"""RunConfig: every shipped config loads; bad keys and values fail with one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from treeplay.orchestrator.cli import app
from treeplay.orchestrator.config import ConfigError, RunConfig, apply_overrides, load_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert any(p.name == "demo.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    # The environment it names exists and takes the given arguments.
    from treeplay.agents.registry import make_environment

    env = make_environment(cfg.env.name, **cfg.env.kwargs)
    assert env.tasks("test", 2, seed=0)


def test_demo_yaml_spells_out_the_defaults():
    assert load_config(Path(__file__).parents[2] / "configs" / "demo.yaml") == RunConfig()


def test_overrides_set_nested_keys_with_yaml_values():
    cfg = load_config(None, ["iterations=3", "learner.dpo.beta=0.25", "env.kwargs={ops: 2, digits: 1}",
                             'search.stop=["\\n", ";"]'])
    assert cfg.iterations == 3 and cfg.learner.dpo.beta == 0.25
    assert cfg.env.kwargs == {"ops": 2, "digits": 1}
    assert cfg.search.stop == ["\n", ";"]


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["learner.dpo.bta=1"], "unknown config key 'learner.dpo.bta'"),
        (["iterations=many"], "config key 'iterations'"),
        (["rollout.mode=dance"], "config key 'rollout.mode'"),
        (["search.c_puct=-1"], "config key 'search.c_puct'"),
        (["noequals"], "override 'noequals' is not key=value"),
        (["iterations.x=1"], "config key 'iterations'"),
        (["iterations=3", "iterations.x=1"], "'iterations' is not a section"),
        (["rollout.panel_peers=[{name: a}, {name: a}]"], "panel peer names must be distinct"),
        (["rollout.panel_peers=[{name: exact}]"], "panel peer name 'exact' is reserved"),
        (["rollout.panel_peers=[{model_path: /m}]"], "config key 'rollout.panel_peers.0.name'"),
    ],
)
def test_bad_overrides_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_cli_reports_a_bad_key_in_one_line_and_exits_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"learner": {"dpo": {"betta": 0.1}}}))
    result = CliRunner().invoke(app, ["run", str(cfg)])
    assert result.exit_code == 2
    assert "unknown config key 'learner.dpo.betta'" in result.output


def test_apply_overrides_keeps_other_keys():
    data = {"a": {"b": 1, "c": 2}}
    assert apply_overrides(data, ["a.b=5"]) == {"a": {"b": 5, "c": 2}}


def test_regression_partial_section_keeps_the_documented_defaults(tmp_path):
    """`treeplay demo learner.dpo.lr=3e-5` used to turn the demo's MCTS-DPO into plain sigmoid DPO with
    a fixed reference and no warm-up (the section was rebuilt from DPOConfig's own defaults)."""
    from treeplay.orchestrator.config import RunConfig, load_config

    demo = RunConfig().learner.dpo
    by_override = load_config(None, ["learner.dpo.lr=3e-5"]).learner.dpo
    path = tmp_path / "partial.yaml"
    path.write_text("learner: {dpo: {lr: 3.0e-5}}\nsearch: {iterations: 4}\n")
    from_file = load_config(path, [])
    for dpo in (by_override, from_file.learner.dpo):
        assert dpo.lr == 3e-5
        assert (dpo.loss_type, dpo.reference, dpo.warmup_steps) == (demo.loss_type, demo.reference, demo.warmup_steps)
    assert from_file.search.iterations == 4 and from_file.search.root_width == RunConfig().search.root_width
    # Free-form mappings are not filled in: another environment gets none of arithmetic's arguments.
    assert load_config(None, ["env.name=toolqa"]).env.kwargs == {}


def test_experimental_methods_are_named_in_the_run_help_and_at_the_start_of_a_run():
    """Methods docs/evidence.md has not shown to beat RFT are marked, not hidden: ``treeplay run
    --help`` lists every one, and a config that uses one gets a line saying so; the baseline and the
    one method ahead of it get none. The MCTS-DPO and TPO findings quote the evidence study's JSON."""
    import json
    import re

    from treeplay.orchestrator.config import EXPERIMENTAL, experimental_notes

    text = " ".join(CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output.split())
    for key, findings in EXPERIMENTAL.items():
        for value in findings:
            assert re.search(rf"\b{value}\b", text), (key, value)
    assert experimental_notes(load_config(None, ["rollout.mode=sample", "learner.algorithm=rft"])) == []
    assert experimental_notes(load_config(None, ["rollout.mode=sample", "learner.algorithm=dpo"])) == []
    notes = experimental_notes(load_config(None, ["rollout.mode=panel", "learner.algorithm=tpo"]))
    assert [n.split(" ")[0] for n in notes] == ["rollout.mode=panel", "learner.algorithm=tpo"]

    study = json.loads((Path(__file__).resolve().parents[2] / "docs/results/evidence-study.json").read_text())
    vs = {c["name"]: c["vs_reference"] for c in study["cells"] if c.get("vs_reference")}
    mcts = f"{vs['mcts-dpo']['mean'] * 100:+.1f} T=1 points vs RFT, interval [{vs['mcts-dpo']['ci_low'] * 100:.1f}, " \
           f"{vs['mcts-dpo']['ci_high'] * 100:+.1f}]"
    assert mcts in EXPERIMENTAL["rollout.mode"]["mcts"]
    assert f"{vs['tpo']['mean'] * 100:.1f} T=1 points vs RFT" in EXPERIMENTAL["learner.algorithm"]["tpo"]
