"""Fork task: registry id, determinism, two equally near goals checked by an independent BFS, both solutions score
correct, a pixel blend of both is not an answer but two live candidates, garbage never raises, bad params refused."""

from __future__ import annotations

import json
from collections import deque

import numpy as np
import pytest

from cos_core.tasks import TASK_NAMES, TASKS, TEST_SEEDS, VIDEO_SHAPE, get_task
from cos_core.tasks import maze as maze_mod

SEEDS = [0, 1, 7, 123, TEST_SEEDS[0], TEST_SEEDS[0] + 99]
TRACE, FLOOR, GOAL, AGENT = (maze_mod.PALETTE[k] for k in (maze_mod.TRACE, maze_mod.FLOOR, maze_mod.GOAL,
                                                            maze_mod.AGENT))


@pytest.fixture(scope="module")
def task():
    return get_task("fork")


def test_registered_last_and_other_ids_unchanged(task):
    assert list(TASKS)[:3] == ["maze", "memory", "choice"] and list(TASKS)[3] == "fork" == TASK_NAMES[3]
    assert [get_task(name).task_id for name in ("maze", "memory", "choice", "fork")] == [0, 1, 2, 3]
    inst = task.instance(0)
    assert inst.task == "fork" and inst.task_id == 3 and inst.video.shape == VIDEO_SHAPE
    assert "gt_goal" not in inst.labels and inst.meta["gt_goal"] in (0, 1)


def test_deterministic_and_batch_equals_single(task):
    a, b = task.instance(42), task.instance(42)
    assert np.array_equal(a.video, b.video) and a.labels == b.labels and a.meta == b.meta
    assert not np.array_equal(a.video, task.instance(43).video)
    videos, task_ids = task.instances(SEEDS)
    assert videos.shape == (len(SEEDS), *VIDEO_SHAPE) and (task_ids == 3).all()
    for video, seed in zip(videos, SEEDS):
        assert np.array_equal(video, task.instance(seed).video)
    json.dumps(a.meta)


def _graph(meta):
    n, adjacent = meta["size"], {}
    for r, row in enumerate(meta["right_open"]):
        for c, is_open in enumerate(row):
            if is_open:
                adjacent.setdefault((r, c), set()).add((r, c + 1))
                adjacent.setdefault((r, c + 1), set()).add((r, c))
    for r, row in enumerate(meta["down_open"]):
        for c, is_open in enumerate(row):
            if is_open:
                adjacent.setdefault((r, c), set()).add((r + 1, c))
                adjacent.setdefault((r + 1, c), set()).add((r, c))
    return n, adjacent


def _distances(adjacent, start):
    dist, queue = {start: 0}, deque([start])
    while queue:
        here = queue.popleft()
        for nxt in adjacent.get(here, ()):
            if nxt not in dist:
                dist[nxt] = dist[here] + 1
                queue.append(nxt)
    return dist


@pytest.mark.parametrize("params", [{}, {"max_shared": 0, "min_path": 8}, {"size": 3, "cell_px": 6, "min_path": 4}])
def test_two_goals_equally_near_with_distinct_paths(params):
    task = get_task("fork", **params)
    c = task.config
    for seed in range(30):
        meta = task.instance(seed).meta
        n, adjacent = _graph(meta)
        n_edges = sum(len(v) for v in adjacent.values()) // 2
        dist = _distances(adjacent, tuple(meta["start"]))
        assert n_edges == n * n - 1 and len(dist) == n * n, "not a perfect maze (spanning tree)"
        goals, paths = [tuple(g) for g in meta["goals"]], [[tuple(p) for p in path] for path in meta["paths"]]
        assert goals[0] != goals[1] and dist[goals[0]] == dist[goals[1]] >= c.min_path - 1
        for goal, path in zip(goals, paths):
            assert path[0] == tuple(meta["start"]) and path[-1] == goal and len(path) == dist[goal] + 1
            assert all(b in adjacent[a] for a, b in zip(path, path[1:])), "a solution goes through a wall"
        shared = next(k for k in range(len(paths[0])) if paths[0][k] != paths[1][k]) - 1  # moves before the split
        assert shared == meta["fork_depth"] <= c.max_shared
        assert not set(paths[0][shared + 1:]) & set(paths[1][shared + 1:]), "the solutions meet again after the fork"
        assert goals[1 - meta["gt_goal"]] not in paths[meta["gt_goal"]]


def test_pixels_show_both_goals_and_walk_to_one(task):
    (oy, ox), p = (1, 1), 4
    for seed in SEEDS:
        inst = task.instance(seed)
        assert inst.meta["origin"] == [oy, ox]
        gt = inst.meta["gt_goal"]
        for k, (r, c) in enumerate(inst.meta["goals"]):
            centre = inst.video[:, :, oy + r * p + 2, ox + c * p + 2]  # (3, frame)
            assert np.array_equal(centre[:, 0], GOAL) and np.array_equal(centre[:, -1], AGENT if k == gt else GOAL)
            if k != gt:
                assert (centre == GOAL[:, None]).all(), "the goal not walked to stays red in every frame"


def test_both_solutions_score_correct(task):
    for seed in SEEDS:
        inst = task.instance(seed)
        gt = inst.meta["gt_goal"]
        assert np.array_equal(task.solution_video(inst, gt), inst.video)
        other = task.solution_video(inst, 1 - gt)
        assert np.array_equal(other[:, 0], inst.video[:, 0]) and not np.array_equal(other, inst.video)
        for video, goal in ((inst.video, gt), (other, 1 - gt)):
            answer = task.extract(video)
            json.dumps(answer)
            assert answer["goal"] == goal and answer["path"] == inst.meta["paths"][goal]
            score = task.score(answer, inst)
            assert score["correct"] == 1.0 and score["cell_iou"] == score["score"] == 1.0 and score["goal"] == goal
            assert np.array_equal(task.candidates(video, inst), np.eye(2, dtype=np.float32)[goal])


def test_blend_of_both_is_two_candidates_not_an_answer(task):
    for seed in SEEDS:
        inst = task.instance(seed)
        a, b = task.solution_video(inst, 0), task.solution_video(inst, 1)
        for w in (0.5, 0.3):
            mass = task.candidates(w * a + (1 - w) * b, inst)
            assert mass.shape == (2,) and np.allclose(mass, [w, 1 - w], atol=1e-5), mass
        score = task.score(task.extract(0.5 * (a + b)), inst)
        assert score["correct"] == 0.0 and score["goal"] == -1.0 and score["cell_iou"] < 1.0

        both = np.maximum(a, b)  # both traces drawn in full (trace and agent beat floor, channel by channel)
        both[:, -1][:, (a[:, -1] == AGENT[:, None, None]).all(0)] = AGENT[:, None]
        both[:, -1][:, (b[:, -1] == AGENT[:, None, None]).all(0)] = AGENT[:, None]
        score = task.score(task.extract(both), inst)
        assert score["correct"] == 0.0 and np.allclose(task.candidates(both, inst), 1.0)


def test_wrong_traces_score_lower(task):
    for seed in range(6):
        inst = task.instance(seed)
        gt = inst.meta["gt_goal"]
        shortened = inst.video.copy()  # the cell after the start left unpainted
        r, c = inst.meta["paths"][gt][1]
        rows, cols = task._cell_slices(r * task.config.size + c)
        shortened[:, -1, rows, cols] = FLOOR[:, None, None]
        score = task.score(task.extract(shortened), inst)
        assert score["correct"] == 0.0 and 0.5 < score["cell_iou"] < 1.0 and score["goal"] == -1.0

        painted = inst.video.copy()  # trace over every wall: crossings
        walls = (inst.video[:, 0] == maze_mod.PALETTE[maze_mod.WALL][:, None, None]).all(0)
        painted[:, -1][:, walls] = TRACE[:, None]
        score = task.score(task.extract(painted), inst)
        assert score["correct"] == 0.0 and score["wall_crossings"] > 0


def test_garbage_never_raises(task):
    rng, inst = np.random.default_rng(0), task.instance(3)
    garbage = [rng.uniform(-1, 1, VIDEO_SHAPE), rng.normal(0, 3, VIDEO_SHAPE), np.zeros(VIDEO_SHAPE),
               np.ones(VIDEO_SHAPE), np.full(VIDEO_SHAPE, np.nan),
               np.where(rng.random(VIDEO_SHAPE) < 0.5, np.inf, -np.inf), inst.video + rng.normal(0, 0.3, VIDEO_SHAPE)]
    for frames in garbage:
        answer = task.extract(frames)
        json.dumps(answer)
        assert answer["goal"] in (0, 1, None)
        score = task.score(answer, inst)
        assert set(score) >= {"correct", "score", "cell_iou", "goal"} and 0.0 <= score["score"] <= 1.0
        mass = task.candidates(frames, inst)
        assert mass.shape == (2,) and np.isfinite(mass).all() and ((0 <= mass) & (mass <= 1)).all()
    for frames in garbage[:6]:
        assert task.score(task.extract(frames), inst)["correct"] == 0.0
    with pytest.raises(ValueError, match="expects"):
        task.candidates(np.zeros((3, 8, 24, 23)), inst)
    with pytest.raises(ValueError, match="goal=2"):
        task.solution_video(inst, 2)


def test_gt_goal_is_a_fair_coin_and_labels_are_instance_facts(task):
    insts = [task.instance(seed) for seed in range(300)]
    assert 0.4 < np.mean([i.meta["gt_goal"] for i in insts]) < 0.6
    for inst in insts[:20]:
        n = task.config.size
        either = {tuple(c) for path in inst.meta["paths"] for c in path}
        assert all(inst.labels[f"on_either_r{r}c{c}"] == ((r, c) in either) for r in range(n) for c in range(n))
        assert inst.labels["fork_depth"] == inst.meta["fork_depth"]
        assert inst.labels["path_len_bin"] == min(len(inst.meta["paths"][0]) - task.config.min_path, 3)
    for key, n_classes in task.label_classes.items():
        assert all(0 <= i.labels[key] < n_classes for i in insts)
    assert len({i.labels["fork_moves"] for i in insts}) == 6 and len({i.labels["path_len_bin"] for i in insts}) == 4


@pytest.mark.parametrize(
    "params, message",
    [
        ({"size": 2}, r"size=2 .*\[3, 5\]"),
        ({"size": 6}, r"size=6 .*\[3, 5\]"),
        ({"min_path": 2}, r"min_path=2 .*\[3, 12\]"),
        ({"min_path": 13}, r"min_path=13 .*\[3, 12\]"),
        ({"max_shared": -1}, r"max_shared=-1 .*\[0, 3\]"),
        ({"max_shared": 4}, r"max_shared=4"),
        ({"cell_px": 8}, r"cell_px=8 leaves no room for a 3x3"),
        ({"width": 25}, r"must be even"),
        ({"goals": 3}, r"unknown parameter\(s\) \['goals'\].*allowed"),
    ],
)
def test_bad_params_raise(params, message):
    with pytest.raises(ValueError, match=message):
        get_task("fork", **params)


def test_larger_canvas_works():
    task = get_task("fork", size=7, height=32, width=32, n_frames=12, min_path=10)
    inst = task.instance(5)
    assert inst.video.shape == (3, 12, 32, 32) and task.score(task.extract(inst.video), inst)["correct"] == 1.0
    assert len(inst.meta["paths"][0]) >= 10


def test_outcome_label_names_the_goal_the_video_walked_to():
    task = get_task("fork")
    for seed in range(10**9, 10**9 + 5):
        inst = task.instance(seed)
        assert task.outcome_labels(task.extract(inst.video)) == {"goal": inst.meta["gt_goal"]}
    blank = np.full(task.video_shape, -1.0, dtype=np.float32)
    assert task.outcome_labels(task.extract(blank)) == {"goal": None}
    assert get_task("maze").outcome_labels({"path": None}) == {}
