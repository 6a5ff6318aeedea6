"""Reading and validating a run's ``manifest.json``: the checks `Archive.open` makes before anything else is read,
so a damaged or hostile manifest fails at open with an `ArchiveError` naming the problem (docs/reliability.md).

Owns the size limits and the type and range of every field a reader, a page or the runs table uses (`LIMITS`); the
schema itself (and which keys are required, from its `Manifest`) is in `schema.py`. Imports `schema`, `files` and
`shards` only: numpy/pandas-free, never the reader or writer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .files import read_json
from .schema import (BRANCHES, MANIFEST, PARTIAL_SUFFIX, REQUIRED_KEYS, SCHEMA_VERSION, SHARD_DIR, ArchiveError,
                     check_name, shard_name)
from .shards import is_digest

MAX_MANIFEST_BYTES = 8 * 2**20  # json.loads can take ~25x the file size in memory: 8 MiB costs ~200 MB at worst
# the largest count or size a manifest may declare (pages build widgets and loops from these numbers)
LIMITS = {"samples": 1_000_000, "steps": 10_000, "channels": 4_096, "frames": 4_096, "side": 16_384, "layers": 4_096,
          "dim": 1_048_576}
_SHARD_RE = re.compile(r"^shards/sample_\d{6}\.safetensors$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")  # site, reduction and tensor names (shown on pages)
_DEVICE_RE = re.compile(r"^[A-Za-z0-9_]{1,32}(:\d{1,4})?$")


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """Read and validate ``manifest.json`` of one run directory (the only file `Archive.open` touches)."""
    path = Path(run_dir) / MANIFEST
    try:
        present = path.is_file()
    except OSError as err:  # a run folder this process may not enter
        raise ArchiveError(f"{run_dir} cannot be read: {err.strerror or err}") from None
    if not present:
        raise ArchiveError(f"{run_dir} is not a cos-lab archive: no {MANIFEST} (an unfinished capture lives in "
                           f"'<run>{PARTIAL_SUFFIX}' until it completes)")
    manifest = read_json(run_dir, path, MANIFEST, MAX_MANIFEST_BYTES)
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


def _is_int(v: Any, low: int = 0, high: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)


def _ints(v: Any, low: int = 0, high: int | None = None) -> bool:
    return isinstance(v, list) and all(_is_int(x, low, None if high is None else high - 1) for x in v)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _strs(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _check_types(path: Path, m: dict) -> None:
    """Every manifest field a reader indexes has the type and range it needs, so a damaged manifest fails here, at
    open, and a page never builds a widget from a billion frames."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ArchiveError(f"{path}: {what}")

    run_id = m["run_id"]
    need(isinstance(run_id, str), f"run_id must be a string, found {run_id!r}")
    try:
        check_name(run_id, "run_id")
    except ArchiveError as err:
        need(False, str(err))
    need(_is_int(m["n_samples"], 1, LIMITS["samples"]),
         f"n_samples is {m['n_samples']!r}: a run needs at least one sample (an empty run holds nothing to read), "
         f"at most {LIMITS['samples']}")
    n = m["n_steps"]
    need(_is_int(n, 1, LIMITS["steps"]), f"n_steps is {n!r}: a run needs at least one denoising step (at most "
                                         f"{LIMITS['steps']})")
    steps = m["steps"]
    need(isinstance(steps, list) and len(steps) == n, f"'steps' must list {n} steps (n_steps)")
    for i, s in enumerate(steps):
        need(isinstance(s, dict) and s.get("step") == i and _is_int(s.get("step"))
             and _number(s.get("t")) and _number(s.get("sigma")) and isinstance(s.get("expert", ""), (str, type(None))),
             f"steps[{i}] must be {{step: {i}, t: number, sigma: number, expert}}, found {s!r}")
    side, frames = LIMITS["side"], LIMITS["frames"]
    for key, bounds in (("latent", {"channels": LIMITS["channels"], "frames": frames, "height": side, "width": side}),
                        ("token_grid", {"frames": frames, "rows": side, "cols": side})):
        need(isinstance(m[key], dict) and all(_is_int(m[key].get(f), 1, high) for f, high in bounds.items()),
             f"'{key}' must give integers {', '.join(f'{f} (1..{h})' for f, h in bounds.items())}, found {m[key]!r}")
    latent = [m["latent"][k] for k in ("channels", "frames", "height", "width")]
    need(isinstance(m["tensors"], dict), "'tensors' must be an object")
    names = [*m["tensors"], *(m["sites"] if isinstance(m["sites"], dict) else [])]
    names += [r for site in (m["sites"].values() if isinstance(m["sites"], dict) else []) if isinstance(site, dict)
              and isinstance(site.get("reductions"), dict) for r in site["reductions"]]
    bad = [n for n in names if not _NAME_RE.match(n)]
    need(not bad, f"tensor, site and reduction names must be letters, digits, '_', '-', '.'; found {bad[:3]}")
    for name, info in m["tensors"].items():
        need(isinstance(info, dict) and _ints(info.get("steps"), 0, n) and _ints(info.get("shape"), 1)
             and isinstance(info.get("dtype"), str), f"tensors.{name} must give steps (0..{n - 1}), shape, dtype")
        need(name not in ("x_t", "v_hat", "x0_hat") or info["shape"] == latent,
             f"tensors.{name}.shape {info['shape']} must be the latent's [channels, frames, height, width] {latent}")
    need(isinstance(m["sites"], dict), "'sites' must be an object")
    for name, site in m["sites"].items():
        ok = (isinstance(site, dict) and _ints(site.get("layers"), 0, LIMITS["layers"])
              and _ints(site.get("steps"), 0, n)
              and isinstance(site.get("branches"), list) and set(site["branches"]) <= set(BRANCHES)
              and _is_int(site.get("dim"), 1, LIMITS["dim"]) and isinstance(site.get("dtype", "float32"), str)
              and isinstance(site.get("reductions"), dict)
              and all(isinstance(r, dict) and _ints(r.get("shape"), 0, LIMITS["dim"] + 1)
                      for r in site["reductions"].values())
              and isinstance(site.get("tokens", []), list)
              and all(_ints(p) and len(p) == 2 for p in site.get("tokens", []))
              and isinstance(site.get("token_dtype", ""), (str, type(None))))
        need(ok, f"sites.{name} must give layers, steps (0..{n - 1}), branches (of {list(BRANCHES)}), dim, "
                 "reductions {name: {shape}}, tokens [[layer, step], ...] and token_dtype")
    decoded = m.get("decoded")
    need(decoded is None or (isinstance(decoded, dict) and _ints(decoded.get("steps"), 0, n)
                             and _ints(decoded.get("shape"), 1) and len(decoded["shape"]) == 4
                             and decoded["shape"][3] == 3 and decoded["shape"][0] <= frames
                             and max(decoded["shape"][1:3]) <= side),
         f"'decoded' must be null or {{steps, shape [frames (<= {frames}), height, width (<= {side}), 3]}}, "
         f"found {decoded!r}")
    _check_record(need, m)


def _check_record(need: Any, m: dict) -> None:
    """The optional keys of the capture run that pages, the runs table and replays read."""
    for key in ("x0_rule", "family", "created"):
        need(isinstance(m.get(key, ""), str), f"'{key}' must be a string, found {m.get(key)!r}")
    need(_strs(m.get("command", [])), f"'command' must be a list of strings, found {m.get('command')!r}")
    for key in ("versions", "timing", "model", "config"):
        need(isinstance(m.get(key, {}), dict), f"'{key}' must be an object, found {m.get(key)!r}")
    need(all(isinstance(v, str) for v in m.get("versions", {}).values()), "'versions' must map packages to strings")
    model = m.get("model", {})
    for key in ("source", "pipeline_class", "family", "device", "dtype"):
        need(isinstance(model.get(key, ""), (str, type(None))), f"model.{key} must be a string, found "
                                                                f"{model.get(key)!r}")
    device = model.get("device") or ""
    need(not device or _DEVICE_RE.match(device), f"model.device must name a torch device (cpu, cuda:0, ...), found "
                                                 f"{device!r}")
    config = m.get("config", {})
    need(isinstance(config.get("task", ""), (str, type(None))), f"config.task must be a string, found "
                                                                f"{config.get('task')!r}")
    for key in ("call", "task_params", "spec"):
        need(isinstance(config.get(key, {}), (dict, type(None))), f"config.{key} must be an object")
    ensemble = config.get("ensemble")
    need(ensemble is None or (isinstance(ensemble, dict) and isinstance(ensemble.get("method"), str)
                              and _is_int(ensemble.get("k")) and _is_int(ensemble.get("n"), 1)),
         f"config.ensemble must be null or {{method: string, k: integer, n: integer >= 1, ...}}, found {ensemble!r}")
    sums = m.get("checksums")
    need(sums is None or (isinstance(sums, list) and len(sums) == m["n_samples"] and all(map(is_digest, sums))),
         "'checksums' must list one 'sha256:<64 hex digits>' per shard")


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
