"""`analyze_run`: every analysis that applies to one archive, written back as ``derived/<name>.parquet``.

Owns which analyses apply to a run (and why one does not), the probe grid over (task, branch, layer, step) with
its cell metadata, and recording the resolved configuration in every table (parquet metadata, ``cos_config``).
The schemas of the tables are in docs/analysis.md. Numpy/pandas; torch only through the probe engine.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from .. import __version__
from ..archive import Archive
from .dynamics import DynamicsConfig, run_convergence, run_dynamics
from .features import FeatureSpec, instance_groups, label_names, load_cells, load_labels
from .memory import MEMORY_TASK, run_memory
from .probes import ProbeGrid
from .publish import publish
from .step_frames import frame_source, run_tasks, task_for

log = logging.getLogger(__name__)

ANALYSES = ("probes", "convergence", "dynamics", "memory")


@dataclass(frozen=True)
class AnalyzeConfig:
    """What `analyze_run` computes. `probe` holds `ProbeGrid` keyword arguments; `branches` None = all captured."""

    features: FeatureSpec = FeatureSpec()
    branches: tuple[str, ...] | None = None
    labels: tuple[str, ...] | None = None
    probe: dict[str, Any] = field(default_factory=dict)
    dynamics: DynamicsConfig = DynamicsConfig()

    def __post_init__(self) -> None:
        ProbeGrid(**self.probe)  # validates the probe hyper-parameters (ValueError names the bad one)


def applicability(archive: Archive, config: AnalyzeConfig = AnalyzeConfig()) -> dict[str, str | None]:
    """{analysis: None if it applies to this run, else the reason it does not}."""
    out: dict[str, str | None] = {}
    has_tasks = "task" in archive.samples and (archive.samples["task"].astype(str) != "").any()
    tasks = run_tasks(archive) if has_tasks else {}
    if not label_names(archive):
        out["probes"] = "no label_* columns in samples.parquet"
    elif config.features.site not in archive.sites:
        out["probes"] = f"site {config.features.site!r} not captured (captured: {archive.sites})"
    elif len(set(instance_groups(archive))) < 2:
        out["probes"] = "fewer than 2 task instances"
    else:
        out["probes"] = None
    out["convergence"] = None if "x0_hat" in archive.manifest["tensors"] else "x0_hat not captured"
    out["dynamics"] = "no task samples" if not tasks else None
    if tasks:
        try:
            for name in tasks:
                frame_source(archive, task_for(archive, name))
        except ValueError as err:
            out["dynamics"] = str(err)
    out["memory"] = out["dynamics"] or (None if MEMORY_TASK in tasks else "no memory-task samples")
    return out


def probe_grid(archive: Archive, config: AnalyzeConfig = AnalyzeConfig()) -> pd.DataFrame:
    """Probe accuracy for every (task, branch, layer, step) cell and label, with control and chance."""
    spec = config.features
    branches = config.branches or tuple(archive.site(spec.site)["branches"])
    table = archive.samples
    tasks = table["task"].astype(str) if "task" in table else pd.Series([""] * len(table))
    tables = []
    for task in sorted(tasks.unique()):
        samples = table["sample"][tasks == task].to_numpy()
        for subset, names in _label_subsets(archive, config, task, samples):
            labels = load_labels(archive, names, subset)
            usable = {k: v for k, v in labels.items() if len(np.unique(v)) > 1}
            for name in sorted(set(labels) - set(usable)):
                log.warning("task %r label %r has one class in this run; not probed", task, name)
            if not usable:
                continue
            groups = instance_groups(archive, subset)
            for branch in branches:
                x, cells = load_cells(archive, replace(spec, branch=branch), subset)
                grid = ProbeGrid(**config.probe).fit(x, usable, groups)
                cells = cells.assign(task=task, site=spec.site, reduction=spec.reduction, branch=branch,
                                     pool=spec.pool, frames=json.dumps(list(spec.frames) if spec.frames else None))
                tables.append(grid.table(cells))
    if not tables:
        raise ValueError(f"{archive.run_id}: no label has two classes in any task; nothing to probe")
    return pd.concat(tables, ignore_index=True)


def _label_subsets(archive: Archive, config: AnalyzeConfig, task: str, samples: np.ndarray
                   ) -> list[tuple[np.ndarray, list[str]]]:
    """[(samples, label names)] to probe for one task: instance labels on every sample of the task; each outcome
    label (`label_outcome_*`, read from the generated video) on the samples where the answer tells it."""
    table = archive.samples
    wanted = list(config.labels or label_names(archive))
    known = [n for n in wanted if table[f"label_{n}"].iloc[samples].notna().all()]
    outcome = [n for n in wanted if n.startswith("outcome_") and n not in known
               and table[f"label_{n}"].iloc[samples].notna().any()]
    if config.labels:
        missing = sorted(set(config.labels) - set(known) - set(outcome))
        if missing:
            raise ValueError(f"labels {missing} are missing for some samples of task {task!r} in {archive.run_id}")
    out = [(samples, known)] if known else []
    for name in outcome:
        told = samples[table[f"label_{name}"].iloc[samples].notna().to_numpy()]
        log.info("task %r: outcome label %r told by %d of %d samples", task, name, len(told), len(samples))
        out.append((told, [name]))
    if not out:
        log.info("task %r: no labels to probe", task)
    return out


def analyze_run(archive: Archive, which: Iterable[str] | None = None, config: AnalyzeConfig = AnalyzeConfig(), *,
                write: bool = True, progress: Callable[[Iterable], Iterable] = lambda it: it,
                command: list[str] | None = None) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """Compute (and write into ``derived/``) the analyses in `which` (None: every one that applies).

    Returns ({table name: table}, {analysis: reason skipped}). Naming an analysis that does not apply raises.
    `command` (the command line that asked for it) is recorded in every table's `cos_config`.
    """
    reasons = applicability(archive, config)
    if which is None:
        chosen = [a for a in ANALYSES if reasons[a] is None]
    else:
        chosen = list(which)
        unknown = [a for a in chosen if a not in ANALYSES]
        if unknown:
            raise ValueError(f"unknown analyses {unknown}; allowed: {list(ANALYSES)}")
        blocked = {a: reasons[a] for a in chosen if reasons[a] is not None}
        if blocked:
            raise ValueError(f"{archive.run_id}: cannot run " + "; ".join(f"{a}: {r}" for a, r in blocked.items()))
    tables: dict[str, pd.DataFrame] = {}
    for name in chosen:
        log.info("%s: %s", archive.run_id, name)
        if name == "probes":
            tables["probe_grid"] = probe_grid(archive, config)
        elif name == "convergence":
            tables.update(run_convergence(archive, config.dynamics, progress))
        elif name == "dynamics":
            tables.update(run_dynamics(archive, config.dynamics, progress))
        elif name == "memory":
            spec = config.features if reasons["probes"] is None else None
            tables.update(run_memory(archive, spec, config.probe, progress))
    resolved = {"cos_version": __version__, "run_id": archive.run_id, "analyses": chosen,
                "config": json.loads(json.dumps(asdict(config), default=str)), "command": command}
    for name, table in tables.items():
        table.attrs["cos_config"] = json.dumps({**resolved, "table": name}, sort_keys=True)
    if write and tables:
        publish(archive, tables, producer="cos analyze")  # one set: a kill leaves the old one whole
    return tables, {a: r for a, r in reasons.items() if a not in chosen and r is not None}
