"""Working memory on the real memory task: the x0_hat reading credits the ground truth (object right where
visible, out of view where hidden) and blames a wrong identity; aggregates carry n, instances and intervals; the
probe reading finds identity in the hidden-frame activations where it was planted; bad runs are refused."""

from __future__ import annotations

import numpy as np
import pytest
from test_analyze_cli import _swap_identity, planted_memory_run

from cos_core.analysis.features import FeatureSpec
from cos_core.analysis.memory import aggregate_x0, frame_phases, memory_from_x0, memory_probes, read_frames
from cos_core.archive import Archive
from cos_core.tasks import TEST_SEEDS, get_task


def test_phases_follow_the_hidden_frames():
    meta = {"hidden_frames": [3, 4]}
    assert frame_phases(meta, 7).tolist() == ["before"] * 3 + ["hidden"] * 2 + ["after"] * 2


def test_truth_reads_right_and_a_wrong_identity_reads_wrong():
    task = get_task("memory")
    for k in range(5):
        inst = task.instance(TEST_SEEDS[k])
        rows = read_frames(task.extract(inst.video), inst.meta)
        visible = [r for r, v in zip(rows, inst.meta["visible"]) if v == 1]
        hidden = [r for r in rows if r["frame"] in inst.meta["hidden_frames"]]
        assert all(r["identity_ok"] == 1 and r["position_ok"] == 1 for r in visible)
        assert hidden and all(r["hidden_ok"] == 1 and np.isnan(r["identity_ok"]) for r in hidden)
        wrong = read_frames(task.extract(_swap_identity(inst.video, inst.labels["identity"])), inst.meta)
        assert all(r["identity_ok"] == 0 and r["position_ok"] == 0 for r, v in zip(wrong, inst.meta["visible"])
                   if v == 1)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return Archive.open(planted_memory_run(tmp_path_factory.mktemp("runs"), n_instances=16))


def test_aggregates_have_counts_and_intervals(archive):
    per_frame = memory_from_x0(archive)
    assert len(per_frame) == archive.n_samples * archive.n_steps * 8
    table = aggregate_x0(archive, per_frame)
    after = table.query("phase == 'after' and measure == 'identity_ok' and frame == -1").set_index("step")
    assert after.loc[5, "value"] == 1.0 and after.loc[5, "n"] == 32 and after.loc[5, "n_instances"] == 16
    assert after.loc[3, "value"] == 0.5  # steps 2-3: even samples show the wrong identity
    # every instance has one wrong (seed 0) and one right (seed 1) sample: resampling instances cannot move 0.5
    assert after.loc[3, "ci_low"] == after.loc[3, "ci_high"] == 0.5 and after.loc[5, "chance"] == 0.25
    assert set(table["phase"]) == {"before", "hidden", "after"}


def test_hidden_frame_probes_find_the_planted_identity(archive):
    table = memory_probes(archive, FeatureSpec(), {"engine": "torch", "device": "cpu"})
    hidden = table.query("phase == 'hidden' and measure == 'probe_identity'").set_index(["layer", "step"])
    assert hidden.loc[(1, 5), "value"] > 0.8 and hidden.loc[(0, 5), "value"] < 0.6
    assert {"ci_low", "ci_high", "chance", "control_accuracy", "selectivity"} <= set(table.columns)


def test_memory_needs_memory_samples_and_matching_frames(tmp_path, archive):
    with pytest.raises(ValueError, match="frames \\(9,\\) out of range"):
        memory_probes(archive, FeatureSpec(frames=(9,)))
    other = Archive.open(planted_memory_run(tmp_path, "nolabels", n_instances=2, labels=False))
    with pytest.raises(ValueError, match="no task samples"):
        memory_from_x0(other)
