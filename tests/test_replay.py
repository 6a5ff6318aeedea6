"""`load_replay`: an organism archive re-run from its manifest draws the same noise and reproduces its samples."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from cos_core.experiments.replay import load_replay  # noqa: E402


def test_replay_reproduces_the_archived_final_videos_and_scores(organism_run):
    archive, model_dir = organism_run()
    replay = load_replay(archive, model_dir=model_dir)
    assert [it.sample_id for it in replay.items] == archive.samples.sort_values("sample")["sample_id"].tolist()
    finals = replay.run(replay.items)  # one batch, per-item generators: the same noise as capture's single calls
    for i, item in enumerate(replay.items):
        archived = archive.tensor("x0_hat", sample=i, step=archive.n_steps - 1)
        np.testing.assert_allclose(finals[i], archived, atol=1e-4)
        scored = replay.score(item, finals[i])
        assert scored["correct"] == bool(archive.samples.loc[i, "score_correct"])


def test_replay_refuses_runs_it_cannot_rerun(organism_run, tmp_path):
    archive, _ = organism_run()
    with pytest.raises(ValueError, match="model_index.json"):
        load_replay(archive, model_dir=tmp_path)


def test_replaying_on_another_device_type_than_capture_warns(organism_run, caplog):
    import copy

    archive, model_dir = organism_run()
    moved = copy.copy(archive)
    moved.manifest = {**archive.manifest, "model": {**archive.manifest["model"], "device": "cuda:0"}}
    with caplog.at_level("WARNING", logger="cos_core.experiments.replay"):
        load_replay(moved, model_dir=model_dir)
    assert "drew its noise on cuda; re-running on cpu" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cos_core.experiments.replay"):
        load_replay(archive, model_dir=model_dir)
    assert "drew its noise" not in caplog.text
