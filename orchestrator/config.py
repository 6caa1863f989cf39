"""Run configuration: pydantic models loaded from YAML, overridable as ``key=value``.

    cfg = load_config("configs/demo.yaml", ["iterations=3", "learner.dpo.beta=0.2"])

Every field is declared, documented and typed here; an unknown or ill-typed key is a ``ConfigError``
whose one-line message names the key (the CLI prints it and exits 2). The resolved config is stored
with the run without its credentials (``store.redact``), so ``treeplay resume`` rebuilds the same
thing from it, the store URL it is given, and any redacted value given again (``resume_config``).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from treeplay.agents.base import DemonstrationKind
from treeplay.agents.gateway.config import AgentConfig, load_callable
from treeplay.agents.panel import PanelConfig
from treeplay.agents.react import ReActConfig
from treeplay.learners.config import MAX_UPDATE_RATIO, DPOConfig, RFTConfig, SLHFConfig, TPOConfig
from treeplay.search.state import MCTSConfig
from treeplay.store.redact import REDACTED, is_secret_key, redact, redacted_keys


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(_Strict):
    """A random-init model built on the spot when ``model.path`` is unset: a Llama with the char
    tokenizer (the demo), or a Qwen2/Llama with a byte-level BPE tokenizer trained on the
    environments' text (``tokenizer: bpe``, engines/bpe.py; configs/real.yaml)."""

    tokenizer: Literal["char", "bpe"] = Field("char", description="char: one token per character; bpe: "
                                               "byte-level BPE trained here, merges across lines, ChatML.")
    arch: Literal["llama", "qwen2"] | None = Field(None, description="bpe only (char is always llama); "
                                                    "None: qwen2.")
    hidden_size: int = Field(128, ge=16, description="Model width.")
    num_layers: int = Field(4, ge=1, description="Transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Attention heads.")
    num_kv_heads: int | None = Field(None, ge=1, description="bpe: key/value heads (GQA); None: half the heads.")
    intermediate_size: int | None = Field(None, ge=1, description="MLP width; None: the builder's default.")
    vocab_size: int = Field(4096, ge=300, description="bpe: vocabulary size the tokenizer is trained to.")
    pretokenizer: Literal["none", "qwen2", "llama3"] = Field(
        "none", description="bpe: 'none' lets merges cross spaces, newlines and digits; 'qwen2' splits first as "
        "Qwen2 does (each digit alone, words whole), the only split a qwen2-architecture model loads back as "
        "trained; 'llama3' as Llama 3 does (digits in runs of three), for arch llama (engines/bpe.py).")
    max_positions: int = Field(128, ge=32, description="Context length (characters with char, tokens with bpe).")
    seed: int = Field(0, description="Seed of the random init (and of the tokenizer's corpus).")


class ModelConfig(_Strict):
    path: str | None = Field(None, description="Local Hugging Face directory; None builds a tiny model.")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)


# Constructor arguments an environment gets when the config names it without ``kwargs``. They belong
# to that name alone: a plug-in named without kwargs gets none (it used to inherit arithmetic's and
# fail on them).
DEFAULT_ENV_KWARGS: dict[str, dict[str, Any]] = {"arithmetic": {"ops": 1, "digits": 2}}


class EnvConfig(_Strict):
    name: str = Field("arithmetic", description="Built-in name, 'module:Class', or an entry point name.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Constructor arguments; omitted: the "
                                   "demo's for 'arithmetic' (ops 1, digits 2), none for any other environment.")

    @model_validator(mode="before")
    @classmethod
    def _defaults_of_the_named_environment(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kwargs" not in data:
            name = data.get("name", "arithmetic")
            defaults = DEFAULT_ENV_KWARGS.get(name, {}) if isinstance(name, str) else {}
            data = {**data, "kwargs": dict(defaults)}
        return data


class EngineConfig(_Strict):
    kind: Literal["hf", "vllm"] = Field("hf", description="Policy engine of the rollout workers.")
    num_threads: int | None = Field(1, description="torch threads per worker (CPU).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra engine arguments.")


class WarmStartConfig(_Strict):
    """Supervised warm start on the environment's demonstrations (before iteration 0)."""

    enabled: bool = True
    examples: int = Field(20000, ge=1, description="Train tasks the demonstrations are made from (arithmetic: "
                          "one example per task; toolqa: one per task for actions, several per step for "
                          "rubrics and verdicts).")
    demonstrations: dict[DemonstrationKind, float] = Field(
        default_factory=lambda: {"actions": 1.0}, min_length=1,
        description="Kinds of demonstrations in the warm start, each with its share of every batch, e.g. "
        "{actions: 0.5, rubrics: 0.25, verdicts: 0.25}: 'actions' (the next action of a solution; every "
        "environment with demonstrations), 'rubrics' and 'verdicts' (rubric-guided ReAct's rubric generator "
        "and verifier, for environments that list them, e.g. toolqa; agents/envs/toolqa.py).")
    steps: int = Field(500, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)

    @field_validator("demonstrations", mode="before")
    @classmethod
    def _list_is_equal_shares(cls, mix: Any) -> Any:
        # A list of kinds (the form before shares were a setting) mixes them in equal shares.
        if isinstance(mix, list):
            if len(set(mix)) != len(mix):
                raise ValueError(f"demonstration kinds must be distinct, got {mix}")
            return dict.fromkeys(mix, 1.0)
        return mix

    @field_validator("demonstrations")
    @classmethod
    def _positive_shares(cls, mix: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in mix.items() if not (w > 0 and math.isfinite(w))}
        if bad:
            raise ValueError(f"each kind's share must be a positive number, got {bad}")
        return mix

    @model_validator(mode="after")
    def _one_of_each_kind_per_batch(self) -> WarmStartConfig:
        if len(self.demonstrations) > self.batch_size:
            raise ValueError(f"batch_size {self.batch_size} cannot hold one example of each of "
                             f"{len(self.demonstrations)} kinds of demonstrations")
        return self


# A panel peer model that only `treeplay study` builds (orchestrator/study.py resolves it to a directory).
# Methods that docs/evidence.md has not shown to beat rejection-sampling fine-tuning (RFT) on held-out
# tasks at the scale it measured. They run and are tested; a run that uses one says so when it starts,
# and the CLI's help lists them. Keyed by config field, then value: the one-line finding.
EXPERIMENTAL: dict[str, dict[str, str]] = {
    "rollout.mode": {
        "mcts": "MCTS-DPO step pairs: +1.3 T=1 points vs RFT, interval [-2.4, +5.1] (not shown to beat it)",
        "react": "rubric-guided ReAct: no update at all on the tool task (its rubric loop solved no episode)",
        "panel": "panels of peers: no panel cell beat RFT or no update",
        "multi_agent": "credit re-assignment: below RFT (-1.1 T=1 points)",
        "agent": "search over agent programs: runs end to end; no study of what it learns yet",
    },
    "learner.algorithm": {
        "tpo": "TPO: -0.6 T=1 points vs RFT (not shown to beat it)",
        "slhf": "SLHF: below outcome-DPO and RFT on the demo task",
    },
}


def experimental_notes(cfg: Any) -> list[str]:
    """One line per experimental method ``cfg`` uses (``EXPERIMENTAL``), e.g. for the start of a run."""
    notes = []
    for key, findings in EXPERIMENTAL.items():
        value = _lookup(cfg.model_dump(), key)
        if value in findings:
            notes.append(f"{key}={value} is experimental: {findings[value]} (docs/evidence.md)")
    return notes


STUDY_PEER_PREFIX = "study-warm:"


class PanelPeerConfig(_Strict):
    """A panel member (panel mode): a name and, if it is a different model, its own checkpoint."""

    name: str = Field(..., min_length=1, description="Recorded as the author and judge name.")
    model_path: str | None = Field(
        None, description="Local Hugging Face directory of this peer's model, read on each rollout worker's "
        "machine (unlike model.path); the peer gets its own engine, built like the worker's, and its weights "
        "are never updated. None: the policy being trained. In a study, 'study-warm:seed+N[,steps=S]' names a "
        "model the study warm-starts itself (orchestrator/study.py).")


class RolloutConfig(_Strict):
    mode: Literal["mcts", "sample", "react", "panel", "multi_agent", "agent"] = Field(
        "mcts", description="agent: an agent program of your own, talking to the policy through an "
        "OpenAI-compatible gateway, searched over (rollout.agent; docs/agents.md).")
    agent: AgentConfig | None = Field(
        None, description="agent mode: the program ('package.module:function') and its search (sample or tree).")
    tasks_per_iteration: int = Field(1024, ge=1)
    chunk_size: int = Field(128, ge=1, description="Tasks sent to a worker at a time (streamed back).")
    num_workers: int = Field(1, ge=1, description="Rollout worker actors.")
    chunks_per_worker: int = Field(
        2, ge=1, description="Chunks queued on one worker at a time. With 2 a worker starts its next chunk "
        "the moment one ends instead of idling while the driver takes the results and sends another. New "
        "weights still arrive only between chunks: a worker that must change version is sent no chunk until "
        "it has. 1: one chunk at a time.")
    max_staleness: int = Field(
        0, ge=0, description="How many weights versions the learner's data may lag behind it. 0: synchronous "
        "(rollout, learn, evaluate in turn). k > 0: pipelined; the rollouts of iteration i+1 start while the "
        "learner trains on iteration i's, workers take new weights between chunks, evaluation runs on an "
        "actor of its own, and the learner refuses data more than k versions old (docs/architecture.md).")
    samples_per_task: int = Field(8, ge=1, description="'sample' mode: completions per task.")
    max_steps: int = Field(8, ge=1, description="Agent modes: step limit per episode.")
    max_step_tokens: int = Field(24, ge=1)
    num_agents: int = Field(3, ge=1, description="multi_agent / panel: agents or peers.")
    critic: Literal["policy", "step_check", "uniform"] = Field(
        "policy", description="multi_agent credit: a critic re-assigns it (the policy itself, or the env's exact "
        "step check), or 'uniform': no critic and no clumsy negatives, every executed step gets the episode's "
        "outcome (the baseline re-assignment is measured against; agents/credit.py).")
    temperature: float = Field(1.0, ge=0)
    react: ReActConfig = Field(default_factory=ReActConfig, description="react mode (agents/react.py).")
    panel: PanelConfig = Field(default_factory=PanelConfig, description="panel mode (agents/panel.py).")
    panel_peers: list[PanelPeerConfig] = Field(
        default_factory=list, description="panel mode: the peers, e.g. [{name: self}, {name: qwen, model_path: "
        "/models/qwen}]; empty: num_agents peers on the policy being trained.")
    pair_filter_incorrect: bool = Field(True, description="MCTS-DPO --filter: drop trees whose answer is wrong.")
    max_pairs_per_tree: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _agent_named(self) -> RolloutConfig:
        if self.mode == "agent":
            if self.agent is None:
                raise ValueError("rollout.mode 'agent' needs rollout.agent.entry, e.g. 'mypkg.agent:run'")
            load_callable(self.agent.entry, "rollout.agent.entry")  # fails here, before any store write
            if self.agent.reward:
                load_callable(self.agent.reward, "rollout.agent.reward")
        return self

    @field_validator("panel_peers")
    @classmethod
    def _distinct_peer_names(cls, peers: list[PanelPeerConfig]) -> list[PanelPeerConfig]:
        names = [p.name for p in peers]
        if len(set(names)) != len(names):
            raise ValueError(f"panel peer names must be distinct, got {names}")
        taken = {"exact", "panel"} & set(names)  # the exact-answer judge's and the aggregate's names
        if taken:
            raise ValueError(f"panel peer name {sorted(taken)[0]!r} is reserved")
        return peers


def _demo_dpo() -> DPOConfig:
    # docs/tiny-models.md: on tiny models plain DPO on self-generated pairs stalls; DPO + NLL on the
    # chosen response (iterative RPO) learns. lr 1e-4, beta 0.1, batch 16, reference = policy at round start.
    # A short learning-rate warm-up: without it the first iteration's updates (fresh Adam moments)
    # often cost several points of accuracy before later iterations recover (docs/demo.md).
    return DPOConfig(loss_type="mcts_dpo", nll_weight=1.0, lr=1e-4, beta=0.1, batch_size=16,
                     reference="refresh", num_threads=1, warmup_steps=20)


class LearnerSection(_Strict):
    """Which learner runs, on which data, with its own settings (learners/)."""

    algorithm: Literal["dpo", "tpo", "slhf", "rft"] = Field(
        "dpo", description="Learner of the run; 'rft' = rejection-sampling fine-tuning (the baseline).")
    replay: int = Field(0, ge=0, description="Also train on the data of this many past iterations.")
    max_update_ratio: float = Field(
        MAX_UPDATE_RATIO, gt=0, description="An iteration whose weights moved by more than this many times their own "
        "norm is not deployed (its losses can all be finite while the weights run off to huge values).")
    control: Literal["none", "shuffle"] = Field(
        "none", description="'shuffle': swap chosen/rejected of each pair by a coin flip before training, "
        "a control run without verifier signal (docs/tiny-models.md: such a run must gain far less).")
    dpo: DPOConfig = Field(default_factory=_demo_dpo, description="DPO family (sigmoid, IPO, MCTS-DPO, SimPO).")
    tpo: TPOConfig = Field(default_factory=lambda: TPOConfig(num_threads=1, reference="refresh"),
                           description="TPO on ranked lists (docs/learners.md).")
    slhf: SLHFConfig = Field(default_factory=lambda: SLHFConfig(num_threads=1),
                             description="Stackelberg leader/follower; the oracle is the env's verifier.")
    rft: RFTConfig = Field(default_factory=lambda: RFTConfig(num_threads=1, lr=1e-4, batch_size=16, warmup_steps=20),
                           description="NLL on verified-correct responses (ranked lists' info['correct']).")


class EvalConfig(_Strict):
    tasks: int = Field(500, ge=0, description="Held-out tasks evaluated each iteration.")
    sample_temperature: float = Field(1.0, ge=0, description="Also report accuracy of samples at this T.")
    split: Literal["test", "validation"] = Field(
        "test", description="Held-out split: 'validation' to choose settings, 'test' to report them (once).")
    agent: Literal["plain", "react", "program"] = Field(
        "plain", description="How a held-out episode is played. plain: the policy alone, prompted with the "
        "transcript of the question and its steps (rollout.max_steps, rollout.max_step_tokens). react: the ReAct "
        "agent with rollout.react's settings (with rubrics on: rubric, act, verify, retry once, the policy "
        "writing all of them), its actions at the evaluation's temperature: Co-ReAct's inference-time guidance. "
        "program: the agent program of rollout.agent, through a gateway that samples every call at the "
        "evaluation's temperature, scored as its rollouts are (docs/agents.md).")
    refine_rounds: int = Field(
        0, ge=0, description="SLHF's inference-time refinement: score each held-out answer after this many "
        "follower rounds (the learner's follower prompt, on the rollout engine, at the evaluation's temperature). "
        "0: the policy's own answer. Needs learner.algorithm=slhf.")


class StoreConfig(_Strict):
    url: str = Field("sqlite:///runs/treeplay.db", description="sqlite:///path or postgresql://...")


class RayConfig(_Strict):
    address: str | None = Field(None, description="None starts a local cluster; 'auto' joins one.")
    num_cpus: int | None = Field(None, description="CPUs of a local cluster (None = all).")
    worker_num_cpus: float = Field(1.0, ge=0)
    worker_num_gpus: float = Field(0.0, ge=0)
    learner_num_cpus: float = Field(1.0, ge=0)
    learner_num_gpus: float = Field(0.0, ge=0)
    evaluator_num_cpus: float = Field(
        0.0, ge=0, description="Pipelined runs: the evaluator actor's CPUs. It takes turns with the learner "
        "(evaluate after each update), so by default it asks for none and shares the learner's.")
    evaluator_num_gpus: float = Field(0.0, ge=0, description="Pipelined runs: the evaluator actor's GPUs "
                                      "(a vLLM or GPU engine needs some; it sits in the learner's bundle).")
    startup_timeout_s: float = Field(600.0, gt=0, description="Actors must be up within this (model load included).")
    wait_for_autoscaler: bool = Field(
        False, description="True on a cluster whose autoscaler adds nodes on demand (ray_cluster.yaml): a run "
        "that asks for more than the nodes already up waits for new ones. False: such a run is refused at "
        "once, before anything is written, with what it asked for and what the cluster has "
        "(orchestrator/placement.py, check_placeable).")
    lane_nice: int = Field(
        10, ge=0, le=19, description="Pipelined runs: how much lower the CPU priority (Unix nice) of the learner, "
        "the evaluator and the driver's store writer is than the rollout workers'. Rollouts are the critical "
        "path of a pipelined iteration; where these processes share cores with them, the rollouts keep their "
        "share and the rest runs in what is left. 0: no change. Synchronous runs never lower it.")


class WandbConfig(_Strict):
    """A Weights & Biases run that mirrors the iterations (needs the ``wandb`` package and a login)."""

    project: str = Field(..., min_length=1, description="W&B project the run is logged to.")
    entity: str | None = Field(None, description="W&B team or user; None: the login's default.")
    tags: list[str] = Field(default_factory=list, description="Tags of the W&B run.")
    mode: Literal["online", "offline"] = Field("online", description="offline: write locally, `wandb sync` later.")
    run_id: str | None = Field(
        None, description="W&B run id; None: one derived from the store and the run, so a resumed run "
        "goes on logging into the same W&B run.")


class MLflowConfig(_Strict):
    """An MLflow run that mirrors the iterations (needs the ``mlflow`` package)."""

    tracking_uri: str | None = Field(None, description="MLflow tracking server or store, e.g. http://host:5000 "
                                     "or file:///path/mlruns; None: MLflow's own default (MLFLOW_TRACKING_URI).")
    experiment: str = Field("treeplay", min_length=1, description="MLflow experiment; made if it does not exist.")


class TrackingConfig(_Strict):
    """Experiment trackers that mirror each finished iteration's metrics (orchestrator/tracking.py).

    The store stays the record: a tracker only copies what the store holds, a tracker that fails while
    the run goes on is switched off with a warning, and the run never reads anything back from one.
    """

    tensorboard: str | None = Field(
        None, description="Folder of TensorBoard logs; each run writes to <folder>/<run name> (needs the "
        "'tensorboard' package: pip install 'treeplay[tracking]'). None: no TensorBoard logs.")
    wandb: WandbConfig | None = Field(None, description="Weights & Biases; None: off.")
    mlflow: MLflowConfig | None = Field(None, description="MLflow; None: off.")


def _demo_search() -> MCTSConfig:
    # The demo's tasks are one step deep: a wide root (8 samples, all kept) is where the pairs come
    # from; steps are short lines.
    return MCTSConfig(iterations=2, first_root_multiplier=1, root_width=8, width=4, breadth_limit=8,
                      max_step_tokens=12)


class RunConfig(_Strict):
    """One self-improvement run. The defaults ARE the demo (configs/demo.yaml spells them out)."""

    name: str = Field("demo", description="Run name; a taken name gets a numeric suffix.")
    seed: int = 0
    iterations: int = Field(20, ge=0)
    output_dir: str = Field("runs", description="Where models, checkpoints and plots go.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    warm_start: WarmStartConfig = Field(default_factory=WarmStartConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    search: MCTSConfig = Field(default_factory=_demo_search, description="MCTS settings (docs/search.md).")
    learner: LearnerSection = Field(default_factory=LearnerSection)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig,
                                     description="Dashboards that mirror the metrics (docs/tracking.md).")


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    if err["type"] == "extra_forbidden":
        return f"unknown config key '{key}'"
    # An error message must not echo a credential back into a terminal or a log.
    shown = REDACTED if any(is_secret_key(str(p)) for p in err["loc"]) else redact(err.get("input"))
    return f"config key '{key}': {err['msg']} (got {shown!r})"


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted ``key=value`` pairs in a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}' has an empty key part")
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{key}': '{p}' is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{key}': value {raw!r} is not valid YAML") from e
    return data


def with_defaults(default: BaseModel, given: dict[str, Any]) -> dict[str, Any]:
    """``given`` with every key it leaves out taken from ``default`` (RunConfig's documented values).

    A section written partly (``learner: {dpo: {lr: 3.0e-5}}``, or the override ``learner.dpo.lr=3e-5``
    with no config file) keeps the rest of that section as documented here (the demo's MCTS-DPO
    settings), not the section class's own defaults, which differ (a plain sigmoid DPO). Free-form
    mappings (``env.kwargs``, ``engine.kwargs``) are never filled in: they belong to what the section
    names (an environment's constructor arguments are its own).
    """
    out = dict(given)
    for name in type(default).model_fields:
        value = getattr(default, name)
        if name in given:
            if isinstance(value, BaseModel) and isinstance(given[name], dict):
                out[name] = with_defaults(value, given[name])
        elif isinstance(value, BaseModel):
            out[name] = value.model_dump(mode="python")
        elif not isinstance(value, dict):
            out[name] = copy.deepcopy(value)
    return out


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    try:
        cfg = RunConfig.model_validate(with_defaults(RunConfig(), data))
    except ValidationError as e:
        raise ConfigError(_first_error(e)) from None
    if cfg.eval.refine_rounds and cfg.learner.algorithm != "slhf":
        raise ConfigError(f"config key 'eval.refine_rounds': follower refinement needs learner.algorithm=slhf "
                          f"(got {cfg.learner.algorithm!r})")
    if cfg.eval.agent == "program" and cfg.rollout.agent is None:
        raise ConfigError("config key 'eval.agent': 'program' evaluates the agent program of rollout.agent, "
                          "which this config does not name")
    if cfg.eval.refine_rounds and cfg.eval.agent != "plain":
        raise ConfigError("config key 'eval.refine_rounds': follower refinement refines plain episodes; "
                          f"it cannot follow eval.agent={cfg.eval.agent!r}")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {str(e).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping at the top level")
        data = loaded or {}
    return config_from_dict(apply_overrides(data, list(overrides or [])))


def _lookup(data: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def resume_config(stored: dict[str, Any], store_url: str, overrides: list[str] | None = None) -> RunConfig:
    """The config a stored run is resumed with: the stored (redacted) config, the URL of the store it
    is resumed from, and ``key=value`` overrides that give the redacted values again.

    Only keys whose stored value was redacted, and URLs (they lost their passwords), can be given;
    anything else would make the resumed run differ from the one that started.

    Raises:
        ConfigError: An override of another key or of ``store.url``, or a redacted value left out.
    """
    if not isinstance(stored, dict):
        raise ConfigError(f"the stored run config must be a mapping, got {type(stored).__name__}")
    wanted = set(redacted_keys(stored))
    given: set[str] = set()
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        if key == "store.url":
            raise ConfigError("override 'store.url': a run is resumed from the store named by --db "
                              "(or TREEPLAY_STORE_URL), not by an override")
        value = _lookup(stored, key)
        if key not in wanted and not (isinstance(value, str) and "://" in value):
            allowed = ", ".join(sorted(wanted)) or "none"
            raise ConfigError(f"override '{key}': a resumed run keeps its stored config; only redacted "
                              f"values (here: {allowed}) and URLs can be given again")
        given.add(key)
    missing = sorted(wanted - given)
    if missing:
        raise ConfigError(f"the run's config was stored with {', '.join(missing)} redacted; give "
                          f"{'it' if len(missing) == 1 else 'them'} again: treeplay resume RUN "
                          + " ".join(f"{k}=..." for k in missing))
    data = apply_overrides(copy.deepcopy(stored), list(overrides or []))
    data.setdefault("store", {})["url"] = store_url
    return config_from_dict(data)
