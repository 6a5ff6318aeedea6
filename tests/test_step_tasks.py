"""The tasks that need denoising steps or generated content: arrows (pointer chasing), recall (memory of generated
content), dispatch (perception before action), and the maze at the organism's size. Checked against independent
references (walking the arrows by hand), and by edited videos the graders must accept or refuse."""

from __future__ import annotations

import numpy as np
import pytest

from cos_core.tasks import TEST_SEEDS, get_task
from cos_core.tasks import arrows as arrows_mod
from cos_core.tasks import dispatch as dispatch_mod
from cos_core.tasks import memory as memory_mod
from cos_core.tasks.common import STEPS, render

SEEDS = [0, 5, 99, TEST_SEEDS[0], TEST_SEEDS[0] + 7]


# -- arrows ------------------------------------------------------------------------------------------------------
def test_arrows_chain_is_what_walking_the_arrows_gives():
    task = get_task("arrows")
    n = task.config.grid
    for seed in SEEDS:
        meta = task.instance(seed).meta
        cell, walked = tuple(meta["start"]), [list(meta["start"])]
        while cell != tuple(meta["stop"]):  # an independent walk over the meta's arrows
            dr, dc = STEPS[meta["moves"][cell[0] * n + cell[1]]]
            cell = (cell[0] + dr, cell[1] + dc)
            assert 0 <= cell[0] < n and 0 <= cell[1] < n, "walked off the grid"
            walked.append(list(cell))
            assert len(walked) <= n * n, "the walk loops"
        assert walked == meta["path"] and task.config.min_len <= meta["path_len"] <= task.config.max_len


def test_arrows_grader_refuses_a_missing_or_extra_cell():
    task = get_task("arrows")
    inst = task.instance(3)
    index = task.index_videos([3])[0]  # (frame, H, W) palette indices
    path = inst.meta["path"]
    missing = index.copy()
    r, c = path[len(path) // 2]
    missing[-1, 2 * r + 1, 2 * c + 1] = missing[-1, 2 * r + 1, 2 * c] = arrows_mod.FLOOR
    missing[-1, 2 * r, 2 * c + 1] = arrows_mod.FLOOR
    score = task.score(task.extract(render(missing, task.palette)), inst)
    assert score["correct"] == 0.0 and score["prefix"] == pytest.approx((len(path) // 2) / len(path))
    extra = index.copy()
    free = next((rr, cc) for rr in range(task.config.grid) for cc in range(task.config.grid) if [rr, cc] not in path)
    extra[-1, 2 * free[0] + 1, 2 * free[1]:2 * free[1] + 2] = arrows_mod.TRACE
    extra[-1, 2 * free[0], 2 * free[1] + 1] = arrows_mod.TRACE
    score = task.score(task.extract(render(extra, task.palette)), inst)
    assert score["correct"] == 0.0 and score["prefix"] == 1.0 and score["extra_cells"] == 1.0


def test_arrows_difficulty_knob_and_bad_params():
    short = get_task("arrows", min_len=3, max_len=4)
    assert all(3 <= short.instance(s).meta["path_len"] <= 4 for s in SEEDS)
    with pytest.raises(ValueError, match="max_len"):
        get_task("arrows", min_len=10, max_len=5)
    with pytest.raises(ValueError, match="grid"):
        get_task("arrows", grid=13)


# -- recall ------------------------------------------------------------------------------------------------------
def test_recall_first_frame_does_not_show_the_identity():
    task = get_task("recall")
    for seed in SEEDS:
        spec = task._sample(np.random.default_rng(seed))
        frames = [task._draw(dict(spec, identity=k))[0] for k in range(memory_mod.N_IDENTITIES)]
        assert all(np.array_equal(frames[0], f) for f in frames[1:]), "frame 0 depends on the identity"
        inst = task.instance(seed)
        first = np.asarray(inst.first_frame)
        identity_colours = memory_mod.PALETTE[2:]
        assert not any((np.abs(first - c[:, None, None]).max(axis=0) == 0).any() for c in identity_colours)
        assert inst.meta["seen_frames"] and inst.meta["hidden_frames"] and inst.meta["reappear_frames"]


def test_recall_any_identity_is_right_but_it_must_come_back_the_same():
    task = get_task("recall")
    inst = task.instance(11)
    spec = task._sample(np.random.default_rng(11))
    for k in range(memory_mod.N_IDENTITIES):  # the same trajectory with another identity: also right
        video = render(task._draw(dict(spec, identity=k)), task.palette)
        score = task.score(task.extract(video), inst)
        assert score["correct"] == 1.0 and score["identity"] == k
        assert task.outcome_labels(task.extract(video)) == {"identity": k}
    other = (spec["identity"] + 1) % memory_mod.N_IDENTITIES
    swapped = task._draw(spec).copy()
    after = task._draw(dict(spec, identity=other))
    for f in inst.meta["reappear_frames"]:
        swapped[f] = after[f]
    score = task.score(task.extract(render(swapped, task.palette)), inst)
    assert score["correct"] == 0.0 and score["consistent"] == 0.0


# -- dispatch ----------------------------------------------------------------------------------------------------
def test_dispatch_object_goes_to_its_colours_exit_and_any_colour_is_right():
    task = get_task("dispatch")
    for seed in SEEDS:
        inst = task.instance(seed)
        spec = task._sample(np.random.default_rng(seed))
        assert inst.meta["exits"][inst.meta["direction"]] == inst.meta["colour"]
        for colour in range(dispatch_mod.N_COLOURS):
            good = dict(spec, colour=colour, direction=spec["exits"].index(colour))
            video = render(task._draw(good), task.palette)
            assert np.array_equal(video[:, 0], inst.first_frame), "frame 0 depends on the object's colour"
            answer = task.extract(video)
            assert task.score(answer, inst)["correct"] == 1.0
            assert task.outcome_labels(answer) == {"colour": colour, "direction": good["direction"]}


def test_dispatch_grader_refuses_a_wrong_exit_and_a_colour_change():
    task = get_task("dispatch")
    inst = task.instance(4)
    spec = task._sample(np.random.default_rng(4))
    wrong = dict(spec, direction=(spec["direction"] + 1) % 4)
    score = task.score(task.extract(render(task._draw(wrong), task.palette)), inst)
    assert score["correct"] == 0.0 and score["action_ok"] == 0.0 and score["colour_consistent"] == 1.0
    changed = task._draw(spec).copy()
    recoloured = task._draw(dict(spec, colour=spec["exits"][(spec["direction"] + 2) % 4]))
    changed[-1] = recoloured[-1]
    score = task.score(task.extract(render(changed, task.palette)), inst)
    assert score["correct"] == 0.0 and score["colour_consistent"] == 0.0


# -- the maze at the organism's size -----------------------------------------------------------------------------
def test_maze_with_one_patch_per_cell_reads_back_exactly():
    task = get_task("maze", size=11, cell_px=2, min_path=20)
    for seed in SEEDS[:3]:
        inst = task.instance(seed)
        assert len(inst.meta["path"]) >= 20
        score = task.score(task.extract(inst.video), inst)
        assert score["correct"] == 1.0 and score["prefix"] == 1.0


@pytest.mark.parametrize("name,unique", [("maze", True), ("arrows", True), ("fork", False), ("recall", False),
                                         ("dispatch", False)])
def test_answer_is_unique_flags(name, unique):
    assert get_task(name).answer_is_unique is unique
