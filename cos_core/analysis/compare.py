"""Two runs side by side (the Compare page): the samples they share, each run's discrete answer and correctness,
and how correctness moved from run A to run B.

Owns pairing by `sample_id` (same task instance and seed) and the counts the page shows; the discrete answer is the
task's own (`Task.answer_key`). Pure pandas over `samples.parquet` tables; must not import torch, streamlit, plots
or experiments.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from ..tasks import TASKS, Task


def paired_outcomes(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """The samples two runs share (same `sample_id`: same task instance and seed), with each run's discrete answer
    (`answer_key`: maze path, memory identity, choice index, fork goal; null when unreadable) and correctness side
    by side; `changed` marks a different discrete answer. Empty when they share none or are unscored."""
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
