"""What the dashboard reads from archives, as plain functions: runs directories, the runs table, x̂0 frames for the
steps grid, token-norm grids, the frame-mean PCA, and the columns each `derived/` table must have.

Owns the rules "which runs directories may be read" (configured roots only, real paths checked) and "how x̂0 becomes
pixels" (decoded frames, else pixel-space latents, else latent channels 0-2). Imports numpy/pandas and the archive
reader only: never streamlit, torch or diffusers. Reads are sliced so memory follows the thumbnails, not the run.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .archive import Archive, ArchiveError
from .archive.schema import MANIFEST, check_name

RUNS_ENV = "COS_RUNS_DIR"
DEFAULT_RUNS_DIR = "cached_runs"
PIXEL_CHANNELS = 3  # a latent with 3 channels is a pixel-space video in [-1, 1] (the organism)


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


def paired_outcomes(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """The samples two runs share (same `sample_id`: same task instance and seed), with each run's discrete answer
    (`answer_key`: maze path, memory identity, choice index, fork goal; null when unreadable) and correctness side
    by side; `changed` marks a different discrete answer. Empty when they share none or are unscored."""
    from .tasks import TASKS, Task

    cols = ["sample_id", "instance", "seed", "answer_a", "answer_b", "correct_a", "correct_b", "changed"]
    need = {"sample_id", "answer", "score_correct"}
    if not (need <= set(a.columns) and need <= set(b.columns)):
        return pd.DataFrame(columns=cols)

    def keys(table: pd.DataFrame) -> pd.Series:
        tasks = table["task"] if "task" in table else pd.Series("", index=table.index)
        return pd.Series([TASKS.get(str(t), Task).answer_key(json.loads(x)) if isinstance(x, str) and x else None
                          for t, x in zip(tasks, table["answer"])], index=table.index, dtype=object)

    left = a[["sample_id", "instance", "seed", "score_correct"]].assign(answer=keys(a))
    right = b[["sample_id", "score_correct"]].assign(answer=keys(b))
    both = left.merge(right, on="sample_id", suffixes=("_a", "_b"))
    both = both.rename(columns={"score_correct_a": "correct_a", "score_correct_b": "correct_b"})
    for col in ("correct_a", "correct_b"):  # True / False, or missing (NaN: that sample was not scored)
        score = both[col].astype(float)
        both[col] = pd.Series([None if pd.isna(v) else bool(v >= 0.5) for v in score], index=both.index, dtype=object)
    both["changed"] = [x != y for x, y in zip(both["answer_a"], both["answer_b"])]
    return both[cols].reset_index(drop=True)


def outcome_counts(paired: pd.DataFrame) -> dict[str, Any]:
    """Accuracy of each run on the shared samples both runs scored, and how correctness moved from A to B."""
    scored = paired[paired["correct_a"].notna() & paired["correct_b"].notna()]
    a, b = scored["correct_a"].astype(bool), scored["correct_b"].astype(bool)
    n = len(scored)
    return {"shared samples": len(paired), "accuracy A": float(a.mean()) if n else float("nan"),
            "accuracy B": float(b.mean()) if n else float("nan"), "fixed by B": int((~a & b).sum()),
            "broken by B": int((a & ~b).sum()), "answer changed": int(paired["changed"].sum())}


def shard_problems(archive: Archive) -> dict[int, str]:
    """{sample: message} for shards that are missing or damaged; reads each shard's header only."""
    from safetensors import SafetensorError, safe_open

    bad = {}
    for sample, rel in enumerate(archive.manifest["shards"]):
        path = archive.path / rel
        try:
            with safe_open(str(path), framework="np"):
                pass
        except (SafetensorError, OSError) as err:
            bad[sample] = f"{rel}: {err}"
    return bad


def sample_label(row: pd.Series) -> str:
    """How a sample is named in pickers: index, id, and its final score when there is one."""
    text = f"{int(row['sample'])} · {row.get('sample_id', '')}"
    if "score_correct" in row and pd.notna(row["score_correct"]):
        text += " ✓" if float(row["score_correct"]) >= 0.5 else " ✗"
    return text


# ---- x̂0 as pixels ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Frames:
    """Thumbnails for the steps grid: `pixels` (step, frame, h, w, 3) uint8, with what each axis holds."""

    pixels: np.ndarray
    steps: list[int]
    frames: list[int]
    source: str  # "decoded" | "pixel" | "latent"


def frame_source(archive: Archive) -> str:
    """'decoded' when the run has VAE-decoded frames, 'pixel' for pixel-space models, else 'latent'."""
    if archive.manifest.get("decoded"):
        return "decoded"
    if int(archive.manifest["latent"]["channels"]) == PIXEL_CHANNELS:
        return "pixel"
    return "latent"


def grid_steps(archive: Archive) -> list[int]:
    """Steps that have x̂0 frames to show (decoded steps, else the steps where x0_hat was captured)."""
    if frame_source(archive) == "decoded":
        return [int(s) for s in archive.manifest["decoded"]["steps"]]
    info = archive.manifest["tensors"].get("x0_hat")
    if info is None:
        raise ArchiveError(f"{archive.run_id} has neither decoded frames nor x0_hat: re-capture with "
                           "--tensors x0_hat (and --decode for latent-space models)")
    return [int(s) for s in info["steps"]]


def n_video_frames(archive: Archive) -> int:
    if frame_source(archive) == "decoded":
        return int(archive.manifest["decoded"]["shape"][0])
    return int(archive.manifest["latent"]["frames"])


def spread(values: list[int], n: int) -> list[int]:
    """At most `n` values evenly spread over `values`, first and last kept."""
    if n >= len(values):
        return list(values)
    if n <= 1:
        return [values[-1]]
    idx = np.unique(np.round(np.linspace(0, len(values) - 1, n)).astype(int))
    return [values[i] for i in idx]


def _stride(side: int, max_side: int) -> int:
    return max(1, int(np.ceil(side / max_side)))


def to_uint8(video: np.ndarray, source: str, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    """(C, F, H, W) float -> (F, H, W, 3) uint8: pixel space maps [-1, 1]; latents map [lo, hi] of channels 0-2."""
    rgb = video[:3] if video.shape[0] >= 3 else np.repeat(video[:1], 3, axis=0)
    if source == "pixel":
        lo, hi = -1.0, 1.0
    scaled = (np.nan_to_num(rgb.astype(np.float32)) - lo) / max(hi - lo, 1e-8)
    return (np.clip(scaled, 0.0, 1.0) * 255).round().astype(np.uint8).transpose(1, 2, 3, 0)


def x0_frames(archive: Archive, sample: int, steps: list[int], frames: list[int], max_side: int = 160) -> Frames:
    """x̂0 thumbnails for chosen steps and frames; reads one (step, frame) slice at a time."""
    source = frame_source(archive)
    out = []
    if source == "decoded":
        positions = archive.manifest["decoded"]["steps"]
        for step in steps:
            pos = archive._position(positions, step, "decoded step")
            h, w = archive.manifest["decoded"]["shape"][1:3]
            s = _stride(max(h, w), max_side)
            out.append(np.stack([archive.read(sample, "decoded/x0_hat", (pos, f))[::s, ::s].copy() for f in frames]))
        return Frames(np.stack(out), list(steps), list(frames), source)
    lo, hi = _latent_range(archive, sample) if source == "latent" else (-1.0, 1.0)
    for step in steps:
        video = archive.tensor("x0_hat", sample=sample, step=step)[:, frames]  # (C, frame, H, W)
        s = _stride(max(video.shape[-2:]), max_side)
        out.append(to_uint8(video[..., ::s, ::s], source, lo, hi))
    return Frames(np.stack(out), list(steps), list(frames), source)


def _latent_range(archive: Archive, sample: int) -> tuple[float, float]:
    """A fixed colour range for latent channels 0-2: the 1st-99th percentile of the final latent."""
    final = archive.read(sample, "final")[:3]
    lo, hi = np.percentile(final, [1, 99])
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def final_frames(archive: Archive, sample: int, max_side: int = 256) -> np.ndarray:
    """The final video (F, h, w, 3) uint8: decoded frames, else the final latent rendered like x̂0."""
    source = frame_source(archive)
    if source == "decoded":  # frame by frame with a stride: memory follows the thumbnails, not the video
        n, h, w = archive.manifest["decoded"]["shape"][:3]
        s = _stride(max(h, w), max_side)
        # copy: a strided view would keep each full frame alive until the stack
        return np.stack([archive.read(sample, "decoded/final", (f,))[::s, ::s].copy() for f in range(n)])
    final = archive.read(sample, "final")  # (C, F, H, W)
    lo, hi = _latent_range(archive, sample) if source == "latent" else (-1.0, 1.0)
    s = _stride(max(final.shape[-2:]), max_side)
    return to_uint8(final[..., ::s, ::s], source, lo, hi)


def frames_table(frames: Frames, sigma: dict[int, float] | None = None) -> pd.DataFrame:
    """The thumbnails as a long table: step, sigma, frame, row, col, r, g, b (the figure's data download)."""
    s, f, h, w, _ = frames.pixels.shape
    idx = np.indices((s, f, h, w)).reshape(4, -1)
    rgb = frames.pixels.reshape(-1, 3)
    steps = np.asarray(frames.steps)[idx[0]]
    return pd.DataFrame({"step": steps, "sigma": [(sigma or {}).get(int(x), np.nan) for x in steps],
                         "frame": np.asarray(frames.frames)[idx[1]], "row": idx[2], "col": idx[3],
                         "r": rgb[:, 0], "g": rgb[:, 1], "b": rgb[:, 2]})


def video_table(video: np.ndarray) -> pd.DataFrame:
    """(frame, h, w, 3) uint8 as a long table: frame, row, col, r, g, b."""
    f, h, w, _ = video.shape
    idx = np.indices((f, h, w)).reshape(3, -1)
    rgb = video.reshape(-1, 3)
    return pd.DataFrame({"frame": idx[0], "row": idx[1], "col": idx[2], "r": rgb[:, 0], "g": rgb[:, 1],
                         "b": rgb[:, 2]})


def final_gif(archive: Archive, sample: int) -> bytes:
    return gif_bytes(final_frames(archive, sample))


def upscale(pixels: np.ndarray, min_side: int = 96) -> np.ndarray:
    """Nearest-neighbour upscaling of (..., h, w, 3) so tiny videos (24x24) stay crisp on screen."""
    k = max(1, int(np.ceil(min_side / max(pixels.shape[-3:-1]))))
    return pixels if k == 1 else pixels.repeat(k, axis=-3).repeat(k, axis=-2)


def gif_bytes(video: np.ndarray, fps: float = 4.0) -> bytes:
    """(F, h, w, 3) uint8 -> an animated GIF that loops (the final video as the browser plays it)."""
    import io

    from PIL import Image

    images = [Image.fromarray(f) for f in upscale(video, 160)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return buf.getvalue()


# ---- layers --------------------------------------------------------------------------------------------------
def token_norm_grid(archive: Archive, site: str, sample: int, step: int, branch: str) -> np.ndarray:
    """Per-token L2 norm of every captured block at one step: (layer, frame, row, col) (paper Fig. 6), as float32
    (runs may store float16, which plotly's JSON encoder refuses)."""
    return archive.act(site, "token_norm", sample=sample, step=step, branch=branch).astype(np.float32)


def token_norm_table(grid: np.ndarray, layers: list[int]) -> pd.DataFrame:
    """(layer, frame, row, col) as a long table: layer, frame, row, col, norm."""
    idx = np.indices(grid.shape).reshape(4, -1)
    return pd.DataFrame({"layer": np.asarray(layers)[idx[0]], "frame": idx[1], "row": idx[2], "col": idx[3],
                         "norm": grid.reshape(-1)})


def top_components(points: np.ndarray, k: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of `points` (n, d) on their top-k principal axes and the explained-variance ratios, by a
    seeded randomized range finder (a full SVD of 1,500 x 1,536 took 40 s on a busy 2-core machine; this takes
    milliseconds and matches it to float precision for well-separated components)."""
    centred = points - points.mean(axis=0)
    total = float((centred**2).sum())
    rank = min(centred.shape)
    if total == 0 or rank == 0:
        return np.zeros((len(points), k)), np.zeros(k)
    q = np.random.default_rng(seed).standard_normal((centred.shape[1], min(k + 10, rank)))
    y, _ = np.linalg.qr(centred @ q)  # (n, k + 10)
    for _ in range(4):  # power iterations sharpen the captured subspace
        y, _ = np.linalg.qr(centred @ (centred.T @ y))
    _, sv, vt = np.linalg.svd(y.T @ centred, full_matrices=False)
    coords = centred @ vt[:k].T  # (n, <= k)
    ratio = sv[:k] ** 2 / total
    if coords.shape[1] < k:
        coords = np.hstack([coords, np.zeros((len(coords), k - coords.shape[1]))])
        ratio = np.concatenate([ratio, np.zeros(k - len(ratio))])
    return coords, ratio


def frame_mean_pca(archive: Archive, site: str, sample: int, branch: str) -> tuple[pd.DataFrame, np.ndarray]:
    """PCA of frame-averaged block outputs over (step, layer): a table step, layer, sigma, pc1, pc2 and the
    explained-variance ratios. Each point is one block's output at one step, averaged over frames."""
    info = archive.site(site)
    points = np.concatenate([archive.act(site, "frame_mean", sample=sample, step=s, branch=branch).mean(axis=1)
                             for s in info["steps"]]).astype(np.float64)  # (step * layer, d), one step read at a time
    coords, ratio = top_components(points, 2)
    steps, layers = info["steps"], info["layers"]
    sigma = dict(zip(archive.steps["step"], archive.steps["sigma"]))
    table = pd.DataFrame({"step": np.repeat(steps, len(layers)), "layer": np.tile(layers, len(steps)),
                          "pc1": coords[:, 0], "pc2": coords[:, 1]})
    table["sigma"] = table["step"].map(sigma)
    return table, ratio


# ---- derived tables: the columns the pages plot (docs/dashboard.md is the long form) ------------------------------
@dataclass(frozen=True)
class DerivedSpec:
    required: tuple[str, ...]
    optional: tuple[str, ...]
    what: str


DERIVED: dict[str, DerivedSpec] = {
    # written by `cos analyze` (cos_core.analysis): the pages follow its columns
    "step_answers": DerivedSpec(("sample", "step", "correct"), ("answer", "answer_key", "score", "matches_final",
                                                                "sigma", "expert"),
                                "the task's answer read from x̂0 at every step, per sample"),
    "convergence": DerivedSpec(("sample", "step", "dist_final"), ("dist_final_rel", "scene_dist", "motion_dist",
                                                                 "motion_match", "sigma"),
                               "distance of each step's x̂0 to the final output, per sample"),
    "probe_grid": DerivedSpec(("label", "layer", "step", "accuracy", "chance"),
                              ("ci_low", "ci_high", "selectivity", "selectivity_ci_low", "selectivity_ci_high",
                               "control_accuracy", "chance_uniform", "n", "n_instances", "task", "site",
                               "reduction", "branch", "pool", "frames", "kind", "engine", "sigma", "expert"),
                              "linear-probe accuracy per (layer, step) cell and label, with chance and selectivity"),
    "events": DerivedSpec(("sample", "kind", "step"), ("key_before", "key_after", "score_before", "score_after",
                                                      "change_spread", "sigma", "expert", "sample_id", "task"),
                          "step-dynamics events per sample: self_correction, regression, enhancement, emergence, "
                          "switch"),
    "event_rates": DerivedSpec(("kind", "step", "rate"), ("task", "n_events", "n", "n_instances", "ci_low",
                                                         "ci_high", "sigma"),
                               "per task, event kind and step: the fraction of samples with that event there"),
    "memory": DerivedSpec(("step", "frame", "measure", "value"), ("source", "phase", "layer", "ci_low", "ci_high",
                                                                 "chance", "n", "n_instances", "sigma"),
                          "how well the hidden object's identity/position is kept, per step x frame (x̂0) and per "
                          "layer x step (probes)"),
    # not written by `cos analyze` yet: the columns the pages will plot (docs/dashboard.md)
    "interventions": DerivedSpec(("kind", "position", "value"), ("metric", "ci_low", "ci_high", "n", "baseline"),
                                 "noise_step / noise_frame re-scores and layer_swap flip rates"),
    "propagation": DerivedSpec(("inject_step", "measure_step", "dissimilarity"), ("n",),
                               "1 - linear CKA between clean and perturbed runs, inject step x measure step"),
    "ensemble": DerivedSpec(("method", "k", "n", "accuracy"), ("ci_low", "ci_high", "n_instances"),
                            "latent-ensemble accuracy over merge steps K and seeds n, with the noise-mean control"),
}


def check_derived(name: str, table: pd.DataFrame) -> pd.DataFrame:
    """The table unchanged if it has the columns the pages plot, else ArchiveError naming what is missing.
    An empty table is valid (e.g. no events in a run); the page says so."""
    if name not in DERIVED:
        raise ValueError(f"unknown derived table {name!r}; the dashboard plots: {sorted(DERIVED)}")
    missing = [c for c in DERIVED[name].required if c not in table.columns]
    if missing:
        raise ArchiveError(f"derived/{name} lacks column(s) {missing}; the dashboard expects "
                           f"{list(DERIVED[name].required)} (see docs/dashboard.md); it has {list(table.columns)}")
    return table
