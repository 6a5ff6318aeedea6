"""The run archive: its on-disk schema (below, the one place it is written down) and the lazy reader.

Owns file names, the schema version and every check a reader makes. Imports numpy, pandas and safetensors only:
never torch, diffusers or streamlit, so the dashboard can read archives on a machine without a GPU stack.
The writer lives in `archive_writer.py`, the manifest checks a reader makes at open in `archive_manifest.py`;
both use the constants defined here.

Schema (``SCHEMA_VERSION`` = 1)::

    <runs_dir>/<run_id>/
      manifest.json        written last; {"schema_version", "complete": true, "run_id", "created", "command",
                           "config" (resolved capture config), "versions", "model" (pipeline class, family,
                           transformer + scheduler config), "steps" [{step, t, sigma, expert}], "n_steps",
                           "latent" {channels, frames, height, width}, "token_grid" {frames, rows, cols, patch},
                           "tensors" {name: {steps, dtype, shape}}, "sites" {site: {n_layers, layers, steps,
                           branches, dim, dtype, reductions {name: {shape}}, tokens [[layer, step], ...]}},
                           "decoded" {steps, shape} | null, "n_samples", "shards" [relative paths],
                           "timing" {capture_s (capture phase wall time, all ranks), world_size,
                           context_parallel (ranks per video), captured_here}}
                           config.ensemble {method, k, n, captured_member, member_seeds} on `--ensemble` runs
      samples.parquet      one row per sample: sample, sample_id, task, instance, seed, prompt, label_*, answer,
                           score_*, shard
      shards/sample_NNNNNN.safetensors   every tensor of one sample (one work item = instance x seed):
          x_t, v_hat, x0_hat        (tensor step, C, F, H, W)  latent layout, steps = manifest tensors.<name>.steps
          final                     (C, F, H, W)              the pipeline's final latent
          acts/<site>/<reduction>/<branch>   (act step, layer, *reduction shape)
              reductions: frame_mean (frame, d) | pool<k> (frame, k, k, d) | token_norm (frame, row, col)
                          | proj<d'> (frame, row, col, d')
          tokens/<site>/L<layer>/S<step>/<branch>  (frame, row, col, d)  full tokens for chosen (layer, step)
          decoded/x0_hat            (decode step, F, H, W, 3) uint8;  decoded/final (F, H, W, 3) uint8
        safetensors metadata: cos_schema_version, row (JSON sample row), layout (JSON, see archive_writer)
      derived/<name>.parquet   analysis tables the pages plot
      annotations.json         manual Chain-of-Steps labels from the dashboard

A run being written lives in ``<run_id>.partial/`` (with ``manifest.partial.json``); finished shards are renamed
into place, the manifest is written last and the directory renamed, so a reader sees a complete run or none.
Readers check the schema version and every manifest field's type at open, refuse paths that resolve outside the
run directory, and check each tensor's header against the dtype and shape the manifest promises; every problem is
an `ArchiveError` (docs/reliability.md lists the cases).
Steps count from 0 = noisiest; ``t`` is the scheduler's timestep value, never an index.
"""

from __future__ import annotations

import json
import os
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import pandas as pd

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL_MANIFEST = "manifest.partial.json"
PARTIAL_SUFFIX = ".partial"
SAMPLES = "samples.parquet"
SHARD_DIR = "shards"
DERIVED_DIR = "derived"
ANNOTATIONS = "annotations.json"
STEP_TENSORS = ("x_t", "v_hat", "x0_hat")
BRANCHES = ("cond", "uncond")
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
           "BOOL": "bool"}  # safetensors header dtype -> numpy name

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


# manifest keys that say when, how and how fast a run was made, not what it holds: two archives of the same work
# items are "the same" when everything else (tensors, samples table, the rest of the manifest) is equal
PROVENANCE_KEYS = frozenset({"created", "command", "run_id", "timing"})


class ArchiveError(ValueError):
    """Every problem a reader can report: missing or malformed files, wrong schema, bad look-ups."""


def shard_name(sample: int) -> str:
    return f"{SHARD_DIR}/sample_{sample:06d}.safetensors"


def act_key(site: str, reduction: str, branch: str) -> str:
    return f"acts/{site}/{reduction}/{branch}"


def token_key(site: str, layer: int, step: int, branch: str) -> str:
    return f"tokens/{site}/L{layer}/S{step}/{branch}"


def check_name(value: str, what: str) -> str:
    """A file-system-safe name (run ids, derived table names): no separators, no leading dot."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ArchiveError(f"{what} {value!r} is not allowed: use letters, digits, '_', '-', '.' (not first), "
                           "at most 128 characters")
    return value


def inside(run_dir: Path, path: Path, what: str) -> Path:
    """`path`, after checking that it resolves inside `run_dir` (a symlink must not lead a reader elsewhere)."""
    real = Path(path).resolve()
    if Path(run_dir).resolve() not in real.parents:
        raise ArchiveError(f"{run_dir}: {what} resolves outside the run directory ({real}); refusing to read it")
    return path


class Archive:
    """Lazy, read-only view of one complete run. Opening reads the manifest only; tensors load on demand."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Archive":
        path = Path(path)
        if not path.is_dir():
            raise ArchiveError(f"no run directory at {path}")
        from .archive_manifest import read_manifest  # it checks against this module's schema constants

        return cls(path, read_manifest(path))

    # ---- run-level facts ---------------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    @property
    def n_samples(self) -> int:
        return int(self.manifest["n_samples"])

    @property
    def n_steps(self) -> int:
        return int(self.manifest["n_steps"])

    @property
    def noise_device(self) -> str:
        """Device type the run drew its noise on ('cpu', 'cuda', ...; '?' when unrecorded): a seed gives another
        draw on each, so samples re-run or paired across device types do not share their starting noise."""
        return str((self.manifest.get("model") or {}).get("device") or "?").split(":")[0]

    @cached_property
    def steps(self) -> pd.DataFrame:
        """One row per denoising step: step, t, sigma, expert."""
        return pd.DataFrame(self.manifest["steps"], columns=["step", "t", "sigma", "expert"])

    @cached_property
    def samples(self) -> pd.DataFrame:
        path = self.path / SAMPLES
        if not path.is_file():
            raise ArchiveError(f"{self.path}: {SAMPLES} is missing")
        inside(self.path, path, SAMPLES)
        try:
            table = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise ArchiveError(f"{path} cannot be read as parquet: {err}") from None
        if len(table) != self.n_samples:
            raise ArchiveError(f"{path} has {len(table)} rows, the manifest says {self.n_samples} samples")
        if "sample_id" in table and table["sample_id"].duplicated().any():
            dup = table["sample_id"][table["sample_id"].duplicated()].iloc[0]
            raise ArchiveError(f"{path}: duplicate sample_id {dup!r}")
        if "sample" not in table or table["sample"].tolist() != list(range(self.n_samples)):
            raise ArchiveError(f"{path}: column 'sample' must number the rows 0..{self.n_samples - 1} in order")
        return table

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    def site(self, site: str) -> dict[str, Any]:
        try:
            return self.manifest["sites"][site]
        except KeyError:
            raise ArchiveError(f"site {site!r} was not captured in {self.run_id}; captured: {self.sites}") from None

    def reductions(self, site: str) -> list[str]:
        return list(self.site(site)["reductions"])

    # ---- tensor look-ups -----------------------------------------------------------------------------------
    def _shard_path(self, sample: int) -> Path:
        if not isinstance(sample, (int, np.integer)) or not 0 <= sample < self.n_samples:
            raise ArchiveError(f"sample {sample!r} out of range: {self.run_id} has samples 0..{self.n_samples - 1}")
        path = self.path / self.manifest["shards"][int(sample)]
        if not path.is_file():
            raise ArchiveError(f"{self.run_id}: shard for sample {sample} is missing ({path.name})")
        if path.is_symlink() and self.path.resolve() not in path.resolve().parents:
            raise ArchiveError(f"{self.run_id}: shard for sample {sample} links outside the run directory "
                               f"({path.resolve()})")
        return path

    def read(self, sample: int, key: str, index: tuple | None = None) -> np.ndarray:
        """One tensor of one sample by archive key, optionally sliced lazily (only the slice is read).

        The shard's header must declare the dtype and shape the manifest promises for the key."""
        from safetensors import SafetensorError, safe_open

        path = self._shard_path(sample)
        try:
            with safe_open(str(path), framework="np") as f:
                if key not in f.keys():
                    raise ArchiveError(f"{self.run_id}: sample {sample} has no tensor {key!r}")
                part = f.get_slice(key)
                stored = (_DTYPES.get(part.get_dtype(), part.get_dtype()), list(part.get_shape()))
                promised = self._promises.get(key)
                if promised is not None and stored != promised:
                    raise ArchiveError(f"{self.run_id} sample {sample}: {key} is stored as {stored[0]} "
                                       f"{stored[1]}, the manifest promises {promised[0]} {promised[1]}")
                return f.get_tensor(key) if index is None else part[index]
        except SafetensorError as err:
            raise ArchiveError(f"{path} is damaged or not a safetensors file: {err}") from None
        except OSError as err:
            raise ArchiveError(f"{path} cannot be read: {err}") from None
        except (TypeError, AttributeError) as err:  # a dtype numpy lacks (bfloat16, float8) under an unknown key
            raise ArchiveError(f"{path}: tensor {key!r} cannot be read as numpy: {err}") from None

    @cached_property
    def _promises(self) -> dict[str, tuple[str, list[int]]]:
        """{key: (dtype, shape)} of every tensor a shard holds, from the manifest alone."""
        m = self.manifest
        out = {"final": ("float32", [m["latent"][k] for k in ("channels", "frames", "height", "width")])}
        out.update({name: (info["dtype"], [len(info["steps"]), *info["shape"]]) for name, info in m["tensors"].items()})
        grid = [m["token_grid"][k] for k in ("frames", "rows", "cols")]
        for site, info in m["sites"].items():
            token_dtype = {"bfloat16": "uint16", None: "float32"}.get(info.get("token_dtype"), info.get("token_dtype"))
            for branch in info["branches"]:
                for name, red in info["reductions"].items():
                    out[act_key(site, name, branch)] = (info.get("dtype", "float32"),
                                                        [len(info["steps"]), len(info["layers"]), *red["shape"]])
                for layer, step in info.get("tokens", []):
                    out[token_key(site, layer, step, branch)] = (token_dtype, [*grid, info["dim"]])
        if m.get("decoded"):
            out["decoded/x0_hat"] = ("uint8", [len(m["decoded"]["steps"]), *m["decoded"]["shape"]])
            out["decoded/final"] = ("uint8", list(m["decoded"]["shape"]))
        return out

    def keys(self, sample: int = 0) -> list[str]:
        from safetensors import SafetensorError, safe_open

        path = self._shard_path(sample)
        try:
            with safe_open(str(path), framework="np") as f:
                return sorted(f.keys())
        except SafetensorError as err:
            raise ArchiveError(f"{path} is damaged or not a safetensors file: {err}") from None

    @staticmethod
    def _position(values: list[int], value: int, what: str) -> int:
        try:
            return values.index(int(value))
        except (ValueError, TypeError):
            raise ArchiveError(f"{what} {value!r} was not captured; captured {what}s: {values}") from None

    def act(self, site: str, reduction: str, *, sample: int, layer: int | None = None,
            step: int | None = None, branch: str = "cond") -> np.ndarray:
        """Reduced activations of one sample: (step, layer, *shape), with `layer`/`step` dropping that axis."""
        info = self.site(site)
        if reduction not in info["reductions"]:
            raise ArchiveError(f"reduction {reduction!r} of site {site!r} was not captured; captured: "
                               f"{list(info['reductions'])}")
        if branch not in info["branches"]:
            raise ArchiveError(f"branch {branch!r} was not captured; captured: {info['branches']}")
        s = slice(None) if step is None else self._position(info["steps"], step, "step")
        l = slice(None) if layer is None else self._position(info["layers"], layer, "layer")
        return self.read(sample, act_key(site, reduction, branch), (s, l))  # read checks the stored shape

    def stack(self, site: str, reduction: str, *, over: Literal["sample", "layer", "step"] = "sample",
              samples: Iterable[int] | None = None, layer: int | None = None, step: int | None = None,
              branch: str = "cond") -> np.ndarray:
        """Stack reduced activations. over="sample": (sample, [step], [layer], *shape) for the given samples;
        over="layer"/"step" for one sample: the full axis of that name first, the other index fixed."""
        if over == "sample":
            ids = range(self.n_samples) if samples is None else list(samples)
            parts = [self.act(site, reduction, sample=i, layer=layer, step=step, branch=branch) for i in ids]
            if not parts:
                raise ArchiveError(f"{self.run_id}: no samples to stack")
            return np.stack(parts)
        if over not in ("layer", "step"):
            raise ArchiveError(f"over={over!r} is not allowed: use 'sample', 'layer' or 'step'")
        if samples is None or len(list(samples)) != 1:
            raise ArchiveError(f"over={over!r} stacks within one sample: pass samples=[i]")
        (sample,) = list(samples)
        if over == "layer":
            if step is None:
                raise ArchiveError("over='layer' needs a step")
            return self.act(site, reduction, sample=sample, step=step, branch=branch)
        if layer is None:
            raise ArchiveError("over='step' needs a layer")
        return self.act(site, reduction, sample=sample, layer=layer, branch=branch)

    def tokens(self, site: str, *, sample: int, layer: int, step: int, branch: str = "cond") -> np.ndarray:
        pairs = [list(p) for p in self.site(site).get("tokens", [])]
        if [int(layer), int(step)] not in pairs:
            raise ArchiveError(f"full tokens for layer {layer}, step {step} were not captured; captured "
                               f"(layer, step) pairs: {pairs}")
        out = self.read(sample, token_key(site, layer, step, branch))
        return bf16_bits_to_float32(out) if self.site(site).get("token_dtype") == "bfloat16" else out

    def tensor(self, name: str, *, sample: int, step: int | None = None) -> np.ndarray:
        """x_t / v_hat / x0_hat of one sample: (step, C, F, H, W), or (C, F, H, W) for one step."""
        info = self.manifest["tensors"].get(name)
        if info is None:
            raise ArchiveError(f"tensor {name!r} was not captured; captured: {list(self.manifest['tensors'])}")
        if step is None:
            return self.read(sample, name)
        return self.read(sample, name, (self._position(info["steps"], step, "step"),))

    def decoded(self, *, sample: int, step: int | None = None) -> np.ndarray:
        """uint8 frames (F, H, W, 3) of x̂0 at `step`, or of the final video when `step` is None."""
        if not self.manifest.get("decoded"):
            raise ArchiveError(f"{self.run_id} holds no decoded frames (capture ran without --decode)")
        if step is None:
            return self.read(sample, "decoded/final")
        return self.read(sample, "decoded/x0_hat", (self._position(self.manifest["decoded"]["steps"], step,
                                                                   "decoded step"),))

    # ---- derived tables and annotations ------------------------------------------------------------------
    def derived_names(self) -> list[str]:
        folder = self.path / DERIVED_DIR
        return sorted(p.stem for p in folder.glob("*.parquet")) if folder.is_dir() else []

    def derived(self, name: str) -> pd.DataFrame:
        path = self.path / DERIVED_DIR / f"{check_name(name, 'derived table')}.parquet"
        if not path.is_file():
            raise ArchiveError(f"{self.run_id} has no derived table {name!r} (run `cos analyze`); has: "
                               f"{self.derived_names()}")
        inside(self.path, path, f"{DERIVED_DIR}/{path.name}")
        try:
            return pd.read_parquet(path)
        except Exception as err:
            raise ArchiveError(f"{path} cannot be read as parquet: {err}") from None

    def write_derived(self, name: str, table: pd.DataFrame) -> Path:
        path = self.path / DERIVED_DIR / f"{check_name(name, 'derived table')}.parquet"
        path.parent.mkdir(exist_ok=True)
        inside(self.path, path.parent / "x", f"{DERIVED_DIR}/")  # never write through a linked folder
        return atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))

    def annotations(self) -> list[dict[str, Any]]:
        path = self.path / ANNOTATIONS
        if not path.is_file():
            return []
        inside(self.path, path, ANNOTATIONS)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as err:
            raise ArchiveError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, list):
            raise ArchiveError(f"{path} must hold a JSON list of labels")
        return data

    def write_annotations(self, labels: list[dict[str, Any]]) -> Path:
        text = json.dumps(labels, indent=1, sort_keys=True)
        return atomic_write(self.path / ANNOTATIONS, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def __repr__(self) -> str:
        return f"Archive({self.run_id!r}, samples={self.n_samples}, steps={self.n_steps}, sites={self.sites})"


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 tensors are stored as their uint16 bit patterns (numpy has no bfloat16); this is exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def atomic_write(path: Path, write) -> Path:
    """Write through a temporary sibling, fsync, then rename: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def list_runs(runs_dir: str | os.PathLike) -> tuple[list[Archive], dict[str, str]]:
    """Every complete run under `runs_dir`, and {name: error} for directories that are not readable runs."""
    runs_dir = Path(runs_dir)
    good, bad = [], {}
    if not runs_dir.is_dir():
        return good, bad
    root = runs_dir.resolve()
    for child in sorted(runs_dir.iterdir()):
        if not child.is_dir() or child.name.startswith(".") or child.name.endswith(PARTIAL_SUFFIX):
            continue
        if child.is_symlink() and root not in child.resolve().parents:
            bad[child.name] = f"{child} links outside the runs directory ({child.resolve()}); not followed"
            continue
        try:
            good.append(Archive.open(child))
        except ArchiveError as err:
            bad[child.name] = str(err)
    return good, bad
