"""The manual Chain-of-Steps labels of a run (``annotations.json``) and the CSV form of anything a user typed.

Owns the labels' checks (a bounded JSON list of objects with typed fields), saving under the run's lock so that
concurrent saves (Streamlit sessions share one process, several dashboards may share a run) never lose a label or
leave torn JSON, and CSV exports whose cells a spreadsheet cannot run as formulas. Imports pandas, `schema` and
`files` only: never the reader, streamlit or torch.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pandas as pd

from .files import atomic_write, locked, read_json
from .schema import ANNOTATIONS, ArchiveError

LOCK = ".annotations.lock"
MAX_LABELS_BYTES = 8 * 2**20
MAX_LABELS = 20_000
MAX_TEXT = 2_000  # characters of a note, category or sample id
COLUMNS = ("sample", "sample_id", "category", "step", "note", "created")
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _check(label: Any, where: str) -> dict[str, Any]:
    """One label: an object whose known fields have their types (sample, step: integers >= 0, step may be null;
    sample_id, category, note, created: strings of at most MAX_TEXT characters)."""
    if not isinstance(label, dict):
        raise ArchiveError(f"{where} must be an object {{{', '.join(COLUMNS)}}}, found {type(label).__name__}")
    for key in ("sample", "step"):
        value = label.get(key)
        if not (value is None and key == "step") and not (isinstance(value, int) and not isinstance(value, bool)
                                                          and value >= 0):
            raise ArchiveError(f"{where}: {key} must be an integer >= 0{' or null' if key == 'step' else ''}, "
                               f"found {value!r}")
    for key in ("sample_id", "category", "note", "created"):
        value = label.get(key, "")
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise ArchiveError(f"{where}: {key} must be a string of at most {MAX_TEXT} characters, found "
                               f"{type(value).__name__} of length {len(value) if hasattr(value, '__len__') else '?'}")
    return label


def read_labels(run_dir: Path) -> list[dict[str, Any]]:
    """The saved labels (an empty list when there are none), each checked; ArchiveError naming the first bad one."""
    path = Path(run_dir) / ANNOTATIONS
    if not path.exists() and not path.is_symlink():
        return []
    data = read_json(run_dir, path, ANNOTATIONS, MAX_LABELS_BYTES)
    if not isinstance(data, list):
        raise ArchiveError(f"{path} must hold a JSON list of labels, found {type(data).__name__}")
    if len(data) > MAX_LABELS:
        raise ArchiveError(f"{path} holds {len(data)} labels, over the {MAX_LABELS}-label limit")
    return [_check(label, f"{path}: label {i}") for i, label in enumerate(data)]


def write_labels(run_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """Replace every label (checked first) under the run's lock."""
    rows = [_check(label, f"label {i}") for i, label in enumerate(rows)]
    with locked(Path(run_dir) / LOCK):
        return _write(Path(run_dir), rows)


def add_label(run_dir: Path, label: dict[str, Any]) -> list[dict[str, Any]]:
    """Append one label: read, append and write under the run's lock, so two saves at once both land. Returns every
    label now saved (ArchiveError if the saved ones are damaged: then nothing is written)."""
    _check(label, "the new label")
    with locked(Path(run_dir) / LOCK):
        rows = read_labels(run_dir)
        if len(rows) >= MAX_LABELS:
            raise ArchiveError(f"{Path(run_dir) / ANNOTATIONS} already holds {len(rows)} labels, the limit")
        rows.append(label)
        _write(Path(run_dir), rows)
    return rows


def _write(run_dir: Path, rows: list[dict[str, Any]]) -> Path:
    text = json.dumps(rows, indent=1, sort_keys=True)
    if len(text.encode()) > MAX_LABELS_BYTES:
        raise ArchiveError(f"{run_dir / ANNOTATIONS} would be over the {MAX_LABELS_BYTES}-byte limit; not saved")
    return atomic_write(run_dir / ANNOTATIONS, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def labels_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(COLUMNS))


def csv_text(table: pd.DataFrame) -> str:
    """`table` as CSV in which no text cell starts like a formula (=, +, -, @, tab, carriage return): such cells get
    a leading apostrophe (OWASP's advice), so a spreadsheet shows them instead of running them. Every text cell is
    quoted (a carriage return inside one cannot start a row); numbers stay numbers."""
    def neutral(value: Any) -> Any:
        return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_PREFIXES) else value

    safe = table.copy()
    for column in safe.columns:
        if isinstance(safe[column].dtype, pd.CategoricalDtype):
            safe[column] = safe[column].astype(object)
        if safe[column].dtype == object or pd.api.types.is_string_dtype(safe[column]):
            safe[column] = safe[column].map(neutral)
    safe.columns = [neutral(str(c)) for c in safe.columns]
    return safe.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC)
