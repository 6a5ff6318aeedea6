"""The archived tables a report reads, and how it prints their numbers: docs/findings.md's sources and formatting.

Owns `Table` (one `<run>.<table>.parquet` with the `cos_config` that says what made it, and whether its archive is
shipped or reproducible-only), `Sources` / `load` (the tables folder, the model card's eval.json) and the number
formats every claim uses (a rate with its interval, a distance, a markdown table, the citation line). The sections
themselves are `findings.py`. Pure pandas; must not import torch, experiments or plots.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[2]
TABLES = REPO / "tables"  # shipped tables the document cites: <run>.<table>.parquet
CARD = REPO / "models" / "organism" / "eval.json"
SHIPPED_RUNS = REPO / "cached_runs"
DOC = REPO / "docs" / "findings.md"
RESEARCH = "bash scripts/research_runs.sh"
MIN_INSTANCES = 30  # fewer instances than this: the table is shown, but no claim is drawn from it
GENERATOR = "python scripts/findings.py"


@dataclass
class Table:
    """One archived table: where it is, what made it (`cos_config` metadata) and its rows."""

    run: str
    name: str
    path: Path
    frame: pd.DataFrame
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def command(self) -> str:
        cmd = self.config.get("command")
        return " ".join(map(str, cmd)) if isinstance(cmd, list) else str(cmd or "(not recorded)")

    @property
    def archive(self) -> str:
        if (SHIPPED_RUNS / self.run / "manifest.json").is_file():
            return f"shipped (`cached_runs/{self.run}`)"
        return f"reproducible-only (`{RESEARCH}`)"


@dataclass
class Sources:
    tables: dict[tuple[str, str], Table]
    card: dict[str, Any] | None
    root: Path = REPO

    def named(self, name: str) -> list[Table]:
        return [t for (run, table), t in sorted(self.tables.items()) if table == name]

    def rel(self, path: Path) -> str:
        """`path` as the document cites it: relative to the repository, else to the tables folder's parent."""
        path = path.resolve()
        for root in (self.root, path.parent.parent):
            if path.is_relative_to(root):
                return path.relative_to(root).as_posix()
        return path.as_posix()


def load(tables: Path = TABLES, card: Path | None = CARD, root: Path = REPO) -> Sources:
    """Every `<run>.<table>.parquet` under `tables` and the model card (None when absent)."""
    out = {}
    for path in sorted(Path(tables).glob("*.parquet")) if Path(tables).is_dir() else []:
        run, _, name = path.stem.rpartition(".")
        if not run:
            raise ValueError(f"{path}: table files are named <run>.<table>.parquet")
        frame = pd.read_parquet(path)
        config = json.loads(frame.attrs.get("cos_config", "{}") or "{}")
        out[(run, name)] = Table(run, name, path, frame, config)
    record = json.loads(Path(card).read_text(encoding="utf-8")) if card and Path(card).is_file() else None
    return Sources(out, record, Path(root).resolve())


# ---- formatting ---------------------------------------------------------------------------------------------------
def pct(v: float) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{100 * v:.1f} %"


def rate(v: float, low: float, high: float) -> str:
    """'75.5 % [71.1, 79.5]'."""
    if v is None or not np.isfinite(v):
        return "–"
    if not (np.isfinite(low) and np.isfinite(high)):
        return pct(v)
    return f"{100 * v:.1f} % [{100 * low:.1f}, {100 * high:.1f}]"


def num(v: float, low: float | None = None, high: float | None = None, digits: int = 3) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    if low is None or not (np.isfinite(low) and np.isfinite(high)):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


def cite(src: Sources, t: Table, n: str) -> str:
    return (f"Source: `{src.rel(t.path)}` ({n}); made by `{t.command}`; archive {t.archive}.")


def missing(what: str, how: str) -> str:
    return f"*Not measured yet:* {what}. `{RESEARCH}` makes it (`{how}`); then run `{GENERATOR}`.\n"


def n_of(frame: pd.DataFrame) -> str:
    """"n = N samples, M instances" of a summary table (its largest n)."""
    n = int(frame["n"].max()) if "n" in frame else len(frame)
    inst = f", {int(frame['n_instances'].max())} instances" if "n_instances" in frame else ""
    return f"n = {n} samples{inst}"


def too_small(frame: pd.DataFrame) -> str | None:
    """The caveat that replaces a section's claims when a table has fewer than MIN_INSTANCES instances."""
    n = int(frame["n_instances"].max()) if "n_instances" in frame and len(frame) else 0
    if n >= MIN_INSTANCES:
        return None
    return (f"- {n} instances: too few for a claim (intervals this wide hold almost anything; at least "
            f"{MIN_INSTANCES} are needed here). The table shows the measurement works; `{RESEARCH}` replaces it with "
            "the research-size run.")
