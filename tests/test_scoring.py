"""Scoring many videos: worker processes give exactly the inline scores, in order, and the outcome labels ride along."""

from __future__ import annotations

import numpy as np
import pytest

from cos_core.experiments.scoring import Scorer, default_workers
from cos_core.tasks import TEST_SEEDS, get_task


@pytest.mark.parametrize("name", ["maze", "dispatch"])
def test_worker_processes_score_like_the_inline_scorer(name):
    task = get_task(name)
    seeds = [TEST_SEEDS[i] for i in range(5)]
    videos = np.stack([task.instance(s).video for s in seeds])
    videos[1] = np.random.default_rng(0).normal(size=videos[1].shape)  # one unreadable video
    inline = Scorer(0).scores(task, seeds, videos).result()
    with Scorer(workers=1, chunk=2) as pool:  # 3 chunks in a spawned worker
        pending = pool.scores(task, seeds, videos)
        keys = pool.keys(task, videos)
        assert pending.result() == inline and keys.result() == [s["answer_key"] for s in inline]
    assert [s["correct"] for s in inline] == [True, False, True, True, True]
    if name == "dispatch":
        assert "outcome_colour" in inline[0] and inline[0]["outcome_colour"] is not None


def test_default_workers_and_bad_counts():
    assert default_workers("cpu") == 0 and default_workers("cuda:0") >= 0
    with pytest.raises(ValueError, match="workers=-1"):
        Scorer(-1)
