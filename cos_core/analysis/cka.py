"""Linear centred kernel alignment (Kornblith et al. 2019): how similar two sets of representations are.

Owns `linear_cka` (one pair) and `cka_matrix` (every pair of two lists, e.g. inject step x measure step in the
paper's propagation map, Fig. 3c, where 1 - CKA is the dissimilarity). Pure numpy in float64; validation names
the bad input. Must not import torch, pandas or streamlit.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"{name} must be (sample, feature...), got shape {x.shape}")
    x = x.reshape(x.shape[0], -1)
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"{name} has shape {x.shape}: CKA needs >= 2 samples and >= 1 feature")
    if not np.isfinite(x).all():
        rows = np.flatnonzero(~np.isfinite(x).all(1))
        raise ValueError(f"{name} holds NaN/inf in samples {rows[:10].tolist()}")
    return x - x.mean(0, keepdims=True)


def _gram(x: np.ndarray) -> np.ndarray:
    return x @ x.T


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), rows = the same samples in both.

    1 for representations equal up to an orthogonal transform, isotropic scaling and a shift; 0 when independent
    (in expectation it is above 0 for finite samples). ValueError when either side is constant (undefined).
    """
    x, y = _as_matrix(x, "x"), _as_matrix(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples and y has {y.shape[0]}: CKA compares the same samples")
    n = x.shape[0]
    if x.shape[1] > n or y.shape[1] > n:  # the n x n form is cheaper when features outnumber samples
        kx, ky = _gram(x), _gram(y)
        cross, norm_x, norm_y = (kx * ky).sum(), np.linalg.norm(kx), np.linalg.norm(ky)
    else:
        cross = np.linalg.norm(y.T @ x) ** 2
        norm_x, norm_y = np.linalg.norm(x.T @ x), np.linalg.norm(y.T @ y)
    if norm_x == 0 or norm_y == 0:
        raise ValueError(f"CKA is undefined: {'x' if norm_x == 0 else 'y'} is constant across samples")
    return float(cross / (norm_x * norm_y))


def cka_matrix(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]) -> np.ndarray:
    """(len(xs), len(ys)) matrix of linear CKA between every x in xs and every y in ys (centred Grams reused)."""
    grams_x = [_gram(_as_matrix(x, f"xs[{i}]")) for i, x in enumerate(xs)]
    grams_y = [_gram(_as_matrix(y, f"ys[{j}]")) for j, y in enumerate(ys)]
    sizes = {g.shape[0] for g in grams_x + grams_y}
    if len(sizes) != 1:
        raise ValueError(f"every representation must have the same samples; sample counts found: {sorted(sizes)}")
    norms_x = np.array([np.linalg.norm(g) for g in grams_x])
    norms_y = np.array([np.linalg.norm(g) for g in grams_y])
    if (norms_x == 0).any() or (norms_y == 0).any():
        raise ValueError("CKA is undefined for a representation that is constant across samples: "
                         f"xs {np.flatnonzero(norms_x == 0).tolist()}, ys {np.flatnonzero(norms_y == 0).tolist()}")
    fx = np.stack([g.ravel() for g in grams_x])
    fy = np.stack([g.ravel() for g in grams_y])
    return (fx @ fy.T) / np.outer(norms_x, norms_y)
