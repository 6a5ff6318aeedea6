"""Layer specialisation inside one step (paper Fig. 6) as arrays and tables: the per-token L2 norm of every captured
block as a layer x frame x row x col grid, and the PCA of frame-mean block outputs over layers and steps.

Owns the long-table form of the token-norm grid and a seeded randomized PCA (`top_components`). Reads one step (or
one step at a time) from the archive. Pure numpy/pandas; must not import torch, streamlit, plots or experiments.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..archive import Archive


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
