"""Accuracy vs number of sampling steps, measured: the organism on held-out instances of its trained tasks at each
step count, through the organism's own evaluation (`cos_core.organism.evaluate.accuracy_vs_steps`).

Owns `measure_steps` (the tasks' trained parameters from the pipeline, the held-out seeds, the call) returning the
`analysis.steps.steps_table` rows. Imports torch through the organism; never streamlit.
"""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd

from ..analysis.steps import steps_table
from ..organism.evaluate import STEP_COUNTS, accuracy_vs_steps
from ..tasks import get_task
from .replay import held_out_instances


def measure_steps(pipe: Any, tasks: Sequence[str], instances: int, first_instance: int = 0,
                  step_counts: Sequence[int] = STEP_COUNTS, batch_size: int = 200, seed: int = 0) -> pd.DataFrame:
    """Exact accuracy of the final video per task and number of steps on TEST_SEEDS[first:first + instances]."""
    trained = list(pipe.config.trained_tasks or pipe.config.task_names)
    unknown = [t for t in tasks if t not in trained]
    if unknown:
        raise ValueError(f"tasks {unknown} were not trained into this organism; trained: {', '.join(trained)}")
    if not step_counts or min(step_counts) < 1:
        raise ValueError(f"step counts {list(step_counts)} must be a non-empty list of integers >= 1")
    params = dict(pipe.config.task_params or {})
    seeds = {t: held_out_instances(first_instance, instances) for t in tasks}
    record = accuracy_vs_steps(pipe, seeds, step_counts, params, batch_size=batch_size, seed=seed)
    unique = {t: bool(get_task(t, **params.get(t, {})).answer_is_unique) for t in tasks}
    return steps_table(record, unique)
