"""Probe grids on planted signals: a linearly planted label is recovered and noise sits at chance, a memorising-
friendly control drives selectivity to zero, the batched torch engine agrees with the scikit-learn reference within
1 point, folds never split an instance, intervals and chance are what they claim, bad input is named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cos_core.analysis.features import FeatureSpec, reduce_frames
from cos_core.analysis.probe_torch import spd_inverse
from cos_core.analysis.probes import ProbeGrid, control_labels, group_folds, majority_predictions


def planted(strengths, n_inst=60, seeds=3, dim=32, classes=3, inst_scale=0.5, seed=0):
    """Cells (len(strengths), n_inst*seeds, dim): noise + instance vector + strength x class mean."""
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(n_inst), seeds)
    y = rng.integers(0, classes, n_inst)[group]
    means = np.linalg.qr(rng.normal(size=(dim, classes)))[0].T * 3.0
    inst = inst_scale * rng.normal(size=(n_inst, dim))[group]
    x = np.stack([rng.normal(size=(len(group), dim)) + inst + s * means[y] for s in strengths])
    return x.astype(np.float32), y, group


@pytest.mark.parametrize("engine", ["torch", "sklearn"])
def test_planted_label_is_recovered_and_noise_is_at_chance(engine):
    x, y, group = planted([0.0, 1.0], n_inst=90)
    grid = ProbeGrid(engine=engine, device="cpu").fit(x, {"y": y}, group)
    assert grid.accuracy_[1, 0] > 0.9 and grid.ci_low_[1, 0] > grid.chance_[0] + 0.3
    assert grid.ci_low_[0, 0] <= 1 / 3 <= grid.ci_high_[0, 0]  # noise: the uniform guess lies in the interval
    assert grid.selectivity_[1, 0] > 0.5 and grid.selectivity_ci_low_[0, 0] <= 0 <= grid.selectivity_ci_high_[0, 0]
    assert (grid.ci_low_ <= grid.accuracy_).all() and (grid.accuracy_ <= grid.ci_high_).all()
    assert grid.converged_.all()


def test_selectivity_is_zero_when_the_probe_can_memorise_instances():
    """Each instance has its own embedding and a random label: with folds split by sample (leaky) the probe
    memorises instances and scores high, and so does the control task on the same instance types, so
    selectivity says there is nothing beyond memorisation; grouped by instance, both sit at chance."""
    rng = np.random.default_rng(1)
    n_inst, seeds, dim = 100, 3, 256
    instance = np.repeat(np.arange(n_inst), seeds)
    y = rng.integers(0, 2, n_inst)[instance]
    x = (3.0 * rng.normal(size=(n_inst, dim))[instance] + 0.3 * rng.normal(size=(len(instance), dim)))[None]
    leaky = ProbeGrid(engine="torch", device="cpu", alpha=0.01).fit(x.astype(np.float32), {"y": y},
                                                                     groups=np.arange(len(y)), types=instance)
    assert leaky.accuracy_[0, 0] > 0.9 and leaky.control_accuracy_[0, 0] > 0.85
    assert abs(leaky.selectivity_[0, 0]) < 0.1
    grouped = ProbeGrid(engine="torch", device="cpu", alpha=0.01).fit(x.astype(np.float32), {"y": y}, instance)
    assert grouped.accuracy_[0, 0] < leaky.accuracy_[0, 0] - 0.2
    assert grouped.ci_low_[0, 0] <= 0.5 <= grouped.ci_high_[0, 0]  # unseen instances: a coin flip
    assert grouped.selectivity_ci_low_[0, 0] <= 0 <= grouped.selectivity_ci_high_[0, 0]


@pytest.mark.parametrize("kind", ["logistic", "ridge"])
def test_engines_agree_within_one_point(kind):
    x, y, group = planted([0.0, 0.2, 0.4, 1.0], n_inst=80, dim=48)
    labels = {"y": y, "binary": (y == 0).astype(int)}
    fast = ProbeGrid(kind=kind, engine="torch", device="cpu").fit(x, labels, group)
    ref = ProbeGrid(kind=kind, engine="sklearn").fit(x, labels, group)
    assert np.abs(fast.accuracy_ - ref.accuracy_).max() <= 0.01
    assert np.abs(fast.control_accuracy_ - ref.control_accuracy_).max() <= 0.01
    assert np.array_equal(fast.folds_, ref.folds_) and np.array_equal(fast.chance_, ref.chance_)


def test_folds_keep_instances_whole_and_controls_permute_instances():
    rng = np.random.default_rng(0)
    group = np.repeat(rng.permutation(30), 3)
    y = (group % 3)[None]
    folds = group_folds(group, y[0], 5, rng)
    for g in np.unique(group):
        assert len(set(folds[group == g])) == 1
    assert sorted(np.bincount(folds)) == [18] * 5  # 6 instances per fold
    assert all(len(np.unique(y[0][folds == f])) == 3 for f in range(5))  # stratified by instance label
    ctrl = control_labels(y, group, rng)[0]
    for g in np.unique(group):
        assert len(set(ctrl[group == g])) == 1
    assert sorted(np.bincount(ctrl)) == sorted(np.bincount(y[0]))  # a permutation of instances keeps counts


def test_chance_is_the_majority_baseline_under_the_same_folds():
    y = np.array([[0, 0, 0, 1, 1, 0, 0, 0, 1, 0]])
    folds = np.arange(10) % 2
    pred = majority_predictions(y, folds, 2)
    assert (pred == 0).all()
    x, yy, group = planted([0.0], n_inst=30, classes=2)
    yy = np.where(np.arange(len(yy)) % 3 == 0, 1, 0)  # 1/3 vs 2/3, constant... per sample, not instance
    grid = ProbeGrid(engine="torch", device="cpu").fit(x, {"y": yy}, np.arange(len(yy)))
    assert abs(grid.chance_[0] - 2 / 3) < 0.05 and grid.n_classes_[0] == 2


def test_bad_input_is_named():
    x, y, group = planted([0.5], n_inst=10)
    with pytest.raises(ValueError, match="only one class"):
        ProbeGrid().fit(x, {"y": np.zeros_like(y)}, group)
    with pytest.raises(ValueError, match="missing for samples"):
        ProbeGrid().fit(x, {"y": np.where(np.arange(len(y)) == 4, np.nan, y)}, group)
    with pytest.raises(ValueError, match=">= 2 instances"):
        ProbeGrid().fit(x, {"y": y}, np.zeros_like(group))
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        ProbeGrid().fit(x, {"y": y[:5]}, group)
    bad = x.copy()
    bad[0, 3, 1] = np.inf
    with pytest.raises(ValueError, match=r"NaN/inf in 1 of 1 cells.*\{0: 1\}"):
        ProbeGrid().fit(bad, {"y": y}, group)
    for kwargs, message in [({"kind": "svm"}, "kind='svm'"), ({"alpha": 0}, "alpha=0"),
                            ({"n_folds": 1}, "n_folds=1"), ({"engine": "jax"}, "engine='jax'")]:
        with pytest.raises(ValueError, match=message):
            ProbeGrid(**kwargs)
    with pytest.raises(ValueError, match="pool='max'"):
        FeatureSpec(pool="max")


def test_table_has_one_row_per_cell_and_label():
    x, y, group = planted([0.0, 1.0], n_inst=20)
    grid = ProbeGrid(engine="torch", device="cpu").fit(x, {"a": y, "b": (y > 0).astype(int)}, group)
    import pandas as pd

    table = grid.table(pd.DataFrame({"layer": [0, 0], "step": [0, 1]}))
    assert len(table) == 4 and list(table["label"]) == ["a", "b", "a", "b"] and list(table["step"]) == [0, 0, 1, 1]
    assert {"accuracy", "ci_low", "ci_high", "chance", "control_accuracy", "selectivity", "n", "n_instances"} <= set(table)
    assert (table["n"] == 60).all() and (table["n_instances"] == 20).all()


def test_frames_are_selected_or_averaged():
    act = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # (step, layer, frame, d)
    assert reduce_frames(act, FeatureSpec()).shape == (2, 3, 20)
    np.testing.assert_array_equal(reduce_frames(act, FeatureSpec(frames=(1,), pool="mean")), act[:, :, 1])
    mask = np.array([False, True, False, True])
    np.testing.assert_allclose(reduce_frames(act, FeatureSpec(), mask), act[:, :, [1, 3]].mean(2))


def test_block_inverse_matches_lapack():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 150, 200, generator=gen)
    m = a @ a.mT / 200 + 0.05 * torch.eye(150)
    inv = spd_inverse(m, block=32)
    assert torch.allclose(inv.double() @ m.double(), torch.eye(150, dtype=torch.float64), atol=1e-4)


@pytest.mark.gpu
def test_cuda_engine_matches_cpu():
    x, y, group = planted([0.0, 0.5, 1.0], n_inst=80)
    cpu = ProbeGrid(engine="torch", device="cpu").fit(x, {"y": y}, group)
    gpu = ProbeGrid(engine="torch", device="cuda").fit(torch.as_tensor(x, device="cuda"), {"y": y}, group)
    assert np.abs(cpu.accuracy_ - gpu.accuracy_).max() <= 0.01


def test_outcome_labels_are_probed_on_the_samples_whose_answer_tells_them():
    """`label_outcome_*` (read from the generated video, NaN where it does not tell) gets its own sample subset;
    instance labels keep every sample; naming a label missing from some samples is refused."""
    from types import SimpleNamespace

    import pandas as pd

    from cos_core.analysis.analyze import AnalyzeConfig, _label_subsets

    table = pd.DataFrame({"sample": range(6), "task": "fork", "label_depth": [0, 1, 0, 1, 0, 1],
                          "label_outcome_goal": [0, 1, np.nan, 1, 0, np.nan],
                          "label_gap": [0, 1, 1, np.nan, 0, 1]})
    archive = SimpleNamespace(samples=table, run_id="r")
    subsets = _label_subsets(archive, AnalyzeConfig(), "fork", np.arange(6))
    assert [(s.tolist(), names) for s, names in subsets] == [(list(range(6)), ["depth"]),
                                                             ([0, 1, 3, 4], ["outcome_goal"])]
    with pytest.raises(ValueError, match="gap"):
        _label_subsets(archive, AnalyzeConfig(labels=("gap",)), "fork", np.arange(6))
