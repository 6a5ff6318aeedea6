"""Causal effects reported minus a null: paired differences with instance-bootstrap intervals and p-values, Holm's
correction across a family, and the activation-patching table.

Owns `paired_effect` (mean of a per-sample difference, its 95 % interval and a two-sided bootstrap p-value, all from
resampling whole instances), `holm` (Holm-Bonferroni adjusted p-values) and `patching_table` (per layer × step ×
null: flip and adoption rates of the patch, of the null and their difference, Holm-corrected across layers). The
runs are made by `cos_core.experiments.patching`. Pure numpy/pandas; must not import torch or experiments.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .stats import N_BOOT, bootstrap_weights, encode_groups, group_mean_ci

ALPHA = 0.05
METRICS = ("flip", "adopt")
# the outcome label whose value means the same thing in every instance of a task (the answer that transfers):
# recall's identity (which of 4 objects), dispatch's colour (which of 4 colours). Maze paths, arrows chains and
# fork's goal index (goal 0 of one maze is not goal 0 of another) do not transfer: instance pairs give flips only.
TRANSFER_LABELS = {"recall": "identity", "dispatch": "colour"}


def paired_effect(diff: np.ndarray, group: np.ndarray, n_groups: int, weights: np.ndarray
                  ) -> tuple[float, float, float, float]:
    """(mean, ci_low, ci_high, p) of per-sample differences `diff` (NaN = not measured, left out); p is the two-sided
    bootstrap p-value 2·min(P*(mean ≤ 0), P*(mean ≥ 0)) with the +1 correction, capped at 1."""
    diff = np.asarray(diff, dtype=np.float64)
    ok = np.isfinite(diff)
    if not ok.any():
        return np.nan, np.nan, np.nan, np.nan
    onehot = np.zeros((len(diff), n_groups))
    onehot[np.arange(len(diff)), group] = 1.0
    sums, counts = np.where(ok, diff, 0.0) @ onehot, ok.astype(np.float64) @ onehot  # (group,)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (weights @ sums) / (weights @ counts)  # (n_boot,)
    boot = boot[np.isfinite(boot)]
    mean, low, high = group_mean_ci(diff, group, n_groups, weights)
    below, above = int((boot <= 0).sum()), int((boot >= 0).sum())
    p = min(1.0, 2.0 * (min(below, above) + 1) / (len(boot) + 1))
    return float(mean), float(low), float(high), p


def holm(pvalues: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN and does not count towards the family size)."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    adjusted = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    out[order] = adjusted
    return out


def patching_table(samples: pd.DataFrame, n_boot: int = N_BOOT, alpha: float = ALPHA, seed: int = 0
                   ) -> pd.DataFrame:
    """One row per (layer, step, null, metric) from a `patching_samples` table.

    samples: one row per (recipient `sample`, `layer`, `step`, `tag`), tag "patch" for the patch from the donor
    with another answer and a null's name otherwise, with `instance`, bool `flipped` and `adopted` (NaN where the
    answer does not transfer). patch_rate / null_rate: the rates over recipients that have both rows; effect =
    patch − null, paired per recipient, with its interval and p-value; p_holm corrects across the layers of one
    (step, null, metric); significant = p_holm < alpha."""
    samples = samples.reset_index(drop=True)
    group, n_groups = encode_groups(samples["instance"].astype(str).to_numpy())
    weights = bootstrap_weights(n_groups, n_boot, seed)
    group_of = dict(zip(samples["sample"], group))
    key = ["sample", "layer", "step"]
    patch = samples[samples["tag"] == "patch"].set_index(key)
    rows = []
    for null in sorted(set(samples["tag"]) - {"patch"}):
        other = samples[samples["tag"] == null].set_index(key)
        both = patch.index.intersection(other.index)
        for (layer, step), idx in pd.Series(0, index=both).groupby(level=["layer", "step"]).groups.items():
            g = np.array([group_of[s] for s in idx.get_level_values("sample")])
            for metric in METRICS:
                col = "flipped" if metric == "flip" else "adopted"
                a = patch.loc[idx, col].to_numpy(dtype=float)
                b = other.loc[idx, col].to_numpy(dtype=float)
                effect, low, high, p = paired_effect(a - b, g, n_groups, weights)
                measured = np.isfinite(a - b)
                rows.append({"layer": int(layer), "step": int(step), "null": null, "metric": metric,
                             "patch_rate": float(np.nanmean(a)) if measured.any() else np.nan,
                             "null_rate": float(np.nanmean(b)) if measured.any() else np.nan,
                             "effect": effect, "ci_low": low, "ci_high": high, "p_value": p,
                             "n": int(measured.sum()), "n_instances": int(len(np.unique(g[measured])))})
    table = pd.DataFrame(rows, columns=["layer", "step", "null", "metric", "patch_rate", "null_rate", "effect",
                                        "ci_low", "ci_high", "p_value", "n", "n_instances"])
    table["p_holm"] = np.nan
    for _, idx in table.groupby(["step", "null", "metric"]).groups.items():
        table.loc[idx, "p_holm"] = holm(table.loc[idx, "p_value"].to_numpy())
    table["significant"] = table["p_holm"] < alpha
    return table.sort_values(["null", "metric", "step", "layer"], ignore_index=True)
