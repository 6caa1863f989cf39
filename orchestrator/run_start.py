"""What comes before a run's iterations: the starting model (a given one, or a tiny model built and
warm-started here, with its progress shown), the checks made before anything is recorded, a free
run name, and, when resuming, the model a checkpoint's fixed reference is.

``orchestrator/loop.py`` calls these from ``launch_run`` and ``resume_run`` and then runs the
iterations; ``console`` is where both print (stderr).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from treeplay.agents.registry import make_environment
from treeplay.orchestrator.config import STUDY_PEER_PREFIX, RunConfig
from treeplay.store import queries
from treeplay.store.database import Store
from treeplay.store.records import uri_to_path

console = Console(stderr=True)


def prepare_model(cfg: RunConfig, run_dir: Path, on_step: Callable[[int, float], None] | None = None) -> tuple[Path, dict]:
    """The starting policy: ``model.path`` as is, or a tiny model built and warm-started here."""
    if cfg.model.path:
        path = Path(cfg.model.path)
        if not (path / "config.json").is_file():
            raise ValueError(f"model.path '{path}' is not a Hugging Face model directory (no config.json)")
        return path, {}
    from treeplay.engines.tiny import build_tiny_model
    from treeplay.orchestrator.warmstart import supervised_warm_start

    t = cfg.model.tiny
    ws = cfg.warm_start
    env = make_environment(cfg.env.name, **cfg.env.kwargs)
    if t.tokenizer == "bpe":
        from treeplay.engines.bpe import build_bpe_model

        path = build_bpe_model(run_dir / "model-v0", t.arch or "qwen2", t.hidden_size, t.num_layers, t.num_heads,
                               t.num_kv_heads, t.intermediate_size, t.max_positions, t.vocab_size, t.seed,
                               tokenizer_corpus(cfg, env), pretokenizer=t.pretokenizer)
    else:
        path = build_tiny_model(run_dir / "model-v0", t.hidden_size, t.num_layers, t.num_heads,
                                intermediate_size=t.intermediate_size, max_positions=t.max_positions, seed=t.seed)
    info: dict[str, float] = {}
    if ws.enabled and ws.steps > 0:
        tasks = env.tasks("train", ws.examples, seed=cfg.seed + 99)
        if list(ws.demonstrations) == ["actions"]:  # one kind: a plain list, batches as they always were
            examples: Any = warm_start_examples(cfg, env, tasks)
        else:
            examples = {k: warm_start_examples(cfg, env, tasks, [k]) for k in ws.demonstrations}
        info = supervised_warm_start(path, examples, steps=ws.steps, batch_size=ws.batch_size, lr=ws.lr,
                                     seed=cfg.seed, num_threads=cfg.engine.num_threads, on_step=on_step,
                                     shares=ws.demonstrations)
    return path, info


# Train tasks whose rubric and verdict demonstrations join a BPE tokenizer's corpus.
CORPUS_TASKS = 100


def tokenizer_corpus(cfg: RunConfig, env: Any) -> list[str]:
    """The text a run's BPE tokenizer is trained on: the environments' transcripts and, when the warm
    start teaches rubrics or verdicts, a sample of those demonstrations (their prompts are not in any
    transcript; no other run's vocabulary changes)."""
    from treeplay.engines.bpe import DEFAULT_ENVIRONMENTS, environment_corpus

    t, ws = cfg.model.tiny, cfg.warm_start
    kinds = [k for k in ws.demonstrations if k != "actions"] if ws.enabled and ws.steps > 0 else []
    tasks = env.tasks("train", CORPUS_TASKS, seed=t.seed) if kinds else []
    extra = [p + c for p, c, *_ in warm_start_examples(cfg, env, tasks, kinds)] if kinds else []
    return environment_corpus([(cfg.env.name, cfg.env.kwargs), *DEFAULT_ENVIRONMENTS], seed=t.seed) + extra


def demonstration_kinds(cfg: RunConfig, env: Any) -> tuple[str, ...]:
    """The kinds of demonstrations ``env`` offers (``demonstration_kinds``; "actions" alone when it has
    ``demonstrations`` but does not say), after checking that it offers every kind the warm start asks for.

    Raises:
        ValueError: No ``demonstrations`` at all, or a kind asked for that the environment lacks (one line).
    """
    if not callable(getattr(env, "demonstrations", None)):
        raise ValueError(f"warm_start needs demonstrations, environment '{cfg.env.name}' has none: "
                         "set warm_start.enabled=false or give a trained model.path")
    offered = tuple(getattr(env, "demonstration_kinds", ("actions",)))
    missing = [k for k in cfg.warm_start.demonstrations if k not in offered]
    if missing:
        raise ValueError(f"warm_start.demonstrations: environment '{cfg.env.name}' has no '{missing[0]}' "
                         f"demonstrations (it has: {', '.join(offered)})")
    return offered


def warm_start_examples(cfg: RunConfig, env: Any, tasks: list, kinds: list[str] | None = None) -> list:
    """``env``'s demonstrations of ``tasks``, of ``kinds`` (default: every kind ``warm_start.demonstrations``
    names), in one list.

    An environment that offers only actions is called as ``demonstrations(tasks)`` (the protocol's
    original form, which plug-ins implement); one that offers more kinds gets ``kinds`` and the ReAct
    settings its prompts are rendered with (``rollout.react``).
    """
    offered = demonstration_kinds(cfg, env)
    kinds = list(cfg.warm_start.demonstrations if kinds is None else kinds)
    if offered == ("actions",):
        return list(env.demonstrations(tasks))
    return list(env.demonstrations(tasks, kinds=kinds, react=cfg.rollout.react))


def check_startable(cfg: RunConfig, starting_model: bool = True) -> None:
    """Check what can be checked before a run is recorded, so that a bad config leaves no trace.

    The environment is made (its name resolves, its constructor takes ``env.kwargs``) and gives
    tasks of the splits the run draws from (train, and ``eval.split``: an empty split or a
    ValueError refuses the config; an environment that crashes otherwise fails inside the run,
    which is then marked failed with the reason); with
    ``starting_model`` (a new run, not a resume), ``model.path`` must be a Hugging Face directory and
    a tiny model's warm start needs the environment's ``demonstrations`` of every kind it asks for. A panel peer's
    ``study-warm:`` model exists only in a study, which resolves it before the run starts
    (orchestrator/study.py). The config itself was validated when it was loaded, the store is
    opened by the caller.

    Raises:
        RegistryError: The environment cannot be made (one-line message).
        ValueError: Anything else (one-line message).
    """
    env = make_environment(cfg.env.name, **cfg.env.kwargs)
    for split in dict.fromkeys(("train", cfg.eval.split)):  # the splits the run draws tasks from
        try:
            drawn = env.tasks(split, 1, seed=cfg.seed)
        except ValueError as e:
            raise ValueError(f"env {cfg.env.name!r} cannot give {split} tasks: {str(e).splitlines()[0]}") from None
        except Exception:  # noqa: BLE001 - not a refusal of the config: the run records the failure
            continue
        if not drawn:
            raise ValueError(f"env {cfg.env.name!r} has no {split} tasks")
    for peer in cfg.rollout.panel_peers:
        if (peer.model_path or "").startswith(STUDY_PEER_PREFIX):
            raise ValueError(f"rollout.panel_peers: peer '{peer.name}' has model_path '{peer.model_path}', "
                             "which only `treeplay study` builds; give a model directory")
    if not starting_model:
        return
    if cfg.model.path:
        if not (Path(cfg.model.path) / "config.json").is_file():
            raise ValueError(f"model.path '{cfg.model.path}' is not a Hugging Face model directory (no config.json)")
    elif cfg.warm_start.enabled and cfg.warm_start.steps > 0:
        demonstration_kinds(cfg, env)


# How often a phase with a progress bar says where it is when stderr is not a terminal (CI logs,
# `| tee`): rich draws no bar there, and a warm start can take minutes.
PLAIN_PROGRESS_EVERY_S = 5.0


def warm_start_model(cfg: RunConfig, run_dir: Path) -> tuple[Path, dict]:
    """``prepare_model`` with a progress bar on a terminal, or a plain line every few seconds."""
    total = cfg.warm_start.steps
    t0 = time.perf_counter()
    last = [t0]
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        bar = progress.add_task("warm start", total=total, loss=float("nan"))

        def on_step(step: int, loss: float) -> None:
            progress.update(bar, completed=step + 1, loss=loss)
            now = time.perf_counter()
            if not console.is_terminal and now - last[0] >= PLAIN_PROGRESS_EVERY_S:
                last[0] = now
                console.print(f"warm start: step {step + 1}/{total}, loss {loss:.3f}, {now - t0:.0f}s", highlight=False)

        return prepare_model(cfg, run_dir, on_step=on_step)


def free_name(store: Store, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``... if the store already has a run called that."""
    taken = {r.name for r in queries.list_runs(store)}
    if name not in taken:
        return name
    k = 2
    while f"{name}-{k}" in taken:
        k += 1
    return f"{name}-{k}"


def resume_reference(checkpoint: Path, version: int) -> tuple[Path | None, str | None]:
    """The model a checkpoint's fixed reference is (to load it again) and the reference's origin."""
    from treeplay.learners.checkpoints import read_checkpoint_meta

    meta = read_checkpoint_meta(checkpoint)
    if meta is None:
        if version > 0:  # the starting model (v0) has no training state to restore: nothing is lost
            console.print(f"[yellow]checkpoint v{version} holds weights only (written by an older treeplay): the "
                          "optimizer, the learning-rate warm-up and the reference start again from it[/]")
        return None, None
    ref = meta["reference"]
    if ref["kind"] != "fixed":
        return None, ref.get("source")  # a refreshed reference is rebuilt from the policy
    if not ref.get("source"):
        raise ValueError(f"checkpoint {checkpoint} does not say which model its fixed reference is")
    path = uri_to_path(ref["source"])
    if not (path / "config.json").is_file():
        raise ValueError(f"checkpoint {checkpoint} trains against the reference model {path}, which is not "
                         "a model directory any more")
    return path, ref["source"]
