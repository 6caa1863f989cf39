"""Studies: every method against its baselines, over seeds, with intervals — ``treeplay study``.

    treeplay study configs/studies/quick.yaml
    treeplay study configs/studies/evidence.yaml eval.tasks=300     # KEY=VALUE for every run

A study file names a base run config, overrides for all runs, the seeds, and the cells (a method on
a task: a name, labels, and the overrides that make it). Every (cell, seed) is an ordinary run in
the store, named ``<study>-<cell>-s<seed>`` (so ``treeplay serve`` shows them); seed ``s`` sets
``seed`` and the tiny model's init seed. Runs of one seed with the same model, environment and
warm-start settings start from ONE warm-started model (built once under ``runs/<study>/warm/``), so
cells differ only in what they are meant to differ in. A panel peer's ``model_path`` may be
``study-warm:seed+N[,steps=S]``: a different model the study warm-starts there too (init seed and
seed raised by N, warm-start length S), once per seed and peer (``study_peers``). Running a study
again resumes it: finished runs are kept, interrupted ones are resumed, missing ones are started.

Results go to ``runs/<study>/``: ``results.json`` (per cell: held-out greedy and T=1 accuracy
before/after per seed, the gains' mean and 95% t-interval over seeds, the paired difference to the
reference cell, generated tokens per iteration, wall time), ``table.md`` and ``curves.png``
(held-out accuracy per iteration, a line per cell, a band over seeds). The command prints the table
and ends with one JSON line.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import math
import platform
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from treeplay.orchestrator.config import STUDY_PEER_PREFIX, ConfigError, RunConfig, load_config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CellConfig(_Strict):
    """One row of the study: a method on a task."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Unique, used in run names.")
    method: str = Field(..., min_length=1, description="What the table calls the method.")
    task: str = Field("", description="What the table calls the task.")
    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE on top of the study's.")


class StudyConfig(_Strict):
    """A study file (YAML)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    base: str | None = Field(None, description="Run config the cells start from (relative to the study file).")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE for every run.")
    reference: str | None = Field(
        None, description="Cell the others are compared with, seed by seed (paired difference of T=1 accuracy)."
    )
    cells: list[CellConfig] = Field(..., min_length=1)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("seeds must be distinct")
        return v

    @model_validator(mode="after")
    def _cells(self) -> StudyConfig:
        names = [c.name for c in self.cells]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"cell names must be distinct; repeated: {', '.join(dup)}")
        if self.reference is not None and self.reference not in names:
            raise ValueError(f"reference '{self.reference}' is not a cell (cells: {', '.join(names)})")
        return self


def load_study(path: str | Path, overrides: Sequence[str] = (), name: str | None = None
               ) -> tuple[StudyConfig, dict[tuple[str, int], RunConfig]]:
    """Read a study file and resolve every run's config (validated before anything runs); ``name``
    replaces the file's study name (its runs' names and its output directory follow).

    Returns:
        The study and ``{(cell, seed): RunConfig}``.

    Raises:
        ConfigError: An unreadable or invalid study file, or a run config that does not resolve
            (the message names the cell and the key).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read study file '{path}': {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"study file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    try:
        if name is not None and isinstance(raw, dict):
            raw = {**raw, "name": name}
        study = StudyConfig.model_validate(raw or {})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"study file '{path}': {where}: {msg}") from None
    base = None
    if study.base:
        base = Path(study.base) if Path(study.base).is_absolute() else path.parent / study.base
        if not base.is_file():
            raise ConfigError(f"study file '{path}': base config '{study.base}' not found (looked at {base})")
    runs: dict[tuple[str, int], RunConfig] = {}
    for cell in study.cells:
        for seed in study.seeds:
            extra = [*study.overrides, *cell.overrides, *overrides,
                     f"seed={seed}", f"model.tiny.seed={seed}", f"name={run_name(study, cell.name, seed)}"]
            try:
                runs[(cell.name, seed)] = cfg = load_config(base, extra)
                for peer in cfg.rollout.panel_peers:
                    study_peer_config(cfg, peer.name, peer.model_path)
            except (ConfigError, ValueError) as e:
                raise ConfigError(f"cell '{cell.name}': {e}") from None
    return study, runs


def run_name(study: StudyConfig, cell: str, seed: int) -> str:
    return f"{study.name}-{cell}-s{seed}"


def study_dir(study: StudyConfig, runs: dict[tuple[str, int], RunConfig]) -> Path:
    first = next(iter(runs.values()))
    return Path(first.output_dir) / study.name


# ------------------------------------------------------------------------------------------- running
def _warm_key(cfg: RunConfig) -> str:
    """What a warm-started model depends on: same key, same model.

    Demonstrations other than actions are ReAct prompts, rendered with ``rollout.react``'s settings,
    which then join the key. The default mix (actions alone) is left out of it, so the keys of
    studies written before the mix was a setting still find their models.
    """
    warm = cfg.warm_start.model_dump(mode="json")
    if warm["demonstrations"] == {"actions": 1.0}:
        del warm["demonstrations"]
    parts = {"model": cfg.model.model_dump(mode="json"), "env": cfg.env.model_dump(mode="json"),
             "warm_start": warm, "seed": cfg.seed, "threads": cfg.engine.num_threads}
    if "demonstrations" in warm:
        react = cfg.rollout.react
        parts["react"] = {"instructions": react.instructions, "tools_text": react.tools_text,
                          "max_prompt_chars": react.max_prompt_chars, "max_steps": react.max_steps,
                          "verify_threshold": react.verify_threshold}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _warm_model(cfg: RunConfig, root: Path, built: dict[str, Path]) -> Path:
    """The study's warm-started tiny model for ``cfg`` (model, env, warm start, seed): built under
    ``root/warm/<key>/`` on first use, found there (``DONE``) or in ``built`` afterwards."""
    from treeplay.orchestrator.run_start import console, warm_start_model

    key = _warm_key(cfg)
    if key not in built:
        where = root / "warm" / key
        model = where / "model-v0"
        if not (where / "DONE").is_file():
            console.print(f"study: warm-starting a shared model for seed {cfg.seed} ({key})")
            model, _ = warm_start_model(cfg, where)
            (where / "DONE").write_text(str(model))
        built[key] = Path(model).resolve()
    return built[key]


def shared_start(cfg: RunConfig, root: Path, built: dict[str, Path]) -> RunConfig:
    """``cfg`` starting from the study's shared warm-started model for its seed (built on first use),
    its ``study-warm:`` panel peers resolved to their own models (``study_peers``).

    A config with its own ``model.path`` keeps it.
    """
    cfg = study_peers(cfg, root, built)
    if cfg.model.path:
        return cfg
    data = cfg.model_dump(mode="json")
    data["model"]["path"] = str(_warm_model(cfg, root, built))
    data["warm_start"]["enabled"] = False
    return RunConfig.model_validate(data)


# A panel peer the study warm-starts itself: init seed (and seed) raised by N, warm-start length S.
_STUDY_PEER = re.compile(r"seed\+(\d+)(?:,steps=(\d+))?")


def study_peer_config(cfg: RunConfig, name: str, model_path: str | None) -> RunConfig | None:
    """The run config whose warm start is panel peer ``name``'s model, or None when ``model_path``
    is not a ``study-warm:seed+N[,steps=S]`` spelling (a directory, or None: the policy).

    Raises:
        ValueError: A bad spelling, a peer that would be the policy's own start (N = 0 and the same
            warm-start length), or a policy that is not a tiny model the study builds (one line).
    """
    if model_path is None or not model_path.startswith(STUDY_PEER_PREFIX):
        return None
    where = f"rollout.panel_peers: peer '{name}' has model_path '{model_path}'"
    m = _STUDY_PEER.fullmatch(model_path.removeprefix(STUDY_PEER_PREFIX))
    if m is None:
        raise ValueError(f"{where}; expected '{STUDY_PEER_PREFIX}seed+N' or '{STUDY_PEER_PREFIX}seed+N,steps=S'")
    if cfg.model.path:
        raise ValueError(f"{where}, but the policy is model.path '{cfg.model.path}', not a tiny model the study builds")
    offset, steps = int(m[1]), None if m[2] is None else int(m[2])
    own = cfg.warm_start.steps if cfg.warm_start.enabled else 0
    if offset == 0 and (steps is None or steps == own):
        raise ValueError(f"{where}: that is the policy's own warm start; raise the seed (seed+N, N >= 1) "
                         "or give another length (steps=S)")
    data = cfg.model_dump(mode="json")
    data["seed"] = cfg.seed + offset
    data["model"]["tiny"]["seed"] = cfg.model.tiny.seed + offset
    if steps is not None:
        data["warm_start"].update(enabled=steps > 0, steps=steps)
    return RunConfig.model_validate(data)


def study_peers(cfg: RunConfig, root: Path, built: dict[str, Path]) -> RunConfig:
    """``cfg`` with each ``study-warm:`` panel peer's ``model_path`` replaced by the model the study
    warm-started for it (built on first use under ``root/warm/``, like the policy's, and shared by
    every cell of the seed that names the same peer)."""
    peers = cfg.rollout.panel_peers
    resolved = [(p, study_peer_config(cfg, p.name, p.model_path)) for p in peers]
    if all(peer_cfg is None for _, peer_cfg in resolved):
        return cfg
    data = cfg.model_dump(mode="json")
    data["rollout"]["panel_peers"] = [
        {**p.model_dump(mode="json"), **({} if pc is None else {"model_path": str(_warm_model(pc, root, built))})}
        for p, pc in resolved
    ]
    return RunConfig.model_validate(data)


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Dotted keys at which two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where or "(the whole config)"]


def config_drift(stored: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Keys at which a run already in the store differs from the run the study asks for now.

    The stored config is read with today's schema first (a key added since then is its default);
    both sides are redacted as the store redacts them. Left out: what the study itself writes in
    when it starts a run (``model.path`` and ``warm_start.enabled`` of the shared warm start, the
    peers' resolved ``model_path``) and the store URL (stored without its password).
    """
    from treeplay.orchestrator.config import config_from_dict
    from treeplay.store.redact import redact

    def comparable(data: dict[str, Any]) -> dict[str, Any]:
        data = redact(data)  # a copy
        data.get("model", {}).pop("path", None)
        data.get("warm_start", {}).pop("enabled", None)
        data.get("store", {}).pop("url", None)
        for peer in data.get("rollout", {}).get("panel_peers") or []:
            if isinstance(peer, dict):
                peer.pop("model_path", None)
        return data

    try:  # read with today's schema: keys added since the run started take their defaults
        have = comparable(config_from_dict(copy.deepcopy(stored)).model_dump(mode="json"))
    except (ConfigError, ValueError, TypeError):
        have = comparable(stored if isinstance(stored, dict) else {})
    return _differences(have, comparable(cfg.model_dump(mode="json")))


def check_existing_runs(runs: dict[tuple[str, int], RunConfig]) -> None:
    """Refuse, before anything runs, a study whose runs are already in the store with another config
    (e.g. a validation pass of the same study file: its finished runs would be kept as the test's).

    Raises:
        ConfigError: The first such run and the keys that differ (one line).
    """
    from treeplay.store import queries
    from treeplay.store.database import open_store

    for url in dict.fromkeys(cfg.store.url for cfg in runs.values()):
        with open_store(url) as store:
            stored = {r.name: r for r in queries.list_runs(store)}
        for cfg in runs.values():
            if cfg.store.url != url or cfg.name not in stored:
                continue
            drift = config_drift(stored[cfg.name].config, cfg)
            if drift:
                shown = ", ".join(drift[:4]) + (f" and {len(drift) - 4} more" if len(drift) > 4 else "")
                raise ConfigError(f"run '{cfg.name}' is already in the store with another config ({shown}); "
                                  "run the study under another name (--name) or delete that run first")


def run_study(study: StudyConfig, runs: dict[tuple[str, int], RunConfig]) -> dict[str, Any]:
    """Run (or finish) every run of the study, then summarise it into ``runs/<study>/``.

    Returns:
        The results (what ``results.json`` holds).
    """
    from treeplay.orchestrator.loop import launch_run, resume_run
    from treeplay.orchestrator.run_start import console
    from treeplay.store import queries
    from treeplay.store.database import open_store

    check_existing_runs(runs)
    root = study_dir(study, runs)
    root.mkdir(parents=True, exist_ok=True)
    built: dict[str, Path] = {}
    failures: dict[str, str] = {}
    total = len(runs)
    for k, cfg in enumerate(runs.values(), 1):
        name = cfg.name
        store = open_store(cfg.store.url)
        existing = {r.name: r for r in queries.list_runs(store)}.get(name)
        try:
            if existing is not None and existing.status == "done":
                console.print(f"study [{k}/{total}] {name}: done earlier, kept")
                continue
            if existing is not None:
                console.print(f"study [{k}/{total}] {name}: {existing.status}, resuming")
                resume_run(name, cfg.store.url)
            else:
                console.print(f"study [{k}/{total}] {name}: starting")
                launch_run(shared_start(cfg, root, built))
        except Exception as e:  # noqa: BLE001 - one failed run must not lose the others; it is reported
            failures[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            console.print(f"[red]study: run {name} failed: {failures[name]}[/]")
    results = summarise(study, runs, failures)
    write_outputs(study, root, results)
    return results


# -------------------------------------------------------------------------------------------- numbers
# Two-sided 95% quantiles of Student's t by degrees of freedom (1.96 beyond the table).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def t95(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (rounded down to the table)."""
    keys = [k for k in _T95 if k <= df]
    return _T95[max(keys)] if df <= 30 else 1.96


def interval(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and 95% t-interval of ``values`` (no interval for fewer than two)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": len(vals)}
    half = t95(len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": len(vals)}


def _run_figures(store: Any, name: str) -> dict[str, Any] | None:
    from treeplay.store import queries

    try:
        info = queries.get_run(store, name)
    except Exception:  # noqa: BLE001 - a run that never started has no figures
        return None
    series = queries.metric_series(store, info.id)

    def points(key: str) -> list[tuple[int, float]]:
        return [(int(i), float(v)) for i, v in series.get(key, [])]

    greedy, sample = points("eval/accuracy_greedy"), points("eval/accuracy_sample")
    tokens = [v for _, v in points("rollout/generated_tokens")]
    seconds = None
    if info.finished is not None and info.created is not None:
        seconds = (info.finished - info.created).total_seconds()
    return {
        "run": info.name, "run_id": info.id, "status": info.status,
        "greedy_before": greedy[0][1] if greedy else None, "greedy_after": greedy[-1][1] if greedy else None,
        "sample_before": sample[0][1] if sample else None, "sample_after": sample[-1][1] if sample else None,
        "greedy_curve": greedy, "sample_curve": sample,
        "tokens_per_iteration": statistics.fmean(tokens) if tokens else 0.0,
        "iterations": len(tokens), "seconds": seconds,
    }


def summarise(study: StudyConfig, runs: dict[tuple[str, int], RunConfig], failures: dict[str, str] | None = None) -> dict[str, Any]:
    """Per-cell figures over seeds, read back from the store."""
    from treeplay.store.database import open_store

    failures = failures or {}
    stores: dict[str, Any] = {}
    per_run: dict[tuple[str, int], dict[str, Any] | None] = {}
    for key, cfg in runs.items():
        store = stores.setdefault(cfg.store.url, open_store(cfg.store.url))
        per_run[key] = _run_figures(store, cfg.name)

    def done(fig: dict[str, Any] | None) -> bool:
        return fig is not None and fig["status"] == "done" and fig["sample_after"] is not None

    ref = study.reference
    cells = []
    for cell in study.cells:
        figs = [(seed, per_run[(cell.name, seed)]) for seed in study.seeds]
        ok = [(s, f) for s, f in figs if done(f)]
        gain_g = [f["greedy_after"] - f["greedy_before"] for _, f in ok]
        gain_s = [f["sample_after"] - f["sample_before"] for _, f in ok]
        row: dict[str, Any] = {
            "name": cell.name, "method": cell.method, "task": cell.task,
            "seeds": [s for s, _ in ok],
            "greedy_before": interval([f["greedy_before"] for _, f in ok]),
            "greedy_after": interval([f["greedy_after"] for _, f in ok]),
            "sample_before": interval([f["sample_before"] for _, f in ok]),
            "sample_after": interval([f["sample_after"] for _, f in ok]),
            "greedy_gain": interval(gain_g), "sample_gain": interval(gain_s),
            "tokens_per_iteration": statistics.fmean([f["tokens_per_iteration"] for _, f in ok]) if ok else None,
            "seconds": statistics.fmean([f["seconds"] for _, f in ok if f["seconds"] is not None] or [math.nan]) if ok else None,
            "runs": [{"seed": s, **(f or {"status": "missing"}), "error": failures.get(runs[(cell.name, s)].name)}
                     for s, f in figs],
        }
        if ref is not None and cell.name != ref:
            diffs = []
            for s, f in ok:
                other = per_run[(ref, s)]
                if done(other):
                    diffs.append(f["sample_after"] - other["sample_after"])
            row["vs_reference"] = {"cell": ref, **interval(diffs)}
        cells.append(row)
    return {
        "study": study.name,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {_cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}",
        "seeds": study.seeds,
        "reference": ref,
        "failed_runs": failures,
        "cells": cells,
    }


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


# -------------------------------------------------------------------------------------------- outputs
def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _gain(iv: dict[str, Any]) -> str:
    if iv.get("mean") is None:
        return "—"
    text = f"{100 * iv['mean']:+.1f}"
    if iv.get("ci_low") is not None:
        text += f" [{100 * iv['ci_low']:+.1f}, {100 * iv['ci_high']:+.1f}]"
    return text


TABLE_HEADER = ("method", "task", "seeds", "greedy before→after", "greedy gain [95% CI]",
                "T=1 before→after", "T=1 gain [95% CI]", "T=1 vs reference", "tokens/iter", "wall s")


def table_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    """The table's rows (accuracy in percentage points)."""
    rows = []
    for c in results["cells"]:
        vs = c.get("vs_reference")
        rows.append((
            c["method"], c["task"], str(len(c["seeds"])),
            f"{_pct(c['greedy_before']['mean'])} → {_pct(c['greedy_after']['mean'])}", _gain(c["greedy_gain"]),
            f"{_pct(c['sample_before']['mean'])} → {_pct(c['sample_after']['mean'])}", _gain(c["sample_gain"]),
            _gain(vs) if vs else "(reference)" if results.get("reference") == c["name"] else "",
            "—" if c["tokens_per_iteration"] is None else f"{c['tokens_per_iteration']:,.0f}",
            "—" if c["seconds"] is None or not math.isfinite(c["seconds"]) else f"{c['seconds']:.0f}",
        ))
    return rows


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(results)]
    notes = [
        "",
        f"Study `{results['study']}`, seeds {results['seeds']}, {results['date']}, {results['machine']}.",
        "Accuracy on held-out tasks in percent; gains in points, mean over seeds with a 95% t-interval;",
        "'T=1 vs reference' is the paired difference of final T=1 accuracy to the reference cell, seed by seed.",
    ]
    if results.get("failed_runs"):
        notes.append("Failed runs: " + "; ".join(f"{k}: {v}" for k, v in results["failed_runs"].items()))
    return "\n".join(lines + notes) + "\n"


def plot_curves(results: dict[str, Any], path: Path) -> str | None:
    """Change of held-out accuracy from the warm start per iteration (greedy and T=1), in points: a
    line per cell (mean over seeds) and a min–max band over seeds.

    Seeds start from different warm-started models (their accuracy differs by tens of points), so
    each run is drawn relative to its own start; the table has the absolute figures.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    last = max((len(r.get("greedy_curve") or []) for c in results["cells"] for r in c["runs"]), default=1) - 1
    for ax, key, title in ((axes[0], "greedy_curve", "greedy"), (axes[1], "sample_curve", "T=1 samples")):
        for c in results["cells"]:
            curves = [r[key] for r in c["runs"] if r.get("status") == "done" and r.get(key)]
            if not curves:
                continue
            label = f"{c['method']} ({c['task']})" if c["task"] else c["method"]
            gains = [[(i + 1, 100 * (v - cur[0][1])) for i, v in cur] for cur in curves]
            xs = sorted({x for g in gains for x, _ in g})
            if xs == [0]:  # no update: the warm start all along
                ax.plot([0, max(last, 1)], [0, 0], ls="--", color="grey", label=label)
                continue
            by_x = {x: [v for g in gains for i, v in g if i == x] for x in xs}
            (line,) = ax.plot(xs, [statistics.fmean(by_x[x]) for x in xs], marker="o", ms=3, label=label)
            if len(curves) > 1:
                ax.fill_between(xs, [min(by_x[x]) for x in xs], [max(by_x[x]) for x in xs],
                                color=line.get_color(), alpha=0.12)
        ax.set_title(f"held-out accuracy, {title}: change from the warm start")
        ax.set_xlabel("policy version (0 = warm start)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axhline(0, color="black", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("points")
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(f"study {results['study']}: mean over seeds {results['seeds']}, band = min–max over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_outputs(study: StudyConfig, root: Path, results: dict[str, Any]) -> None:
    (root / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (root / "table.md").write_text(markdown_table(results), encoding="utf-8")
    results["plot"] = plot_curves(results, root / "curves.png")


def final_line(results: dict[str, Any]) -> str:
    """The one JSON line the command ends with."""
    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    cells = []
    for c in results["cells"]:
        g = c["sample_gain"]
        cell = {"name": c["name"], "method": c["method"], "task": c["task"], "seeds": len(c["seeds"]),
                "gain": r(g["mean"]), "ci_low": r(g["ci_low"]), "ci_high": r(g["ci_high"]),
                "greedy_gain": r(c["greedy_gain"]["mean"]), "tokens": r(c["tokens_per_iteration"])}
        if c.get("vs_reference"):
            v = c["vs_reference"]
            cell["vs_reference"] = {"cell": v["cell"], "diff": r(v["mean"]), "ci_low": r(v["ci_low"]), "ci_high": r(v["ci_high"])}
        cells.append(cell)
    return json.dumps({"study": results["study"], "cells": cells, "failed_runs": len(results["failed_runs"]),
                       "table": str(Path(results.get("plot") or "").with_name("table.md")) if results.get("plot") else None,
                       "plot": results.get("plot")})
