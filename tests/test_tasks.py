"""Procedural tasks: contract shapes, determinism, valid puzzles (checked by independent references), extractors
that score the ground truth 1.0 and corrupted videos lower, robustness to garbage, clear errors for bad params."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cos_core.tasks import TASK_NAMES, TASKS, TEST_SEEDS, TRAIN_SEEDS, VIDEO_SHAPE, Instance, get_task
from cos_core.tasks import maze as maze_mod
from cos_core.tasks import memory as memory_mod
from cos_core.tasks.common import render

SEEDS = [0, 1, 7, 123, TEST_SEEDS[0], TEST_SEEDS[0] + 99]


@pytest.fixture(scope="module", params=TASK_NAMES)
def task(request):
    return get_task(request.param)


# -- contract ---------------------------------------------------------------------------------------------------
def test_registry_order_and_unknown_name():
    assert list(TASKS)[:3] == ["maze", "memory", "choice"], "ids of the first tasks are baked into trained weights"
    assert [get_task(name).task_id for name in TASKS] == list(range(len(TASKS)))
    with pytest.raises(ValueError, match="unknown task 'sudoku'.*allowed"):
        get_task("sudoku")


def test_seed_ranges_are_disjoint():
    assert TRAIN_SEEDS.step == TEST_SEEDS.step == 1 and TRAIN_SEEDS.start == 0
    assert TRAIN_SEEDS.stop <= TEST_SEEDS.start and len(TRAIN_SEEDS) > 10**8 and len(TEST_SEEDS) > 10**8
    assert TRAIN_SEEDS[-1] not in TEST_SEEDS and TEST_SEEDS[0] not in TRAIN_SEEDS


def test_instance_shapes_dtypes_labels(task):
    for seed in SEEDS:
        inst = task.instance(seed)
        assert isinstance(inst, Instance) and inst.task == task.name and inst.seed == seed
        assert inst.video.shape == VIDEO_SHAPE and inst.video.dtype == np.float32
        assert inst.video.min() >= -1 and inst.video.max() <= 1
        assert np.array_equal(inst.first_frame, inst.video[:, 0]) and inst.first_frame.shape == (3, 24, 24)
        assert inst.task_id == TASK_NAMES.index(task.name) and isinstance(inst.prompt, str) and inst.prompt
        assert set(inst.labels) == set(task.label_classes)
        assert all(0 <= inst.labels[k] < n and isinstance(inst.labels[k], int) for k, n in task.label_classes.items())
        json.dumps(inst.meta)
        colours = np.unique(inst.video.reshape(3, -1).T, axis=0)
        assert all((task.palette == c).all(axis=1).any() for c in colours), "pixels outside the palette"


def test_deterministic_by_seed_and_batch_equals_single(task):
    a, b = task.instance(42), task.instance(42)
    assert np.array_equal(a.video, b.video) and a.labels == b.labels and a.meta == b.meta
    assert not np.array_equal(a.video, task.instance(43).video)
    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    videos, task_ids = task.instances(SEEDS)
    assert np.array_equal(np.random.get_state()[1], state), "generation touched the global numpy RNG"
    assert videos.shape == (len(SEEDS), *VIDEO_SHAPE) and videos.dtype == np.float32
    assert task_ids.dtype == np.int64 and (task_ids == task.task_id).all()
    for video, seed in zip(videos, SEEDS):
        assert np.array_equal(video, task.instance(seed).video)
    index = task.index_videos(SEEDS[:2])
    assert index.dtype == np.uint8 and np.array_equal(np.moveaxis(task.palette[index], -1, 1), videos[:2])


@pytest.mark.parametrize("seed", [-1, 1.5, True, "3"])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="seed="):
        get_task("maze").instance(seed)


# -- validity against independent references --------------------------------------------------------------------
def _maze_graph(meta):
    n, edges = meta["size"], set()
    for r, row in enumerate(meta["right_open"]):
        edges |= {((r, c), (r, c + 1)) for c, is_open in enumerate(row) if is_open}
    for r, row in enumerate(meta["down_open"]):
        edges |= {((r, c), (r + 1, c)) for c, is_open in enumerate(row) if is_open}
    adjacent = {(r, c): set() for r in range(n) for c in range(n)}
    for a, b in edges:
        adjacent[a].add(b)
        adjacent[b].add(a)
    return edges, adjacent


def _count_simple_paths(adjacent, here, goal, seen):
    if here == goal:
        return 1
    return sum(_count_simple_paths(adjacent, nxt, goal, seen | {nxt}) for nxt in adjacent[here] if nxt not in seen)


def test_maze_is_perfect_and_path_is_the_unique_solution():
    task = get_task("maze")
    for seed in range(40):
        meta = task.instance(seed).meta
        edges, adjacent = _maze_graph(meta)
        start, goal, path = tuple(meta["start"]), tuple(meta["goal"]), [tuple(p) for p in meta["path"]]
        assert len(edges) == 24, "a perfect 5x5 maze is a spanning tree: 24 open walls"
        assert _count_simple_paths(adjacent, start, goal, {start}) == 1
        assert path[0] == start and path[-1] == goal and len(set(path)) == len(path) >= task.config.min_path
        assert all(b in adjacent[a] for a, b in zip(path, path[1:]))


def test_maze_pixels_show_walls_start_goal():
    task = get_task("maze")
    inst = task.instance(5)
    frame0 = inst.video[:, 0]  # (3, H, W)
    (oy, ox), p = inst.meta["origin"], inst.meta["cell_px"]
    white, black = np.ones(3), -np.ones(3)
    for r, row in enumerate(inst.meta["right_open"]):
        for c, is_open in enumerate(row):  # middle pixel of the wall segment between (r, c) and (r, c+1)
            assert np.array_equal(frame0[:, oy + r * p + p // 2, ox + (c + 1) * p], black if is_open else white)
    (sr, sc), (gr, gc) = inst.meta["start"], inst.meta["goal"]
    assert np.array_equal(frame0[:, oy + sr * p + 2, ox + sc * p + 2], maze_mod.PALETTE[maze_mod.AGENT])
    assert np.array_equal(frame0[:, oy + gr * p + 2, ox + gc * p + 2], maze_mod.PALETTE[maze_mod.GOAL])
    assert (inst.video[:, -1] == maze_mod.PALETTE[maze_mod.TRACE][:, None, None]).all(0).sum() > 0


def test_memory_object_hides_and_returns():
    task = get_task("memory")
    for seed in range(20):
        inst = task.instance(seed)
        meta, colour = inst.meta, memory_mod.PALETTE[2 + inst.meta["identity"]]
        shown = (inst.video == colour[:, None, None, None]).all(0).sum(axis=(1, 2))  # (frame,) object pixels
        n_px = memory_mod.SPRITE_MASKS[meta["identity"]].sum()
        assert shown[0] == n_px and meta["hidden_frames"] and meta["reappear_frames"]
        assert all(shown[f] == 0 for f in meta["hidden_frames"])
        assert all(shown[f] == n_px for f in meta["reappear_frames"])
        assert min(meta["reappear_frames"]) > max(meta["hidden_frames"])


def test_choice_answer_continues_the_rotation():
    task = get_task("choice")
    for seed in range(20):
        meta = task.instance(seed).meta
        cue, step = meta["cue_turns"], meta["rule_turns"]
        assert [(cue[0] + i * step) % 4 for i in range(3)] == cue
        assert meta["candidate_turns"][meta["answer"]] == (cue[2] + step) % 4
        assert len(set(meta["candidate_turns"])) == task.config.k


# -- extractors -------------------------------------------------------------------------------------------------
def test_ground_truth_scores_one(task):
    for seed in SEEDS:
        inst = task.instance(seed)
        answer = task.extract(inst.video)
        json.dumps(answer)
        score = task.score(answer, inst)
        assert score["correct"] == 1.0 and score["score"] == 1.0, score


def _noise_inputs(rng):
    yield rng.uniform(-1, 1, VIDEO_SHAPE).astype(np.float32)
    yield rng.normal(0, 3, VIDEO_SHAPE)
    yield np.zeros(VIDEO_SHAPE)
    yield np.ones(VIDEO_SHAPE)
    yield np.full(VIDEO_SHAPE, np.nan)
    yield np.where(rng.random(VIDEO_SHAPE) < 0.5, np.inf, -np.inf)


def test_extract_never_raises_on_garbage(task):
    rng, inst = np.random.default_rng(0), task.instance(3)
    for frames in _noise_inputs(rng):
        answer = task.extract(frames)
        json.dumps(answer)
        score = task.score(answer, inst)
        assert score["correct"] == 0.0 and 0.0 <= score["score"] < 1.0, score
    with pytest.raises(ValueError, match="expects"):
        task.extract(np.zeros((3, 8, 24, 23)))


def test_extract_accepts_torch_tensors(task):
    torch = pytest.importorskip("torch")
    inst = task.instance(2)
    assert task.score(task.extract(torch.from_numpy(inst.video)), inst)["correct"] == 1.0


def test_score_rejects_other_tasks_instance():
    maze, memory = get_task("maze"), get_task("memory")
    with pytest.raises(ValueError, match="instance of task 'memory'"):
        maze.score({}, memory.instance(0))
    with pytest.raises(NotImplementedError):
        maze.candidates(maze.instance(0).video, maze.instance(0))


def _pixels_of(video_frame, colour):
    return (video_frame == np.asarray(colour)[:, None, None]).all(0)  # (H, W)


def test_maze_corruptions_score_lower():
    task = get_task("maze")
    for seed in range(8):
        inst = task.instance(seed)
        trace, floor = maze_mod.PALETTE[maze_mod.TRACE], maze_mod.PALETTE[maze_mod.FLOOR]
        erased = inst.video.copy()
        erased[:, -1][:, _pixels_of(inst.video[:, -1], trace)] = floor[:, None]
        score = task.score(task.extract(erased), inst)
        assert score["correct"] == 0 and score["cell_iou"] <= 1 / len(inst.meta["path"]) + 1e-9

        shortened = inst.video.copy()  # drop the second path cell from the trace
        r, c = inst.meta["path"][1]
        rows, cols = task._cell_slices(r * task.config.size + c)
        shortened[:, -1, rows, cols] = floor[:, None, None]
        score = task.score(task.extract(shortened), inst)
        assert score["correct"] == 0 and 0.5 < score["cell_iou"] < 1

        painted = inst.video.copy()  # paint trace over every wall: walls no longer kept, crossings appear
        painted[:, -1][:, _pixels_of(inst.video[:, 0], maze_mod.PALETTE[maze_mod.WALL])] = trace[:, None]
        score = task.score(task.extract(painted), inst)
        assert score["correct"] == 0 and score["walls_kept"] == 0 and score["wall_crossings"] > 0


def test_memory_corruptions_score_lower():
    task = get_task("memory")
    for seed in range(8):
        inst = task.instance(seed)
        back = inst.meta["reappear_frames"]
        own, other = 2 + inst.meta["identity"], 2 + (inst.meta["identity"] + 1) % 4
        swapped = inst.video.copy()  # reappears as another identity
        for f in back:
            swapped[:, f][:, _pixels_of(inst.video[:, f], memory_mod.PALETTE[own])] = memory_mod.PALETTE[other][:, None]
        score = task.score(task.extract(swapped), inst)
        assert score["correct"] == 0 and score["identity_ok"] == 0

        vanished = inst.video.copy()  # never comes back
        vanished[:, back] = inst.video[:, inst.meta["hidden_frames"][:1]]
        assert task.score(task.extract(vanished), inst)["correct"] == 0

        moved = inst.video.copy()  # comes back 3 px off
        moved[:, back] = np.roll(inst.video[:, back], 3, axis=(2, 3))
        score = task.score(task.extract(moved), inst)
        assert score["correct"] == 0 and score["position_err"] >= 2


def _choice_video(task, inst, chosen):
    """The instance's video redrawn as if candidate `chosen` were the answer (a wrong answer if chosen != truth)."""
    spec = dict(inst.meta, answer=chosen, mask=np.array([[ch == "#" for ch in row] for row in inst.meta["shape"]]))
    return render(task._draw(spec), task.palette)


def test_choice_wrong_candidate_and_superposition():
    task = get_task("choice")
    for seed in range(8):
        inst = task.instance(seed)
        truth = inst.meta["answer"]
        assert np.array_equal(_choice_video(task, inst, truth), inst.video)
        assert np.allclose(task.candidates(inst.video, inst), np.eye(task.config.k)[truth], atol=1e-6)
        wrong = (truth + 1) % task.config.k
        video = _choice_video(task, inst, wrong)
        answer = task.extract(video)
        assert answer["choice"] == wrong and task.score(answer, inst)["correct"] == 0
        mixed = 0.5 * (inst.video + video)  # two candidates alive at once, as in early denoising steps
        mass = task.candidates(mixed, inst)
        assert np.allclose(mass[[truth, wrong]], 0.5, atol=1e-5) and np.delete(mass, [truth, wrong]).max() < 1e-5
        assert task.score(task.extract(mixed), inst)["correct"] == 0


# -- parameters -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, params, message",
    [
        ("maze", {"size": 1}, r"size=1 .*\[2, 5\]"),
        ("maze", {"size": 6}, r"size=6 .*\[2, 5\]"),
        ("maze", {"cell_px": 1}, r"cell_px=1"),
        ("maze", {"cell_px": 12}, r"cell_px=12 leaves no room"),
        ("maze", {"height": 25}, r"must be even"),
        ("maze", {"min_path": 40}, r"min_path=40 .*\[2, 25\]"),
        ("maze", {"colour": 3}, r"unknown parameter\(s\) \['colour'\].*allowed"),
        ("memory", {"height": 32}, r"use a square"),
        ("memory", {"speed": 5}, r"no trajectory fits"),
        ("memory", {"occluder_px": (2,)}, r"occluder_px item=2"),
        ("choice", {"k": 5}, r"k=5 .*\[2, 4\]"),
        ("choice", {"rules": (0,)}, r"rules item=0"),
        ("choice", {"shapes": "stars"}, r"shapes='stars'"),
        ("choice", {"width": 20}, r"width=20"),
        ("choice", {"n_frames": 1}, r"n_frames=1"),
    ],
)
def test_bad_params_raise_clear_errors(name, params, message):
    with pytest.raises(ValueError, match=message):
        get_task(name, **params)


def test_other_valid_params_work():
    for name, params in [
        ("maze", {"size": 3, "cell_px": 6, "min_path": 3}),
        ("maze", {"size": 7, "height": 32, "width": 32, "n_frames": 12}),
        ("memory", {"height": 32, "width": 32, "occluder_px": (8,)}),
        ("choice", {"k": 3, "rules": (1,), "shapes": "named"}),
    ]:
        task = get_task(name, **params)
        inst = task.instance(11)
        assert inst.video.shape == task.video_shape
        assert task.score(task.extract(inst.video), inst)["correct"] == 1.0
