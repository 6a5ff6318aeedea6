"""Activation patching and its nulls: donors by answer, the jobs, effects minus a null with Holm's correction (by
hand), and `run_patching` / `cos patch` end to end on the tiny organism with a task whose answer reads the video."""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from cos_core.analysis.effects import holm, paired_effect, patching_table
from cos_core.analysis.stats import bootstrap_weights
from cos_core.tasks.fork import ForkTask

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from cos_core.cli import patch as patch_cli  # noqa: E402
from cos_core.experiments.patching import (PatchConfig, donors, patch_jobs, run_patching)  # noqa: E402
from cos_core.experiments.replay import load_replay  # noqa: E402


class SideFork(ForkTask):
    """Fork whose 'goal' is which half of the last frame is brighter: a real function of the generated video, so
    the random tiny organism gives readable answers that patches can change."""

    def extract(self, frames):
        last = np.asarray(frames, dtype=np.float32)[:, -1]  # (3, H, W)
        half = last.shape[-1] // 2
        return {"goal": int(last[..., half:].mean() > last[..., :half].mean())}

    def _score(self, answer, inst):
        return {"correct": float(answer["goal"] == 1), "score": float(answer["goal"])}


@pytest.fixture(scope="module")
def replay(organism_run):
    archive, model_dir = organism_run(task="fork", instances=3, seeds=(0, 1, 2), steps=3)
    return dataclasses.replace(load_replay(archive, model_dir=model_dir), task=SideFork())


def items(spec):
    return [type("Item", (), {"instance": inst, "seed": seed})() for inst, seed in spec]


def test_seed_donors_come_from_the_same_instance_and_split_by_answer():
    its = items([("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)])
    other, same = donors(its, ["x", "y", "x", None, "z"], "seed")
    assert other == [1, 2, 1, -1, -1]  # 4's only partner (3) is unreadable; 3 itself has no answer
    assert same == [2, -1, 0, -1, -1]


def test_instance_donors_prefer_the_same_seed_and_without_transfer_take_the_next_instance():
    its = items([("a", 0), ("a", 1), ("b", 0), ("b", 1)])
    other, same = donors(its, ["1", "2", "2", "1"], "instance")
    assert other == [2, 3, 0, 1] and same == [3, 2, 1, 0]  # the same seed first when its answer fits the role
    other, same = donors(its, [None] * 4, "instance")
    assert other == [2, 3, 0, 1] and same == [-1] * 4


def test_instance_donors_match_the_seed_index_under_per_instance_noise():
    """With `--noise per-instance` no two instances share a noise seed; "same seed first" then means the same
    `--seeds` value, given as `index` (without it, the order falls back to the cyclic one)."""
    from cos_core.capture.sources import instance_noise_seed, seed_index

    spec = [(inst, k) for inst in (11, 12) for k in (0, 1)]
    its = items([(str(inst), instance_noise_seed(inst, k)) for inst, k in spec])
    index = [seed_index(it.seed, int(it.instance), "per_instance") for it in its]
    assert index == [0, 1, 0, 1]
    other, same = donors(its, ["1", "2", "2", "1"], "instance", index)
    assert other == [2, 3, 0, 1] and same == [3, 2, 1, 0]
    other, _ = donors(its, ["1", "1", "2", "2"], "instance")  # no index: no seed matches across instances
    assert other == [2, 2, 0, 0]


def test_jobs_hold_the_patch_and_each_null():
    cfg = PatchConfig(layers=(0, 1), steps=(0,))
    jobs = patch_jobs(cfg, other=[1, -1, 0], same=[-1, -1, 2])
    by_tag = pd.Series([j.tag for j in jobs]).value_counts().to_dict()
    assert by_tag == {"patch": 4, "random": 4, "self": 4, "same_answer": 2}
    assert all(j.partner == j.sample for j in jobs if j.tag == "self")
    assert {j.carry for j in jobs if j.tag == "random"} == {"random"}


def test_holm_and_paired_effects_by_hand():
    np.testing.assert_allclose(holm(np.array([0.01, 0.04, 0.03, np.nan])), [0.03, 0.06, 0.06, np.nan])
    group = np.repeat(np.arange(20), 2)
    weights = bootstrap_weights(20, 500)
    effect, low, high, p = paired_effect(np.ones(40), group, 20, weights)
    assert (effect, low, high) == (1.0, 1.0, 1.0) and p == pytest.approx(2 / 501)
    effect, low, high, p = paired_effect(np.zeros(40), group, 20, weights)
    assert effect == 0 and p == 1.0
    noise = np.random.default_rng(0).choice([-1.0, 0.0, 1.0], size=40)
    assert paired_effect(noise, group, 20, weights)[3] > 0.05


def test_patching_table_subtracts_the_null_per_recipient():
    rows = []
    for s in range(8):  # 4 instances x 2 seeds; layer 0 flips every recipient, layer 1 none; the null never
        for layer in (0, 1):
            flip = layer == 0
            rows += [dict(sample=s, instance=s // 2, layer=layer, step=0, tag="patch", flipped=flip,
                          adopted=float(flip)),
                     dict(sample=s, instance=s // 2, layer=layer, step=0, tag="random", flipped=False, adopted=0.0)]
    table = patching_table(pd.DataFrame(rows), n_boot=300).set_index(["layer", "metric"])
    assert table.loc[(0, "flip"), "effect"] == 1.0 and table.loc[(1, "flip"), "effect"] == 0.0
    assert table.loc[(0, "flip"), "significant"] and not table.loc[(1, "flip"), "significant"]
    assert table.loc[(0, "flip"), "p_holm"] == pytest.approx(min(1, 2 * table.loc[(0, "flip"), "p_value"]))
    assert table.loc[(0, "adopt"), "patch_rate"] == 1.0 and table.loc[(0, "adopt"), "n"] == 8


def test_run_patching_measures_patches_and_nulls(replay):
    tables = run_patching(replay, PatchConfig(layers=(0, 1), steps=(0, 2), n_boot=100, batch_size=8))
    samples, summary = tables["patching_samples"], tables["patching"]
    assert set(samples["tag"]) <= {"patch", "random", "self", "same_answer"} and "patch" in set(samples["tag"])
    assert not samples[samples["tag"] == "self"]["flipped"].any()  # a self-patch is the identity, bit for bit
    patch = samples[samples["tag"] == "patch"]
    assert (patch["donor_answer"] != patch["clean_answer"]).all()  # the donor has another answer
    assert ((patch["adopted"] == 1.0) <= patch["flipped"]).all()
    assert set(summary["null"]) <= {"random", "self", "same_answer"}
    assert set(zip(summary["layer"], summary["step"])) == {(0, 0), (1, 0), (0, 2), (1, 2)}
    assert (summary["regime"] == "noise-picked").all() and (summary["pairs"] == "seed").all()
    config = json.loads(summary.attrs["cos_config"])
    assert config["config"]["layers"] == [0, 1] and config["table"] == "patching"


def test_cos_patch_writes_both_tables_and_refuses_bad_input(replay, monkeypatch, capsys):
    import cos_core.experiments.replay as replay_module

    monkeypatch.setattr(replay_module, "load_replay", lambda *a, **k: replay)
    p = argparse.ArgumentParser()
    patch_cli.add_arguments(p)
    args = p.parse_args([str(replay.archive.path), "--layers", "1", "--steps", "1", "--device", "cpu"])
    args._argv = ["patch", str(replay.archive.path)]
    assert patch_cli.run(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["written"]) == {"patching", "patching_samples"}
    assert json.loads(replay.archive.derived("patching").attrs["cos_config"])["command"][:2] == ["cos", "patch"]
    for argv, message in ((["--layers", "7"], r"layers \[7\] out of range"), (["--nulls", "none"], "nulls"),
                          (["--steps", "9"], r"steps \[9\] out of range")):
        args = p.parse_args([str(replay.archive.path), "--device", "cpu", *argv])
        with pytest.raises(ValueError, match=message):
            patch_cli.run(args)


def test_an_empty_patching_table_publishes_and_a_null_column_with_rows_is_still_refused(tmp_path):
    """No null rows (e.g. --nulls same_answer where no recipient has a same-answer donor) gives a table of no rows
    whose columns pyarrow types as null: the validating reader accepts it (an empty table is valid), while the same
    null column holding rows is still refused for an integer kind."""
    from cos_core.analysis.effects import patching_table
    from cos_core.archive.derived import read_parquet
    from cos_core.archive.schema import DERIVED, ArchiveError

    table = patching_table(pd.DataFrame([dict(sample=0, layer=1, step=0, tag="patch", instance="a", flipped=True,
                                              adopted=1.0)]))
    (tmp_path / "derived").mkdir()
    path = tmp_path / "derived" / "patching.parquet"
    table.to_parquet(path, index=False)
    spec = DERIVED["patching"]
    assert read_parquet(tmp_path, path, "derived/patching.parquet", spec.kinds, spec.required).empty
    pd.DataFrame({c: [None] for c in table.columns}).to_parquet(path, index=False)
    with pytest.raises(ArchiveError, match="'layer' must hold integers"):
        read_parquet(tmp_path, path, "derived/patching.parquet", spec.kinds, spec.required)
