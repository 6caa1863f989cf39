"""The built-in ``dataset`` environment: verifiers, splits, bad lines, reward functions and a run's calls.

Real JSONL files in tmp_path throughout; the episodes go through ``agents.episode`` as the loop's
plain rollouts and evaluation do.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from treeplay.agents.base import Step, Trajectory
from treeplay.agents.envs.dataset import DatasetEnv, last_boxed, last_number, normalise
from treeplay.agents.episode import run_episodes
from treeplay.agents.registry import RegistryError, environment_factory, make_environment
from treeplay.agents.scripted import ScriptedPolicy

ROOT = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def episode(env: DatasetEnv, lines: list[str], split: str = "train") -> tuple[float, bool]:
    """Play ``lines`` on the first task of ``split``; (reward of the last step, done)."""
    env.reset(env.tasks(split, 1, seed=0)[0])
    result = None
    for line in lines:
        result = env.step(line)
    assert result is not None
    return result.reward, result.done


# -- verifiers -------------------------------------------------------------------------------------


def test_boxed_takes_the_last_complete_box_with_nested_braces(tmp_path):
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{3} and an open \boxed{4") == "3"
    assert last_boxed("no box here {x}") is None
    assert last_boxed("\\boxed{" * 5000) is None  # linear in the text, no error

    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Half?", "answer": r"\frac{1}{2}", "split": "train"}])
    env = DatasetEnv(str(path), match="boxed")
    assert episode(env, ["think", r"so it is \boxed{\frac{1}{2}}"]) == (1.0, True)
    assert episode(env, [r"\boxed{\frac{1}{3}}"]) == (0.0, True)
    assert episode(env, ["no box yet"]) == (0.0, False)
    assert episode(env, [r"\boxed{\frac{1}{2}"]) == (0.0, False)  # unclosed: not an answer line


def test_boxed_compares_plain_numbers_numerically(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "How many?", "answer": 1000, "split": "train"}])
    env = DatasetEnv(str(path), match="boxed")
    assert episode(env, [r"\boxed{1,000}"]) == (1.0, True)
    assert episode(env, [r"\boxed{1000.0}"]) == (1.0, True)
    assert episode(env, [r"\boxed{100}"]) == (0.0, True)


def test_last_number_removes_thousands_separators_and_compares_numerically(tmp_path):
    assert last_number("it is 1,000") == last_number("1000.0")
    assert last_number("values 1, 2, 3") == 3
    assert last_number("no digits") is None

    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "How many?", "answer": "1,000", "split": "train"}])
    env = DatasetEnv(str(path), match="last_number")
    assert episode(env, ["999 + 1 = 1000", "Answer: 1000.0"]) == (1.0, True)
    assert episode(env, ["answer: about 500 then 1,000"]) == (1.0, True)  # the prefix is case-insensitive
    assert episode(env, ["Answer: 1001"]) == (0.0, True)
    assert episode(env, ["Answer: none"]) == (0.0, True)
    assert episode(env, ["1000"]) == (0.0, False)  # a number alone is reasoning, not an answer line


def test_exact_normalises_case_space_and_a_trailing_period(tmp_path):
    assert normalise("  Paris,   France. ") == "paris, france"
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Capital?", "answer": "Paris, France", "split": "train"}])
    env = DatasetEnv(str(path), match="exact")
    assert episode(env, ["Answer:   PARIS,  france."]) == (1.0, True)
    assert episode(env, ["Answer: Paris"]) == (0.0, True)


def test_an_episode_without_an_answer_line_ends_unrewarded_after_max_steps(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q?", "answer": "1", "split": "train"}])
    env = DatasetEnv(str(path), max_steps=3)
    env.reset(env.tasks("train", 1, seed=0)[0])
    results = [env.step(s) for s in ["a", "\x00 garbage \\boxed{", "c"]]
    assert [r.done for r in results] == [False, False, True] and results[-1].reward == 0.0


# -- splits ----------------------------------------------------------------------------------------


def test_the_split_field_decides_when_present(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i), "split": s}
            for i, s in enumerate(["train", "train", "validation", "test", "test"])]
    env = DatasetEnv(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert sorted(t.meta["question"] for t in env.tasks("test", 2, seed=5)) == ["q3", "q4"]
    assert [t.meta["question"] for t in env.tasks("validation", 1, seed=5)] == ["q2"]
    assert {t.meta["question"] for t in env.tasks("train", 2, seed=5)} == {"q0", "q1"}


def test_the_carve_up_is_seeded_stable_under_appending_and_follows_the_fractions(tmp_path):
    rows = [{"id": f"r{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(2000)]
    path = write_jsonl(tmp_path / "d.jsonl", rows[:1000])

    def assignment(p: Path, **kw) -> dict[str, str]:
        return {r.id: r.split for r in DatasetEnv(str(p), **kw).rows}

    first = assignment(path)
    assert first == assignment(path)
    counts = {s: list(first.values()).count(s) for s in ("train", "validation", "test")}
    assert 720 <= counts["train"] <= 880 and 60 <= counts["validation"] <= 140 and 60 <= counts["test"] <= 140

    longer = write_jsonl(tmp_path / "longer.jsonl", rows)  # the same lines with 1000 appended
    assert {k: v for k, v in assignment(longer).items() if k in first} == first
    assert assignment(path, split_seed=1) != first
    wide = assignment(path, test_fraction=0.5, validation_fraction=0.0)
    assert 430 <= list(wide.values()).count("test") <= 570 and "validation" not in wide.values()


def test_tasks_are_a_pure_function_and_repeat_evenly_past_the_split(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i), "split": "train"} for i in range(5)]
    env = DatasetEnv(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert [t.id for t in env.tasks("train", 4, seed=3)] == [t.id for t in env.tasks("train", 4, seed=3)]
    twelve = env.tasks("train", 12, seed=1)
    assert len({t.id for t in twelve}) == 12
    per_question = [sum(t.meta["question"] == f"q{i}" for t in twelve) for i in range(5)]
    assert sorted(per_question) == [2, 2, 2, 3, 3]
    with pytest.raises(ValueError, match=r"no lines in the 'test' split"):
        env.tasks("test", 1, seed=0)


# -- bad input: one line naming the file, the line and the reason ------------------------------------


@pytest.mark.parametrize(("lines", "line_no", "reason"), [
    (['{"question": "a", "answer": "1"}', '{"question": "b", "answer": '], 2, "not JSON"),
    (['{"question": "a", "answer": "1"}', "", '{"answer": "2"}'], 3, "missing 'question'"),
    (['{"question": "a"}'], 1, "missing 'answer'"),
    (['{"question": "a", "answer": ["1"]}'], 1, "'answer' must be non-empty text or a number"),
    (['{"question": "a", "answer": true}'], 1, "'answer' must be non-empty text or a number"),
    (['{"question": "a", "answer": NaN}'], 1, "not JSON"),
    (['{"id": 7, "question": "a", "answer": "1"}', '{"id": "7", "question": "b", "answer": "2"}'], 2,
     "duplicate id '7', first on line 1"),
    (['{"question": "same", "answer": "1"}', '{"question": "same", "answer": "2"}'], 2,
     "duplicate question (no 'id' given), first on line 1"),
    (['{"question": "a", "answer": "1", "split": "dev"}'], 1, 'unknown split "dev"'),
    (['["question", "answer"]'], 1, "expected a JSON object"),
    (['{"question": "a", "answer": "1", "solution": "Answer: 2"}'], 1, "does not match the answer '1'"),
    (['{"question": "a", "answer": "1", "solution": "Answer: 1\\nmore"}'], 1, "the answer line must be the last"),
])
def test_each_bad_line_is_one_error_naming_file_line_and_reason(tmp_path, lines, line_no, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as info:
        DatasetEnv(str(path))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}:{line_no}: ") and reason in message, message
    with pytest.raises(RegistryError) as made:  # what a run config gets: the same line, after the env's name
        make_environment("dataset", path=str(path))
    assert str(made.value).endswith(message)


def test_an_empty_file_and_a_missing_file_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: empty file"):
        DatasetEnv(str(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match="does not exist"):
        DatasetEnv(str(tmp_path / "nowhere.jsonl"))


def test_a_bad_file_stops_treeplay_run_before_the_run_is_recorded(tmp_path):
    from treeplay.orchestrator.cli import app
    from treeplay.store import queries
    from treeplay.store.database import open_store

    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "a", "answer": "1"}\n{"question": "b"}\n')
    url = f"sqlite:///{tmp_path / 'store.db'}"
    cfg = {"name": "mine", "output_dir": str(tmp_path / "runs"), "store": {"url": url},
           "env": {"name": "dataset", "kwargs": {"path": str(data)}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = CliRunner().invoke(app, ["run", str(tmp_path / "run.yaml")])
    assert out.exit_code == 2 and "Traceback" not in out.output, out.output
    assert f"{data}:2: missing 'answer'" in " ".join(out.output.split())
    assert queries.list_runs(open_store(url, create=False)) == []
    assert not (tmp_path / "runs").exists()


# -- a reward function by dotted path ----------------------------------------------------------------


def test_reward_by_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent('''
        def length_bonus(question, answer, response):
            """1.0 for the right number on the answer line, plus 0.5 if the working shows the question's word."""
            last = response.splitlines()[-1]
            return (1.0 if last.endswith(answer) else 0.0) + (0.5 if question.split()[0] in response else 0.0)

        def broken(question, answer, response):
            return "high"
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Twelve halved?", "answer": "6", "split": "train"}])
    env = make_environment("dataset", path=str(path), reward="my_rewards:length_bonus")
    assert episode(env, ["Twelve / 2 = 6", "Answer: 6"]) == (1.5, True)
    assert episode(env, ["Answer: 7"]) == (0.0, True)

    broken = make_environment("dataset", path=str(path), reward="my_rewards:broken")
    broken.reset(broken.tasks("train", 1, seed=0)[0])
    result = broken.step("Answer: 6")
    assert result.done and "returned 'high', not a finite number" in result.info["error"]
    with pytest.raises(RegistryError, match="reward: cannot import module 'no_such_module'"):
        make_environment("dataset", path=str(path), reward="no_such_module:fn")
    with pytest.raises(RegistryError, match="has no attribute 'missing'"):
        make_environment("dataset", path=str(path), reward="my_rewards:missing")


# -- through the calls a run makes ---------------------------------------------------------------------


def test_make_environment_rewards_the_right_answer_through_the_loops_calls():
    path = ROOT / "examples" / "dataset" / "gsm8k_tiny.jsonl"
    make = environment_factory("dataset", path=str(path))
    env = make()
    tasks = env.tasks("train", 3, seed=7)
    answers = {t.prompt: t.answer for t in tasks}

    def answering(right: bool) -> ScriptedPolicy:
        def write(prompt: str, rng) -> str:
            gold = next(a for p, a in answers.items() if prompt.startswith(p)).replace(",", "")
            if not prompt.endswith("Working.\n"):
                return "Working.\n"
            return f"Answer: {gold if right else int(gold) + 1}\n"
        return ScriptedPolicy(write)

    good = run_episodes(make, answering(True), tasks, max_steps=4)
    bad = run_episodes(make, answering(False), tasks, max_steps=4)
    assert [t.outcome for t in good] == [1.0] * 3 and [t.outcome for t in bad] == [0.0] * 3
    assert all(t.status == "ok" and t.info["stop_reason"] == "done" and len(t.steps) == 2 for t in good)
    # The exact verifier of a finished trajectory, the whole-completion check, and the warm start's pairs.
    task = tasks[0]
    assert env.score(task, Trajectory(task, [Step(0, "x"), Step(1, f"Answer: {task.answer}")])) == 1.0
    assert env.verify(task, task.reference or "") and not env.verify(task, "Answer: -1\n")
    for prompt, completion in env.demonstrations(tasks):
        replay = make()
        replay.reset(next(t for t in tasks if t.prompt == prompt))
        results = [replay.step(line) for line in completion.splitlines()]
        assert results[-1].done and results[-1].reward == 1.0 and not any(r.done for r in results[:-1])


def test_a_run_config_with_the_dataset_env_starts_and_warm_starts(tmp_path):
    """The start checks pass and the tiny model's supervised warm start runs on the file's
    demonstrations (a whole run needs Ray and minutes; the loop's own calls are checked above)."""
    from treeplay.orchestrator.config import config_from_dict
    from treeplay.orchestrator.run_start import check_startable, prepare_model

    path = ROOT / "examples" / "dataset" / "gsm8k_tiny.jsonl"
    cfg = config_from_dict({
        "name": "mine", "output_dir": str(tmp_path), "env": {"name": "dataset", "kwargs": {"path": str(path)}},
        "warm_start": {"steps": 2, "examples": 8, "batch_size": 4},
        "model": {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_positions": 512}},
    })
    check_startable(cfg)
    model, info = prepare_model(cfg, tmp_path / "run")
    assert (model / "config.json").is_file() and info["seconds"] > 0


def test_regression_a_dataset_without_held_out_lines_is_refused_before_the_run_is_recorded(tmp_path):
    """A file whose lines are all `split: train` once failed at the held-out draw, after the run was
    recorded; the start checks now draw from every split the run uses."""
    from treeplay.orchestrator.config import config_from_dict
    from treeplay.orchestrator.run_start import check_startable

    path = write_jsonl(tmp_path / "d.jsonl", [{"question": f"{i}+1?", "answer": str(i + 1), "split": "train"}
                                              for i in range(5)])
    cfg = config_from_dict({"name": "x", "output_dir": str(tmp_path),
                            "env": {"name": "dataset", "kwargs": {"path": str(path)}}})
    with pytest.raises(ValueError, match="cannot give test tasks") as e:
        check_startable(cfg)
    assert "\n" not in str(e.value)


def test_chat_model_wraps_the_prompt_in_its_chat_template(tmp_path):
    from treeplay.engines.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "model", 32, 1, 2)
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q?", "answer": "1", "split": "train"}])
    [task] = DatasetEnv(str(path), chat_model=str(model), instruction="").tasks("train", 1, seed=0)
    assert task.prompt == "[user] Q?\n[assistant] "
    [plain] = DatasetEnv(str(path), instruction="").tasks("train", 1, seed=0)
    assert plain.prompt == "Q?\n"
