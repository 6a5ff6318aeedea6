"""The lazy, torch-free reader of one complete run: `Archive` (manifest facts, tensors by (site, reduction, layer,
step), the samples table, derived tables, annotations), checked against the schema in `schema.py`.

Owns every look-up and the checks a read makes (sample ranges, captured layers/steps, each shard's identity and
content checksum, each tensor's stored dtype and shape against the manifest's promise). Imports numpy, pandas,
safetensors and this package's modules except the writer: never torch, diffusers or streamlit.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import numpy as np
import pandas as pd

from . import derived, labels
from .files import fd_path, open_regular
from .manifest import read_manifest
from .schema import SAMPLE_KINDS, SAMPLES, ArchiveError, act_key, token_key
from .shards import DTYPES, check_identity, file_digest
from .tables import read_parquet


class Archive:
    """Lazy, read-only view of one complete run. Opening reads the manifest only; tensors load on demand."""

    def __init__(self, path: Path, manifest: dict[str, Any], verify: bool = True):
        """`verify`: check each shard's content checksum (when the manifest records one) the first time it is read
        from, and again when the file changes (one streaming pass over the shard)."""
        self.path = Path(path)
        self.manifest = manifest
        self.verify = verify
        self._verified: dict[int, tuple[int, int, int]] = {}  # sample -> (inode, size, mtime) of the checked file

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Archive":
        path = Path(path)
        if not path.is_dir():
            raise ArchiveError(f"no run directory at {path}")
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
        table = read_parquet(self.path, path, SAMPLES, SAMPLE_KINDS)
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
    @contextmanager
    def _shard(self, sample: int) -> Iterator[tuple[Any, Any]]:
        """(the open shard file, its safetensors handle) of one sample: a regular file inside the run."""
        from safetensors import SafetensorError, safe_open

        if not isinstance(sample, (int, np.integer)) or not 0 <= sample < self.n_samples:
            raise ArchiveError(f"sample {sample!r} out of range: {self.run_id} has samples 0..{self.n_samples - 1}")
        path = self.path / self.manifest["shards"][int(sample)]
        if path.is_symlink() and self.path.resolve() not in path.resolve().parents:
            raise ArchiveError(f"{self.run_id}: shard for sample {sample} links outside the run directory "
                               f"({path.resolve()})")
        try:
            with open_regular(self.path, path, f"shard for sample {sample}") as f:
                with safe_open(fd_path(f, path), framework="np") as st:
                    yield f, st
        except SafetensorError as err:
            raise ArchiveError(f"{path} is damaged or not a safetensors file: {err}") from None
        except OSError as err:
            raise ArchiveError(f"{path} cannot be read: {err.strerror or err}") from None
        except (TypeError, AttributeError) as err:  # a dtype numpy lacks (bfloat16, float8) under an unknown key
            raise ArchiveError(f"{path}: a tensor cannot be read as numpy: {err}") from None

    def _check_shard(self, sample: int, f: Any, st: Any) -> None:
        """The shard says it is this sample, and (first read, or the file changed) its content matches the checksum
        the manifest records."""
        where = f"{self.run_id}: shard for sample {sample} ({self.manifest['shards'][sample]})"
        check_identity(st.metadata(), sample, self._sample_id(sample), where)
        want = (self.manifest.get("checksums") or [None] * self.n_samples)[sample]
        if not self.verify or want is None:
            return
        info = os.fstat(f.fileno())
        stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
        if self._verified.get(sample) == stamp:
            return
        got = file_digest(f)
        if got != want:
            raise ArchiveError(f"{where}: its content checksum {got[:19]}… differs from the manifest's "
                               f"{want[:19]}…: the shard was changed or damaged after capture; re-capture the run")
        self._verified[sample] = stamp

    def read(self, sample: int, key: str, index: tuple | None = None) -> np.ndarray:
        """One tensor of one sample by archive key, optionally sliced lazily (only the slice is read).

        The shard's header must declare the dtype and shape the manifest promises for the key; the shard must be
        this sample's, with the content the manifest's checksum says."""
        with self._shard(sample) as (f, st):
            if key not in st.keys():
                raise ArchiveError(f"{self.run_id}: sample {sample} has no tensor {key!r}")
            try:
                part = st.get_slice(key)
                stored = (DTYPES.get(part.get_dtype(), part.get_dtype()), list(part.get_shape()))
                promised = self._promises.get(key)
                if promised is not None and stored != promised:
                    raise ArchiveError(f"{self.run_id} sample {sample}: {key} is stored as {stored[0]} "
                                       f"{stored[1]}, the manifest promises {promised[0]} {promised[1]}")
                self._check_shard(sample, f, st)
                return st.get_tensor(key) if index is None else part[index]
            except (TypeError, AttributeError) as err:  # a dtype numpy lacks (bfloat16, float8) under an unknown key
                raise ArchiveError(f"{self.path / self.manifest['shards'][sample]}: tensor {key!r} cannot be read "
                                   f"as numpy: {err}") from None

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
        with self._shard(sample) as (f, st):
            check_identity(st.metadata(), sample, self._sample_id(sample), f"{self.run_id}: shard for sample "
                           f"{sample}")
            return sorted(st.keys())

    def _sample_id(self, sample: int) -> Any:
        return self.samples["sample_id"].iloc[sample] if "sample_id" in self.samples else None

    def shard_problem(self, sample: int) -> str | None:
        """What is wrong with one sample's shard, from its header and metadata (no data read), or None."""
        try:
            self.keys(sample)
        except ArchiveError as err:
            return str(err)
        return None

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
        return derived.derived_names(self.path)

    def derived(self, name: str) -> pd.DataFrame:
        """A derived table, its size and (for tables the pages plot) columns checked; `derived.MissingTable` when
        the run has none of that name."""
        return derived.read_derived(self.path, name)

    def annotations(self) -> list[dict[str, Any]]:
        return labels.read_labels(self.path)

    def add_annotation(self, label: dict[str, Any]) -> list[dict[str, Any]]:
        """Append one label under the run's lock (no concurrent save is lost); returns every label now saved."""
        return labels.add_label(self.path, label)

    def write_annotations(self, rows: list[dict[str, Any]]) -> Path:
        return labels.write_labels(self.path, rows)

    def __repr__(self) -> str:
        return f"Archive({self.run_id!r}, samples={self.n_samples}, steps={self.n_steps}, sites={self.sites})"


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 tensors are stored as their uint16 bit patterns (numpy has no bfloat16); this is exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)
