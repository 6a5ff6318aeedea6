"""Uncertainty for every number the analyses report: bootstrap over instances (groups) and Wilson intervals.

Owns resampling whole instances (all seeds of one task instance move together, since they are not independent)
and the percentile interval. Pure numpy; must not import torch, pandas or streamlit.
"""

from __future__ import annotations

import numpy as np

CI_LEVEL = 0.95
N_BOOT = 1000


def encode_groups(groups: np.ndarray) -> tuple[np.ndarray, int]:
    """Any group labels (n,) -> dense group index (n,) in [0, n_groups) and n_groups."""
    _, index = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    return index.astype(np.int64), int(index.max()) + 1 if len(index) else 0


def bootstrap_weights(n_groups: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """How often each group is drawn in each bootstrap replicate: (n_boot, n_groups) float64 counts."""
    if n_groups < 1:
        raise ValueError(f"bootstrap needs at least one group, got {n_groups}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot).astype(np.float64)


def group_mean_ci(values: np.ndarray, group: np.ndarray, n_groups: int, weights: np.ndarray,
                  level: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over samples and its percentile interval from resampling whole groups (NaN when nothing measured).

    values: (..., n) per-sample numbers (NaN = not measured, left out); group: (n,) dense group index;
    weights: (n_boot, n_groups) from `bootstrap_weights`. Returns mean, low, high, each of shape (...).
    """
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values)
    onehot = np.zeros((values.shape[-1], n_groups))
    onehot[np.arange(values.shape[-1]), group] = 1.0
    if ok.all():  # the common case: every sample measured, so the denominators are shared
        sums = values @ onehot  # (..., group)
        sizes = onehot.sum(0)  # (group,)
        mean = sums.sum(-1) / sizes.sum()
        boot = (sums @ weights.T) / (weights @ sizes)  # (..., n_boot)
        quantile = np.quantile
    else:
        sums = np.where(ok, values, 0.0) @ onehot  # (..., group)
        counts = ok.astype(np.float64) @ onehot  # (..., group)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = sums.sum(-1) / counts.sum(-1)
            boot = (sums @ weights.T) / (counts @ weights.T)  # (..., n_boot)
        quantile = np.nanquantile
    alpha = (1.0 - level) / 2.0
    if not np.isfinite(boot).any():
        return mean, np.full(np.shape(mean), np.nan), np.full(np.shape(mean), np.nan)
    return mean, quantile(boot, alpha, axis=-1), quantile(boot, 1.0 - alpha, axis=-1)
