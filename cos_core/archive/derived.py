"""A run's derived tables as one set: `publish_derived` (the one way any producer writes ``derived/``; protocol in
`schema`'s docstring) and its reads (`derived_names`, `read_derived`). Owns the derived manifest, the swap of a whole
folder under the run's lock, removing temporary sets of dead publishers, and checking a table against its set.
Imports pandas/pyarrow, `schema`, `files`, `tables` (and `writer`'s test-only crash hook): never the reader (it
calls this), capture, analysis or torch.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import platform
import shutil
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import pyarrow.parquet as pq

from . import writer
from .files import (FILE_MODE, atomic_write, exchange, fsync_dir, fsync_file, is_temp, locked, open_regular,
                    read_json, remove_stale, temp_path)
from .schema import DERIVED, DERIVED_DIR, DERIVED_MANIFEST, ArchiveError, check_name, inside
from .tables import DigestMismatch, read_parquet

log = logging.getLogger(__name__)
FORMAT = 1
LOCK = ".derived.lock"
MAX_DERIVED_MANIFEST_BYTES = 4 * 2**20
LEGACY = "unknown (published before derived manifests)"


class MissingTable(ArchiveError):
    """The run has no derived table of that name (yet): the page says how to make it, not that something broke."""


# ---- reading -----------------------------------------------------------------------------------------------------
def _folder(run_dir: Path) -> Path | None:
    """``derived/`` of the run, None when there is none; ArchiveError when it is not a folder inside the run."""
    folder = Path(run_dir) / DERIVED_DIR
    if not os.path.lexists(folder):
        return None
    inside(run_dir, folder / DERIVED_MANIFEST, f"{DERIVED_DIR}/")
    if not folder.is_dir():
        raise ArchiveError(f"{folder} is not a folder; move it away (cos-lab keeps derived tables in {DERIVED_DIR}/)")
    return folder


def read_set(run_dir: Path) -> dict[str, Any] | None:
    """The derived manifest (checked), or None for a run without one (no derived/, or an older run's)."""
    folder = _folder(run_dir)
    if folder is None or not os.path.lexists(folder / DERIVED_MANIFEST):
        return None
    path = folder / DERIVED_MANIFEST
    body = read_json(run_dir, path, f"{DERIVED_DIR}/{DERIVED_MANIFEST}", MAX_DERIVED_MANIFEST_BYTES)
    tables = body.get("tables") if isinstance(body, dict) else None
    if not isinstance(body, dict) or body.get("format") != FORMAT or not isinstance(tables, dict):
        raise ArchiveError(f"{path} must be {{format: {FORMAT}, tables: {{name: entry}}, ...}}; re-run the "
                           "analysis that wrote it")
    for name, entry in tables.items():
        ok = (isinstance(entry, dict) and entry.get("file") == f"{name}.parquet"
              and isinstance(entry.get("sha256"), str) and isinstance(entry.get("rows"), int))
        if not ok:
            raise ArchiveError(f"{path}: tables.{name!r} must give file '<name>.parquet', rows and sha256")
        check_name(name, f"{path}: derived table")
    return body


def derived_names(run_dir: Path) -> list[str]:
    """The tables of the current set (an older run's: its regular ``*.parquet`` files)."""
    body = read_set(run_dir)
    if body is not None:
        return sorted(body["tables"])
    folder = _folder(run_dir)
    if folder is None:
        return []
    return sorted(p.stem for p in folder.glob("*.parquet") if not p.name.startswith(".") and p.is_file())


def read_derived(run_dir: Path, name: str) -> pd.DataFrame:
    """One table of the current set, its columns checked when a page plots it (`DERIVED`)."""
    return read_derived_set(run_dir, [name])[name]


def read_derived_set(run_dir: Path, names: list[str]) -> dict[str, pd.DataFrame]:
    """Tables of ONE set: each is checked against the checksum the set's manifest records, and when a publish swaps
    the set while they are read, all are read again from the new one (never a mix of two sets)."""
    for name in names:
        check_name(name, "derived table")
    for _ in range(5):
        body = read_set(run_dir)
        try:
            return {name: _read_one(run_dir, name, body) for name in names}
        except ArchiveError as err:
            now = read_set(run_dir)
            if now is not None and (body is None or now.get("set") != body.get("set")):
                continue  # the set was replaced while we read: read from the new one
            raise err from None
    raise ArchiveError(f"{Path(run_dir) / DERIVED_DIR} kept changing while it was read (analyses publishing "
                       "again and again?); reload")


def _read_one(run_dir: Path, name: str, body: dict[str, Any] | None) -> pd.DataFrame:
    spec = DERIVED.get(name)
    kinds, required = (spec.kinds, spec.required) if spec else ({}, ())
    path = Path(run_dir) / DERIVED_DIR / f"{name}.parquet"
    what = f"{DERIVED_DIR}/{name}.parquet"
    tables = sorted(body["tables"]) if body is not None else None
    if (tables is None and not os.path.lexists(path)) or (tables is not None and name not in tables):
        raise MissingTable(f"{Path(run_dir).name} has no derived table {name!r} (run `cos analyze`); has: "
                           f"{tables if tables is not None else derived_names(run_dir)}")
    digest = body["tables"][name]["sha256"] if body is not None else None
    try:
        return read_parquet(run_dir, path, what, kinds, required, digest=digest)
    except DigestMismatch:
        raise DigestMismatch(f"{path} is not the table {DERIVED_DIR}/{DERIVED_MANIFEST} records (changed by hand or "
                             "damaged); re-run the analysis that wrote it") from None


# ---- publishing --------------------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("cos-lab", "numpy", "pandas", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def _current(run_dir: Path, folder: Path) -> dict[str, dict[str, Any]]:
    """{name: entry} of the set a publish keeps; an older run's tables get entries made from their files. Anything
    in derived/ that is not a table of the set is refused: the folder is replaced as a whole and must lose nothing."""
    body = read_set(run_dir)
    entries = dict(body["tables"]) if body else {}
    for entry in folder.iterdir():
        if entry.name == DERIVED_MANIFEST or is_temp(entry.name):
            continue  # a temporary of an older cos-lab's per-table writes: never data
        name = entry.name.removesuffix(".parquet")
        if name in entries or (body is None and entry.name.endswith(".parquet") and not entry.name.startswith(".")):
            with open_regular(run_dir, entry, f"{DERIVED_DIR}/{entry.name}"):
                pass  # a regular file inside the run, else ArchiveError naming it
            if name not in entries:
                entries[name] = _legacy_entry(name, entry)
            continue
        raise ArchiveError(f"{entry} is not a table of the derived set; move it out of {folder} (cos-lab replaces "
                           "that folder as a whole when it publishes tables)")
    missing = [n for n, e in entries.items() if not (folder / e["file"]).is_file()]
    if missing:
        raise ArchiveError(f"{folder}: tables {missing} are listed in {DERIVED_MANIFEST} but missing; re-run the "
                           "analyses that wrote them (or delete derived/ to start over)")
    return entries


def _legacy_entry(name: str, path: Path) -> dict[str, Any]:
    """The manifest entry of a table an older cos-lab wrote without one."""
    check_name(name, f"{path}: derived table")
    try:
        rows = pq.read_metadata(path).num_rows
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise ArchiveError(f"{path} cannot be read as parquet ({err}); delete it or re-run the analysis that wrote "
                           "it, then publish again") from None
    return {"file": path.name, "rows": rows, "bytes": path.stat().st_size, "sha256": _sha256(path),
            "producer": LEGACY, "config": None}


def _write_table(run_dir: Path, tmp: Path, name: str, table: pd.DataFrame, producer: str) -> dict[str, Any]:
    path = tmp / f"{name}.parquet"
    table.to_parquet(path, index=False)
    os.chmod(path, FILE_MODE)
    fsync_file(path)
    spec = DERIVED.get(name)
    try:  # what we publish must pass our own reader
        read_parquet(run_dir, path, f"{DERIVED_DIR}/{name}.parquet", *((spec.kinds, spec.required) if spec else ()))
    except ArchiveError as err:
        raise ArchiveError(f"{producer} made a {name!r} table the reader would refuse: {err}") from None
    try:
        config = json.loads(table.attrs.get("cos_config", "null"))
    except (TypeError, ValueError):
        config = str(table.attrs.get("cos_config"))
    return {"file": path.name, "rows": len(table), "bytes": path.stat().st_size, "sha256": _sha256(path),
            "producer": producer, "config": config, "versions": _versions(), "published": _now()}


def _recover(run_dir: Path, folder: Path) -> None:
    """After a publisher died between the two renames of the fallback swap: put the retired set back."""
    if os.path.lexists(folder):
        return
    retired = sorted(run_dir.glob(f".{DERIVED_DIR}.old-*"), key=lambda p: p.stat().st_mtime)
    if retired:
        os.rename(retired[-1], folder)
        log.warning("%s: restored the derived set a killed publisher had moved aside", run_dir)


def publish_derived(run: Any, tables: Mapping[str, pd.DataFrame], *, producer: str) -> Path:
    """Publish `tables` ({name: DataFrame}) into the run's ``derived/`` as one new set: the tables of the current set
    that `tables` does not replace are kept, the rest is replaced, all at once. `run`: an Archive or a run folder;
    `producer`: the command that made them (e.g. 'cos analyze'). Each table's ``attrs['cos_config']`` (JSON) is
    recorded as its config. Readers see the old set or the new one; a failure leaves the old set as it was."""
    run_dir = Path(getattr(run, "path", run))
    if not tables:
        raise ValueError("publish_derived needs at least one table")
    for name, table in tables.items():
        check_name(name, "derived table")
        if not isinstance(table, pd.DataFrame):
            raise ValueError(f"derived table {name!r} must be a pandas DataFrame, got {type(table).__name__}")
    folder = run_dir / DERIVED_DIR
    if os.path.lexists(folder):
        inside(run_dir, folder / "x", f"{DERIVED_DIR}/")  # never write through a linked folder
        if not folder.is_dir():
            raise ArchiveError(f"{folder} is a file, not a folder: move it away (cos-lab keeps derived tables in "
                               f"{DERIVED_DIR}/)")
    with locked(run_dir / LOCK):
        _recover(run_dir, folder)
        remove_stale(run_dir, prefix=f".{DERIVED_DIR}.")
        entries = _current(run_dir, folder) if folder.is_dir() else {}
        tmp = temp_path(folder)
        try:
            tmp.mkdir()
            for name, entry in entries.items():
                if name not in tables:
                    _keep(folder / entry["file"], tmp / entry["file"])
            for name, table in tables.items():
                entries[name] = _write_table(run_dir, tmp, name, table, producer)
            body = {"format": FORMAT, "set": uuid.uuid4().hex, "published": _now(), "versions": _versions(),
                    "tables": dict(sorted(entries.items()))}
            atomic_write(tmp / DERIVED_MANIFEST,
                         lambda t: Path(t).write_text(json.dumps(body, indent=1, default=str), encoding="utf-8"))
            fsync_dir(tmp)
            if writer._FAULT: writer._fault("derived.written")
            _swap(tmp, folder)
            fsync_dir(run_dir)
            if writer._FAULT: writer._fault("derived.swapped")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # after the swap: the old set
    return folder


def _keep(old: Path, new: Path) -> None:
    """A table the new set keeps: a hard link (no copy, no new bytes), a copy where links are not allowed."""
    try:
        os.link(old, new)
    except OSError:
        shutil.copy2(old, new)
        fsync_file(new)


def _swap(tmp: Path, folder: Path) -> None:
    if not os.path.lexists(folder):
        os.rename(tmp, folder)
    elif not exchange(tmp, folder):  # no RENAME_EXCHANGE: two renames; `_recover` undoes a kill between them
        retired = temp_path(folder, "old")
        os.rename(folder, retired)
        os.rename(tmp, folder)
        shutil.rmtree(retired, ignore_errors=True)


def stamp(run_dir: Path, name: str) -> tuple:
    """What a cached read of one derived table is keyed by: the identity (inode, size, mtime) of ``derived/``, its
    manifest and the table file, so a new set or an older run's rewritten table is read again."""
    folder = Path(run_dir) / DERIVED_DIR
    out = []
    for path in (folder, folder / DERIVED_MANIFEST, folder / f"{name}.parquet"):
        try:
            info = os.stat(path)
            out.append((info.st_ino, info.st_size, info.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)
