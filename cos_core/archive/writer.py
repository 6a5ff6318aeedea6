"""Writing a run archive atomically and resumably: the ``<run_id>.partial`` directory, shard writes (temp file,
fsync, rename), resume checks, the final publish (samples table, the `Manifest` built from its producers' parts and
written last, directory rename). Test-only crash hook: ``COS_FAULT_POINT=<point>[@<n>]`` SIGKILLs
the process at the n-th arrival at one of `FAULT_POINTS` (docs/reliability.md); unset, each costs one look-up.
Imports numpy/pandas/safetensors and `schema`/`manifest`/`files`/`shards` only: never the reader, capture or torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .files import atomic_write, fsync_dir, io_error, is_temp, remove_stale, temp_path
from .manifest import read_manifest
from .schema import (MANIFEST, PARTIAL_MANIFEST, PARTIAL_SUFFIX, SAMPLES, SCHEMA_VERSION, SHARD_DIR, ArchiveError,
                     Manifest, check_name, shard_name)
from .shards import META_DIGEST, META_ROW, META_SAMPLE, array_digest, shard_row

log = logging.getLogger(__name__)
FAULT_ENV = "COS_FAULT_POINT"
FAULT_POINTS = ("create", "shard.tmp", "shard.done", "samples.tmp", "samples.done", "manifest.tmp", "manifest.done",
                "publish.before_rename", "publish.done")
DERIVED_POINTS = ("derived.written", "derived.swapped")  # in `derived.publish_derived`: new set complete / swapped in
_FAULT = os.environ.get(FAULT_ENV) or None  # "<point>[@<n>]"; a harness may also set it on this module
_ARRIVALS: dict[str, int] = {}
_SHARD_FILE = re.compile(r"^sample_(\d{6})\.safetensors$")


def _fault(point: str) -> None:
    """SIGKILL this process at the n-th arrival at `point` when `_FAULT` is '<point>[@<n>]' (tests only)."""
    name, _, nth = _FAULT.partition("@")
    _ARRIVALS[point] = _ARRIVALS.get(point, 0) + 1
    if name == point and _ARRIVALS[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


class RunExistsError(ArchiveError):
    """A complete run with this id is already there; it is never overwritten."""


class RunWriter:
    """Writes one run: `write_sample` per finished work item, then `finalize`.

    `resume_key` is the JSON-able part of the configuration that must be identical for a killed run to be
    resumed (model, task list, seeds, selections, reductions); anything else (timing, command line) may differ.
    """

    def __init__(self, runs_dir: str | os.PathLike, run_id: str, resume_key: dict[str, Any], *, join: bool = False):
        """`join=True` (data-parallel ranks other than 0): the run directory was just created or checked by
        rank 0; check the configuration but leave its files alone."""
        self.runs_dir = Path(runs_dir)
        self.run_id = check_name(run_id, "run id")
        self.final_dir = self.runs_dir / run_id
        self.partial_dir = self.runs_dir / f"{run_id}{PARTIAL_SUFFIX}"
        self.resume_key = json.loads(json.dumps(resume_key, sort_keys=True))
        if self.final_dir.exists():
            if (self.final_dir / MANIFEST).is_file():
                raise RunExistsError(f"a complete run already exists at {self.final_dir}; choose another --run-id "
                                     "or delete it yourself (cos-lab never overwrites a run)")
            raise ArchiveError(f"{self.final_dir} exists and is not a cos-lab run; refusing to touch it")
        published = (self.partial_dir / MANIFEST).is_file() and not (self.partial_dir / PARTIAL_MANIFEST).exists()
        if published and not join:
            self._publish_interrupted()
        self.resumed = self.partial_dir.is_dir()
        if join and not self.resumed:
            raise ArchiveError(f"{self.partial_dir} does not exist: rank 0 should have created it (shared "
                               "filesystem?)")
        if self.resumed:
            self._check_resumable(clean=not join)
        else:
            self._create()

    def _create(self) -> None:
        """Build the partial directory under a hidden temporary name and rename it, so that a `<run>.partial`
        always holds its resume key (a kill here leaves only a hidden `.<run>.partial.tmp-<host>-<pid>-<random>`,
        which the next run removes)."""
        remove_stale(self.runs_dir, prefix=f".{self.partial_dir.name}.")  # a killed creator's hidden folder
        tmp = temp_path(self.partial_dir)
        body = {"schema_version": SCHEMA_VERSION, "run_id": self.run_id, "resume_key": self.resume_key}
        try:
            (tmp / SHARD_DIR).mkdir(parents=True)
            atomic_write(tmp / PARTIAL_MANIFEST,
                         lambda t: Path(t).write_text(json.dumps(body, indent=1, sort_keys=True)))
            if _FAULT: _fault("create")
            os.rename(tmp, self.partial_dir)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ArchiveError(f"cannot create the run directory {self.partial_dir}: {err.strerror} (choose a "
                               "writable --runs-dir)") from None

    def _publish_interrupted(self) -> None:
        """A run killed between removing its resume key and its final rename is complete: finish the rename."""
        read_manifest(self.partial_dir)
        os.replace(self.partial_dir, self.final_dir)
        fsync_dir(self.runs_dir)
        raise RunExistsError(f"a complete run already exists at {self.final_dir} (its capture was interrupted while "
                             "publishing, which has now finished); choose another --run-id")

    def _check_resumable(self, clean: bool) -> None:
        path = self.partial_dir / PARTIAL_MANIFEST
        try:
            body = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ArchiveError(f"cannot resume {self.partial_dir}: {PARTIAL_MANIFEST} unreadable ({err}); "
                               "delete the directory to start over") from None
        old = body.get("resume_key")
        if old != self.resume_key:
            diff = _differences(old, self.resume_key)
            raise ArchiveError(f"cannot resume {self.partial_dir}: it was started with a different configuration "
                               f"(differs in: {', '.join(diff[:8])}); use another --run-id or delete it")
        for folder in (self.partial_dir, self.partial_dir / SHARD_DIR) if clean else ():
            for stale in remove_stale(folder):  # of a killed writer; never a live process's
                log.info("removed %s, left by a writer that is gone", stale)
        log.info("resuming %s: %d finished samples", self.partial_dir, len(self.finished()))

    # ---- shards ------------------------------------------------------------------------------------------
    def shard_path(self, sample: int) -> Path:
        return self.partial_dir / shard_name(sample)

    def finished(self) -> set[int]:
        """The samples whose shard is written. A file in shards/ that is neither a shard nor a hidden temporary is
        refused by name (it would be published inside the run)."""
        out = set()
        for path in (self.partial_dir / SHARD_DIR).iterdir():
            match = _SHARD_FILE.match(path.name)
            if match:
                out.add(int(match[1]))
            elif not path.name.startswith("."):
                raise ArchiveError(f"{path} is not a shard name cos-lab writes (sample_NNNNNN.safetensors); move it "
                                   "out of the run and rerun the same command to resume")
        return out

    def write_sample(self, sample: int, tensors: dict[str, np.ndarray], row: dict[str, Any],
                     layout: dict[str, Any]) -> Path:
        """Write one sample's shard atomically. A finished shard is never rewritten."""
        from safetensors import SafetensorError
        from safetensors.numpy import save_file

        path = self.shard_path(sample)
        if path.exists():
            raise ArchiveError(f"sample {sample} of {self.run_id} is already written; finished shards are final")
        bad = [k for k, v in tensors.items() if not isinstance(v, np.ndarray)]
        assert not bad, f"write_sample needs numpy arrays, got other types for {bad}"
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        meta = {"cos_schema_version": str(SCHEMA_VERSION), META_SAMPLE: str(sample),
                META_ROW: json.dumps(row, sort_keys=True), "layout": json.dumps(layout, sort_keys=True),
                META_DIGEST: array_digest(tensors)}

        def write(tmp: Path) -> None:
            try:
                save_file(tensors, str(tmp), metadata=meta)
            except SafetensorError as err:  # a full disk arrives as a SafetensorError
                raise io_error(err, path) from None
            if _FAULT: _fault("shard.tmp")

        atomic_write(path, write)
        if _FAULT: _fault("shard.done")
        return path

    def _shard_meta(self, sample: int) -> tuple[dict, dict, str | None]:
        """(row, layout, content checksum or None) of a finished shard; ArchiveError naming a damaged one."""
        from safetensors import SafetensorError, safe_open

        path = self.shard_path(sample)
        fix = "delete it and rerun the same command to capture that sample again"
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
            layout = json.loads(meta["layout"])
        except (SafetensorError, OSError, KeyError, ValueError, RecursionError) as err:
            raise ArchiveError(f"{path} is damaged or not a cos-lab shard ({type(err).__name__}: {err}); {fix}") \
                from None
        said = meta.get(META_SAMPLE)
        if said is not None and said != str(sample):
            raise ArchiveError(f"{path} holds sample {said}, not {sample} (renamed by hand?); {fix}")
        return shard_row(meta, str(path)), layout, meta.get(META_DIGEST)

    # ---- publish -----------------------------------------------------------------------------------------
    def finalize(self, n_samples: int, record: dict[str, Any]) -> Path:
        """Check every sample is written, write samples.parquet and the manifest (last), then rename.

        `record`: the capture run's manifest keys (how the run was made); the shards hold capture's layout."""
        if n_samples < 1:
            raise ArchiveError(f"cannot finalize {self.run_id}: a run needs at least one sample")
        missing = sorted(set(range(n_samples)) - self.finished())
        if missing:
            raise ArchiveError(f"cannot finalize {self.run_id}: samples {missing[:10]} not written yet")
        self._clear_temps()
        rows, layout, sums = [], None, []
        for i in range(n_samples):
            row, this_layout, digest = self._shard_meta(i)
            sums.append(digest)
            if layout is None:
                layout = this_layout
            elif this_layout != layout:
                raise ArchiveError(f"sample {i} of {self.run_id} was captured with a different layout than sample "
                                   "0 (selection or shapes changed between work items)")
            rows.append({**row, "sample": i, "shard": shard_name(i)})
        manifest = Manifest.build(run_id=self.run_id, n_samples=n_samples, layout=layout or {}, record=record,
                                  checksums=sums if None not in sums else None)
        table = pd.DataFrame(rows)
        if "sample_id" in table and table["sample_id"].duplicated().any():
            dup = table["sample_id"][table["sample_id"].duplicated()].tolist()[:5]
            raise ArchiveError(f"duplicate sample_id in {self.run_id}: {dup}")
        def write_samples(tmp: Path) -> None:
            table.to_parquet(tmp, index=False)
            if _FAULT: _fault("samples.tmp")

        atomic_write(self.partial_dir / SAMPLES, write_samples)
        if _FAULT: _fault("samples.done")
        text = json.dumps(manifest.to_json(), indent=1, sort_keys=True, default=_json_default)

        def write_manifest(tmp: Path) -> None:
            Path(tmp).write_text(text, encoding="utf-8")
            if _FAULT: _fault("manifest.tmp")

        atomic_write(self.partial_dir / MANIFEST, write_manifest)
        if _FAULT: _fault("manifest.done")
        read_manifest(self.partial_dir)  # what we publish must pass our own reader
        (self.partial_dir / PARTIAL_MANIFEST).unlink()
        fsync_dir(self.partial_dir)
        if _FAULT: _fault("publish.before_rename")
        os.replace(self.partial_dir, self.final_dir)
        if _FAULT: _fault("publish.done")
        fsync_dir(self.runs_dir)
        return self.final_dir

    def _clear_temps(self) -> None:
        """Before publishing: temporaries of dead writers go; one a live process may still write stops the publish
        (the final rename would carry it into the run)."""
        for folder in (self.partial_dir, self.partial_dir / SHARD_DIR):
            remove_stale(folder)
            live = sorted(p.name for p in folder.iterdir() if is_temp(p.name))
            if live:
                raise ArchiveError(f"cannot finalize {self.run_id}: {folder} holds {live[:3]}, written by a process "
                                   "that is still running (another capture of this run?); let it end, or delete "
                                   "those files if no process writes them, and rerun")

    def abandon(self) -> None:
        """Delete the partial directory (used by tests and by `--restart`)."""
        shutil.rmtree(self.partial_dir, ignore_errors=True)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON values differ (config.spec.layers, not just config)."""
    if isinstance(old, dict) and isinstance(new, dict):
        missing = object()
        return [path for k in sorted(set(old) | set(new), key=str)
                for path in _differences(old.get(k, missing), new.get(k, missing), f"{prefix}{k}.")]
    return [prefix.rstrip(".") or "resume_key"] if old != new else []


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.ndarray, tuple, set)):
        return list(value.tolist() if isinstance(value, np.ndarray) else value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable in a manifest")

