"""x̂0 and the final video as pixels: which frames a run can show, thumbnails sliced from the archive (memory follows
the thumbnails, not the run), long tables of them for downloads, upscaling and GIFs (what `plots` and pages need).

Owns the rule "how x̂0 becomes pixels" (decoded frames, else pixel-space latents, else latent channels 0-2). Imports
numpy/pandas/PIL and the archive reader only: never streamlit, torch, diffusers, analysis or plots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .archive import Archive, ArchiveError

PIXEL_CHANNELS = 3  # a latent with 3 channels is a pixel-space video in [-1, 1] (the organism)


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
