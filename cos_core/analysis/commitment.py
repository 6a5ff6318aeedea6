"""When the answer is committed: the commitment curve from on-distribution re-noising, and which regime a task is in.

Owns `regime` (a task whose first frame fixes one right answer is "unique"; one whose noise picks among several
right answers is "noise-picked": every measurement says which it looks at) and `commitment_table`: per re-noised
step s and strength λ, P(the final answer equals the clean run's) when x̂0 of step s−1 is kept and a fraction λ of
the noise is redrawn (λ = 1: only x̂0 survives), with accuracy and unreadable outputs beside it. The runs are made by
`cos_core.experiments.interventions`. Pure numpy/pandas; must not import torch, streamlit or experiments.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .stats import N_BOOT, bootstrap_weights, encode_groups, group_mean_ci

UNIQUE, NOISE_PICKED = "unique", "noise-picked"


def regime(task: Any) -> str:
    """"unique" when the task's first frame fixes one right answer (`answer_is_unique`), else "noise-picked"."""
    return UNIQUE if bool(getattr(task, "answer_is_unique", True)) else NOISE_PICKED


def _rate(values: np.ndarray, group: np.ndarray, n_groups: int, weights: np.ndarray) -> tuple[float, float, float]:
    if not np.isfinite(values).any():
        return np.nan, np.nan, np.nan
    mean, low, high = group_mean_ci(values, group, n_groups, weights)
    return float(mean), float(low), float(high)


def commitment_table(samples: pd.DataFrame, task: Any, kind: str = "renoise_step", n_boot: int = N_BOOT,
                     seed: int = 0) -> pd.DataFrame:
    """One row per (strength, step) of `kind` rows in a per-sample interventions table (it needs the `clean` rows).

    same_rate: the fraction of samples with a readable clean answer whose re-noised run ends on that same answer;
    same_wrong: the same over samples whose clean answer is readable and wrong (is a wrong answer committed too?);
    accuracy and unreadable over all samples; 95 % intervals from resampling instances."""
    clean = samples[samples["kind"] == "clean"].set_index("sample")
    part = samples[samples["kind"] == kind].reset_index(drop=True)
    columns = ["step", "strength", "same_rate", "ci_low", "ci_high", "accuracy", "accuracy_ci_low",
               "accuracy_ci_high", "same_wrong", "same_wrong_ci_low", "same_wrong_ci_high", "unreadable",
               "clean_accuracy", "n", "n_readable", "n_wrong", "n_instances", "regime", "task"]
    if part.empty:
        return pd.DataFrame(columns=columns)
    group, n_groups = encode_groups(part["instance"].astype(str).to_numpy())
    weights = bootstrap_weights(n_groups, n_boot, seed)
    clean_key = part["sample"].map(clean["answer_key"])
    readable = clean_key.notna().to_numpy()
    clean_ok = part["sample"].map(clean["correct"]).astype(bool).to_numpy()
    same = (part["answer_key"] == clean_key).to_numpy(dtype=float)
    rows = []
    for (strength, step), idx in part.groupby(["strength", "step"], sort=True).groups.items():
        idx = np.asarray(idx)
        g = group[idx]
        on_readable = np.where(readable[idx], same[idx], np.nan)
        on_wrong = np.where(readable[idx] & ~clean_ok[idx], same[idx], np.nan)
        value, low, high = _rate(on_readable, g, n_groups, weights)
        acc, acc_low, acc_high = _rate(part["correct"].to_numpy(dtype=float)[idx], g, n_groups, weights)
        wrong, wrong_low, wrong_high = _rate(on_wrong, g, n_groups, weights)
        rows.append({"step": int(step), "strength": float(strength), "same_rate": value, "ci_low": low,
                     "ci_high": high, "accuracy": acc, "accuracy_ci_low": acc_low, "accuracy_ci_high": acc_high,
                     "same_wrong": wrong, "same_wrong_ci_low": wrong_low, "same_wrong_ci_high": wrong_high,
                     "unreadable": float(part["answer_key"].iloc[idx].isna().mean()),
                     "clean_accuracy": float(clean["correct"].mean()), "n": len(idx),
                     "n_readable": int(readable[idx].sum()), "n_wrong": int((readable[idx] & ~clean_ok[idx]).sum()),
                     "n_instances": int(part["instance"].iloc[idx].nunique()), "regime": regime(task),
                     "task": getattr(task, "name", "")})
    return pd.DataFrame(rows, columns=columns)
