"""A runs directory: which runs it holds, which directories may be read at all, and one row per run for the runs table.

Owns the runs-directory default (`DEFAULT_RUNS_DIR`, also the CLI's `--runs-dir` default) and `$COS_RUNS_DIR`, the
rule "only configured roots are read, real paths checked" (`run_path`), listing complete runs, sizes and shard health.
Imports numpy/pandas/safetensors and the reader only: never torch, capture, analysis or streamlit.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import pandas as pd

from .reader import Archive
from .schema import MANIFEST, PARTIAL_SUFFIX, ArchiveError, check_name

RUNS_ENV = "COS_RUNS_DIR"
DEFAULT_RUNS_DIR = "cached_runs"


# ---- where runs may be read from ---------------------------------------------------------------------------
def runs_dirs(app_dir: Path, env: str | None = None) -> list[Path]:
    """The configured runs directories: `$COS_RUNS_DIR` (os.pathsep-separated) or `<app_dir>/cached_runs`."""
    raw = os.environ.get(RUNS_ENV, "") if env is None else env
    parts = [p for p in raw.split(os.pathsep) if p.strip()] or [str(Path(app_dir) / DEFAULT_RUNS_DIR)]
    out: list[Path] = []
    for part in parts:
        path = Path(part).expanduser()
        path = (path if path.is_absolute() else Path(app_dir) / path).resolve()
        if path not in out:
            out.append(path)
    return out


def run_path(root: Path, run_id: str) -> Path:
    """`root/run_id`, refusing names with separators and links that lead outside `root` (ArchiveError)."""
    check_name(run_id, "run id")
    root = Path(root).resolve()
    real = (root / run_id).resolve()
    if real.parent != root:
        raise ArchiveError(f"run {run_id!r} resolves outside the runs directory {root} (to {real}); refused")
    return real


def manifest_mtime(path: Path) -> int:
    """Cache key part: the manifest's modification time in ns (0 when it is missing)."""
    try:
        return (Path(path) / MANIFEST).stat().st_mtime_ns
    except OSError:
        return 0


def printable(name: str) -> str:
    """A file name as text any page or terminal can show: bytes that are not UTF-8 as \\xNN escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def list_runs(runs_dir: str | os.PathLike) -> tuple[list[Archive], dict[str, str]]:
    """Every complete run under `runs_dir`, and {name: error} for entries that are not readable runs: a problem of
    one run (an unreadable folder, a name that is not UTF-8, a hostile manifest) never stops the listing."""
    runs_dir = Path(runs_dir)
    good, bad = [], {}
    try:
        children = sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []
    except OSError as err:
        return good, {printable(runs_dir.name): f"{printable(str(runs_dir))} cannot be listed: {err.strerror}"}
    root = runs_dir.resolve()
    for child in children:
        name = printable(child.name)
        try:
            if not child.is_dir() or child.name.startswith(".") or child.name.endswith(PARTIAL_SUFFIX):
                continue
            if name != child.name:
                raise ArchiveError(f"{printable(str(child))}: the folder name is not UTF-8 text; rename it")
            if child.is_symlink() and root not in child.resolve().parents:
                raise ArchiveError(f"{child} links outside the runs directory ({child.resolve()}); not followed")
            good.append(Archive.open(child))
        except ArchiveError as err:
            bad[name] = printable(str(err))
        except OSError as err:  # e.g. a folder this process may not enter
            bad[name] = f"{printable(str(child))} cannot be read: {err.strerror or err}"
    return good, bad


# ---- sizes and health --------------------------------------------------------------------------------------
def dir_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                pass
    return total


def dir_size_of(archive: Archive) -> int:
    return dir_size(archive.path)


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def shard_problems(archive: Archive) -> dict[int, str]:
    """{sample: message} for shards that are missing, not regular files, damaged or another sample's; reads each
    shard's header only, with the checks every read makes (content checksums are checked when data is read)."""
    problems = {sample: archive.shard_problem(sample) for sample in range(archive.n_samples)}
    return {sample: problem for sample, problem in problems.items() if problem}


# ---- the runs table ----------------------------------------------------------------------------------------
def run_facts(archive: Archive) -> dict[str, Any]:
    """One row of the runs table, from the manifest alone."""
    m = archive.manifest
    model = m.get("model") or {}
    config = m.get("config") or {}
    command = m.get("command")
    ens = config.get("ensemble")
    return {"run": archive.run_id, "model": model.get("source") or model.get("pipeline_class", "?"),
            "family": model.get("family", "?"), "task": config.get("task") or "-", "steps": archive.n_steps,
            "samples": archive.n_samples,
            "ensemble": f"{ens['method']}, K={ens['k']}, n={ens['n']} (member 0)" if isinstance(ens, dict) else "-",
            "created": m.get("created", "?"),
            "command": shlex.join(command) if isinstance(command, list) else str(command or "?")}


def runs_table(archives: list[Archive], sizes: dict[str, int]) -> pd.DataFrame:
    rows = [{**run_facts(a), "size": human_size(sizes.get(a.run_id, 0)), "bytes": sizes.get(a.run_id, 0)}
            for a in archives]
    cols = ["run", "model", "family", "task", "steps", "samples", "ensemble", "size", "bytes", "created", "command"]
    return pd.DataFrame(rows, columns=cols)
