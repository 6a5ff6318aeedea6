"""Step dynamics on planted trajectories: the event detector finds a planted flip (and its kind, step and
globality) and no event in a constant or flickering trajectory; convergence and perception-before-action read the
planted order; answer trajectories come from the real task extractors on real task frames."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cos_core.analysis.dynamics import (DynamicsConfig, change_spread, convergence, detect_events, phase_steps,
                                        sample_trajectory, settle_index)
from cos_core.analysis.step_frames import StepFrames
from cos_core.tasks import TEST_SEEDS, get_task


def test_planted_flip_is_found_with_its_kind_and_step():
    keys = ["a", "a", "a", "b", "b", "b"]
    correct = np.array([0, 0, 0, 1, 1, 1])
    events = detect_events(keys, correct, correct.astype(float))
    assert [(e["kind"], e["index"], e["key_before"], e["key_after"]) for e in events] == \
        [("self_correction", 3, "a", "b")]
    events = detect_events(keys, 1 - correct, (1 - correct).astype(float))
    assert [(e["kind"], e["index"]) for e in events] == [("regression", 3)]


def test_no_event_in_a_constant_trajectory():
    for keys, ok in [(["a"] * 8, np.ones(8)), (["a"] * 8, np.zeros(8)), ([None] * 8, np.zeros(8))]:
        assert detect_events(keys, ok, np.full(8, 0.5)) == []


def test_a_one_step_flicker_is_not_an_event_unless_persist_is_one():
    keys = ["a", "a", "b", "a", "a", "a"]
    correct = np.array([0, 0, 1, 0, 0, 0])
    assert detect_events(keys, correct, correct.astype(float)) == []
    kinds = [e["kind"] for e in detect_events(keys, correct, correct.astype(float), DynamicsConfig(persist=1))]
    assert kinds == ["self_correction", "regression"]


def test_enhancement_emergence_and_switch():
    score = np.array([0.2, 0.2, 0.6, 0.7, 0.7])
    events = detect_events(["p"] * 5, np.zeros(5), score)
    assert [(e["kind"], e["index"]) for e in events] == [("enhancement", 2)]
    events = detect_events(["p"] * 4, np.array([0, 0, 1, 1]), np.array([0.5, 0.5, 1.0, 1.0]))  # same answer, now
    assert [(e["kind"], e["index"]) for e in events] == [("enhancement", 2)]  # complete enough to grade right
    events = detect_events([None, None, "x", "x"], np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1.0]))
    assert [e["kind"] for e in events] == ["emergence"]
    events = detect_events(["a", "a", "b", "b"], np.zeros(4), np.zeros(4))
    assert [(e["kind"], e["index"]) for e in events] == [("switch", 2)]


@pytest.mark.parametrize("name", ["fork", "maze", "recall", "dispatch"])
def test_unreadable_then_right_is_emergence_through_the_dataframe_path(name):
    """The keys reach `detect_events` through a DataFrame column, where an unreadable answer (None) becomes NaN:
    x̂0 showing only the first frame (nothing readable) for 3 steps, then the ground truth, is an emergence, and a
    readable wrong answer before the truth is a self-correction."""
    task = get_task(name)
    inst = task.instance(TEST_SEEDS[3])
    blank = np.broadcast_to(inst.video[:, :1], inst.video.shape).astype(np.float32)
    frames = np.stack([blank] * 3 + [inst.video] * 3).astype(np.float32)
    traj, events, _ = sample_trajectory(task, inst, StepFrames(list(range(6)), frames, inst.video), DynamicsConfig())
    assert traj["answer_key"].isna().tolist() == [True] * 3 + [False] * 3  # NaN in the column, not None
    assert [(e["kind"], e["step"], e["key_before"]) for e in events] == [("emergence", 3, None)]
    keys = traj["answer_key"].tolist()  # the same trajectory with a readable wrong answer first
    keys[:3] = ['"other"'] * 3
    assert [e["kind"] for e in detect_events(keys, traj["correct"].to_numpy(), traj["score"].to_numpy())] == \
        ["self_correction"]


def test_missing_keys_of_any_kind_count_as_unreadable():
    correct = np.array([0, 0, 1, 1])
    for missing in (None, float("nan"), np.nan, pd.NA):
        events = detect_events([missing, missing, "x", "x"], correct, correct.astype(float))
        assert [(e["kind"], e["key_before"]) for e in events] == [("emergence", None)]
    assert detect_events([np.nan] * 6, np.zeros(6), np.full(6, 0.5)) == []  # NaN != NaN must not make a switch


def test_change_spread_tells_global_from_local_revisions():
    before = np.zeros((3, 8, 6, 6))
    local, everywhere = before.copy(), before + 0.5
    local[:, 3] = 1.0
    assert change_spread(before, local) == pytest.approx(1 / 8) and change_spread(before, everywhere) == 1.0


def test_scene_settles_before_motion_appears():
    """Final video: a static background and a dot moving right. x0_hat: the background is right from step 2, the
    dot's motion only from step 5; convergence and the phase steps must say so."""
    n_steps, final = 8, np.full((3, 6, 10, 10), -1.0)
    final[0, :, :, :4] = 0.5  # static red band
    for f in range(6):
        final[:, f, 7, 2 + f] = 1.0  # moving white dot
    rng = np.random.default_rng(0)
    frames = []
    for s in range(n_steps):
        frame = rng.normal(scale=0.8, size=final.shape) if s < 2 else np.broadcast_to(final[:, :1], final.shape).copy()
        if s >= 5:
            frame = final.copy()
        frames.append(frame)
    conv = convergence(np.stack(frames), final)
    assert conv["dist_final"].iloc[-1] == 0 and conv["dist_final_rel"].iloc[0] == 1.0
    assert (conv["motion_match"].iloc[5:] > 0.99).all() and (conv["motion_match"].iloc[:5] < 0.5).all()
    phases = phase_steps(conv, list(range(n_steps)), DynamicsConfig())
    assert phases["motion_appear_step"] == 5 and phases["scene_settle_step"] <= 2 and phases["perception_first"]


def test_settle_index():
    assert settle_index(np.array([1.0, 0.5, 0.1, 0.3, 0.05]), 0.2) == 4
    assert settle_index(np.array([1.0, 0.1, 0.1]), 0.2) == 1
    assert settle_index(np.array([0.01, 0.01, 0.0]), 0.2) == 0  # right from the start (a near-deterministic model)
    assert settle_index(np.array([1.0, 1.0, 0.5]), 0.2) is None
    assert settle_index(np.array([np.nan, 0.0]), 0.2) is None


@pytest.mark.parametrize("name", ["maze", "choice", "fork"])
def test_trajectory_reads_real_task_frames(name):
    """x0_hat = noise for 2 steps, then the ground truth: the extractor's answer appears at step 2 and stays."""
    task = get_task(name)
    inst = task.instance(TEST_SEEDS[3])
    rng = np.random.default_rng(0)
    frames = np.stack([rng.normal(size=inst.video.shape), rng.normal(size=inst.video.shape), inst.video, inst.video])
    traj, events, cands = sample_trajectory(task, inst, StepFrames([0, 1, 2, 3], frames.astype(np.float32),
                                                                    inst.video), DynamicsConfig())
    assert traj["correct"].tolist() == [False, False, True, True]
    assert traj["matches_final"].tolist()[2:] == [True, True]
    assert traj["answer_key"].iloc[3] == task.answer_key(task.extract(inst.video))
    at_truth = [e for e in events if e["step"] >= 2]  # (what noise reads at steps 0-1 is the extractor's business)
    assert [e["step"] for e in at_truth] == [2]
    assert at_truth[0]["kind"] in ("self_correction", "emergence", "enhancement") and at_truth[0]["score_after"] == 1
    if name == "choice":
        assert traj["n_alive"].iloc[3] == 1 and traj["answer_mass"].iloc[3] == pytest.approx(1.0, abs=0.05)
        assert len(cands) == 4 * task.config.k and sum(c["is_answer"] for c in cands) == 4
    if name == "fork":  # two goals, one walked: one candidate alive at the end, and it is the final's
        assert traj["n_alive"].iloc[3] == 1 and len(cands) == 4 * 2
        assert [c["candidate"] for c in cands if c["is_final"]] == [inst.meta["gt_goal"]] * 4
    if name == "maze":
        assert traj["explored_cells"].iloc[3] == 0


def test_the_task_is_built_with_the_runs_own_task_params():
    """`cos capture` records {task: params} (the shipped organism's 9x9 maze); a task absent from it, or an empty
    record, gets the defaults; an old flat record is read as the task's parameters."""
    from types import SimpleNamespace

    from cos_core.analysis.step_frames import task_for

    def run(params):
        return SimpleNamespace(run_id="r", manifest={"config": {"task_params": params}})

    maze = task_for(run({"maze": {"size": 9, "cell_px": 2, "min_path": 14}}), "maze")
    assert (maze.config.size, maze.config.cell_px, maze.config.min_path) == (9, 2, 14)
    assert task_for(run({"maze": {"size": 9}}), "fork").config == get_task("fork").config
    assert task_for(run({}), "maze").config == get_task("maze").config
    assert task_for(run({"size": 4}), "maze").config.size == 4
    with pytest.raises(ValueError, match="must be an object"):
        task_for(run([1]), "maze")


def test_config_is_validated():
    with pytest.raises(ValueError, match="persist=0"):
        DynamicsConfig(persist=0)
    with pytest.raises(ValueError, match="settle=1.5"):
        DynamicsConfig(settle=1.5)
