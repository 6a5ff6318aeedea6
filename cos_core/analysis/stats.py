"""Shared numerics of the analyses: uncertainty for every number they report (bootstrap over instances, i.e.
groups) and the feature standardisation both probe engines apply.

Owns resampling whole instances (all seeds of one task instance move together, since they are not independent),
the percentile interval, and the rule "mean 0, std 1 per feature; near-constant features become 0" (`standardize`,
`STD_FLOOR`). Pure numpy; must not import torch, pandas, streamlit or any other analysis module.
"""

from __future__ import annotations

import numpy as np

CI_LEVEL = 0.95
N_BOOT = 1000
STD_FLOOR = 1e-6  # a feature whose std is below this fraction of the largest std counts as constant


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


def standardize(x: np.ndarray) -> np.ndarray:
    """(sample, feature) -> mean 0, std 1 per feature over all samples; near-constant features become 0."""
    x = x.astype(np.float64)
    mean, std = x.mean(0), x.std(0)
    keep = std > STD_FLOOR * max(float(std.max()), 1e-30)
    return np.where(keep, (x - mean) / np.where(keep, std, 1.0), 0.0)
