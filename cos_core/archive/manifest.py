"""Reading and validating a run's ``manifest.json``: the checks `Archive.open` makes before anything else is read,
so a damaged or hostile manifest fails at open with an `ArchiveError` naming the problem (docs/reliability.md).

Owns the size limit and the type of every field a reader indexes; the schema itself (and which keys are required,
derived from its `Manifest`) is in `schema.py`. Imports only `schema`: numpy/pandas-free, never the reader or writer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .schema import (BRANCHES, MANIFEST, PARTIAL_SUFFIX, REQUIRED_KEYS, SCHEMA_VERSION, SHARD_DIR, ArchiveError,
                     inside, shard_name)

MAX_MANIFEST_BYTES = 64 * 2**20
_SHARD_RE = re.compile(r"^shards/sample_\d{6}\.safetensors$")


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """Read and validate ``manifest.json`` of one run directory (the only file `Archive.open` touches)."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise ArchiveError(f"{run_dir} is not a cos-lab archive: no {MANIFEST} (an unfinished capture lives in "
                           f"'<run>{PARTIAL_SUFFIX}' until it completes)")
    inside(run_dir, path, MANIFEST)
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ArchiveError(f"{path} is {size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ArchiveError(f"{path} cannot be read: {err.strerror or err}") from None
    except RecursionError:
        raise ArchiveError(f"{path} is not valid JSON: nested too deeply") from None
    except ArchiveError:
        raise
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, integers of more than 4300 digits
        raise ArchiveError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise ArchiveError(f"{path} must hold a JSON object, found {type(manifest).__name__}")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise ArchiveError(f"{path}: schema_version {version!r} is not supported by this cos-lab (reads "
                           f"{SCHEMA_VERSION}); re-capture the run or install the matching cos-lab version")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ArchiveError(f"{path} misses required keys: {', '.join(missing)}")
    if manifest["complete"] is not True:
        raise ArchiveError(f"{path} is not marked complete; the run was not finished")
    _check_types(path, manifest)
    _check_shards(Path(run_dir), manifest)
    return manifest


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _ints(v: Any, low: int = 0, high: int | None = None) -> bool:
    return isinstance(v, list) and all(_is_int(x, low) and (high is None or x < high) for x in v)


def _check_types(path: Path, m: dict) -> None:
    """Every manifest field a reader indexes has the type it needs, so a damaged manifest fails here, at open."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ArchiveError(f"{path}: {what}")

    need(isinstance(m["run_id"], str), f"run_id must be a string, found {m['run_id']!r}")
    need(_is_int(m["n_samples"], 1), f"n_samples is {m['n_samples']!r}: a run needs at least one sample (an "
                                     "empty run holds nothing to read)")
    n = m["n_steps"]
    need(_is_int(n, 1), f"n_steps is {n!r}: a run needs at least one denoising step")
    steps = m["steps"]
    need(isinstance(steps, list) and len(steps) == n, f"'steps' must list {n} steps (n_steps)")
    for i, s in enumerate(steps):
        need(isinstance(s, dict) and s.get("step") == i and _is_int(s.get("step"))
             and all(isinstance(s.get(k), (int, float)) and not isinstance(s.get(k), bool) for k in ("t", "sigma")),
             f"steps[{i}] must be {{step: {i}, t: number, sigma: number, expert}}, found {s!r}")
    for key, fields in (("latent", ("channels", "frames", "height", "width")),
                        ("token_grid", ("frames", "rows", "cols"))):
        need(isinstance(m[key], dict) and all(_is_int(m[key].get(f), 1) for f in fields),
             f"'{key}' must give positive integers {', '.join(fields)}, found {m[key]!r}")
    need(isinstance(m["tensors"], dict), "'tensors' must be an object")
    for name, info in m["tensors"].items():
        need(isinstance(info, dict) and _ints(info.get("steps"), 0, n) and _ints(info.get("shape"), 1)
             and isinstance(info.get("dtype"), str), f"tensors.{name} must give steps (0..{n - 1}), shape, dtype")
    need(isinstance(m["sites"], dict), "'sites' must be an object")
    for name, site in m["sites"].items():
        ok = (isinstance(site, dict) and _ints(site.get("layers")) and _ints(site.get("steps"), 0, n)
              and isinstance(site.get("branches"), list) and set(site["branches"]) <= set(BRANCHES)
              and _is_int(site.get("dim"), 1) and isinstance(site.get("dtype", "float32"), str)
              and isinstance(site.get("reductions"), dict)
              and all(isinstance(r, dict) and _ints(r.get("shape")) for r in site["reductions"].values())
              and isinstance(site.get("tokens", []), list)
              and all(_ints(p) and len(p) == 2 for p in site.get("tokens", []))
              and isinstance(site.get("token_dtype", ""), (str, type(None))))
        need(ok, f"sites.{name} must give layers, steps (0..{n - 1}), branches (of {list(BRANCHES)}), dim, "
                 "reductions {name: {shape}}, tokens [[layer, step], ...] and token_dtype")
    decoded = m.get("decoded")
    need(decoded is None or (isinstance(decoded, dict) and _ints(decoded.get("steps"), 0, n)
                             and _ints(decoded.get("shape"), 1)), "'decoded' must be null or {steps, shape}")


def _check_shards(run_dir: Path, manifest: dict) -> None:
    shards = manifest["shards"]
    if not isinstance(shards, list) or len(shards) != manifest["n_samples"]:
        raise ArchiveError(f"{run_dir}: 'shards' must list one file per sample (n_samples="
                           f"{manifest['n_samples']!r})")
    for i, rel in enumerate(shards):
        if not isinstance(rel, str) or not _SHARD_RE.match(rel) or rel != shard_name(i):
            raise ArchiveError(f"{run_dir}: shard entry {rel!r} is not allowed (expected {shard_name(i)!r}; "
                               "paths must stay inside the run directory)")
    shard_dir = run_dir / SHARD_DIR
    if shard_dir.exists() and run_dir.resolve() not in shard_dir.resolve().parents:
        raise ArchiveError(f"{run_dir}: {SHARD_DIR}/ resolves outside the run directory ({shard_dir.resolve()})")
