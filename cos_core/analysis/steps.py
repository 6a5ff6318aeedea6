"""Accuracy vs number of sampling steps, per task: the table that says which regime each task is in.

Owns `steps_table`, which turns the organism evaluation's `accuracy_vs_steps` record ({task: {n_steps: {n, accuracy,
accuracy_ci, by_difficulty}}}, as `cos_core.organism.evaluate.accuracy_vs_steps` returns it and the model card's
eval.json keeps it) into rows with Wilson intervals and the task's regime. Pure pandas; must not import torch,
organism or experiments.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import pandas as pd
from scipy.stats import binomtest

COLUMNS = ["task", "n_steps", "difficulty", "n", "accuracy", "ci_low", "ci_high", "regime"]


def wilson(successes: int, n: int) -> tuple[float, float]:
    """Wilson score 95 % interval of a proportion (scipy's), NaN for n = 0."""
    if n == 0:
        return math.nan, math.nan
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def steps_table(vs_steps: Mapping[str, Mapping[str, Mapping[str, Any]]],
                unique: Mapping[str, bool] | None = None) -> pd.DataFrame:
    """One row per (task, n_steps, difficulty): `difficulty` "all" or the task's difficulty bin; accuracy with its
    Wilson 95 % interval (recomputed from n and accuracy); regime "unique" / "noise-picked" from `unique`."""
    unique = unique or {}
    rows = []
    for task, per_k in vs_steps.items():
        if task in unique:
            regime = "unique" if unique[task] else "noise-picked"
        else:
            regime = ""
        for k, cell in per_k.items():
            parts = [("all", cell)] + [(f"bin {b}", c) for b, c in cell.get("by_difficulty", {}).items()]
            for difficulty, c in parts:
                n, acc = int(c["n"]), float(c["accuracy"])
                low, high = wilson(round(acc * n), n)
                rows.append({"task": task, "n_steps": int(k), "difficulty": difficulty, "n": n, "accuracy": acc,
                             "ci_low": low, "ci_high": high, "regime": regime})
    return pd.DataFrame(rows, columns=COLUMNS).sort_values(["task", "difficulty", "n_steps"], ignore_index=True)
