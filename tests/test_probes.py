"""Probe grids on planted signals: a linearly planted label is recovered and noise sits at chance, a memorising-
friendly control drives selectivity to zero, the batched torch engine agrees with the scikit-learn reference within
1 point, folds never split an instance, intervals and chance are what they claim, bad input is named."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from cos_core.analysis.features import FeatureSpec, reduce_frames
from cos_core.analysis.probe_torch import _inverse, fold_kernels, fold_layout, solve_logistic, spd_inverse
from cos_core.analysis.probes import ProbeGrid, control_labels, fold_class_mask, group_folds, majority_predictions
from cos_core.analysis.stats import standardize


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


def test_logistic_engines_agree_on_every_cell_of_a_planted_grid():
    """More features than training samples (the dual's regime), signal from none to strong, 4 classes, a binary label
    and the controls, the default alpha: every cell's held-out accuracy within 1 point of scikit-learn's (with its
    default tol; `test_logistic_solver_reaches_the_optimum` covers smaller alpha against a converged reference)."""
    x, y, group = planted(np.linspace(0.0, 2.0, 4), n_inst=60, seeds=3, dim=240, classes=4, seed=3)
    labels = {"y": y, "binary": (y < 2).astype(int)}
    fast = ProbeGrid(engine="torch", device="cpu").fit(x, labels, group)
    ref = ProbeGrid(engine="sklearn").fit(x, labels, group)
    assert fast.converged_.all() and ref.converged_.all()
    assert np.abs(fast.accuracy_ - ref.accuracy_).max() <= 0.01
    assert np.abs(fast.control_accuracy_ - ref.control_accuracy_).max() <= 0.01
    assert fast.accuracy_[-1, 0] > 0.9 and fast.accuracy_[0, 0] < 0.4  # the grid spans chance to strong


def _multinomial_objective(z, y, weights, bias, alpha):
    """Mean cross-entropy + alpha/2 |W|^2 in float64; weights (d, class), classes numbered as in y."""
    logits = z @ weights + bias
    logits -= logits.max(1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -log_p[np.arange(len(y)), y].mean() + alpha / 2 * (weights ** 2).sum()


def _optimum_problems(dim):
    """Planted data, 4 folds of 8, 8, 7, 7 instances and three targets (4 classes; 2; one with class 3 only in fold 0,
    so absent from that fold's training part)."""
    x, y, group = planted([0.6], n_inst=30, seeds=3, dim=dim, classes=4, seed=5)
    folds = group_folds(group, y, 4, np.random.default_rng(0))
    targets = np.stack([y, (y == 1).astype(int), np.where(folds == 0, 3, np.minimum(y, 2))])
    return x, folds, targets, fold_class_mask(targets, np.array([4, 2, 4]), folds, 4)


@functools.cache
def _sklearn_optima(dim, alpha):
    """{(fold, target): the objective at scikit-learn's optimum found with tol 1e-10}."""
    from sklearn.linear_model import LogisticRegression

    x, folds, targets, present = _optimum_problems(dim)
    z, best = standardize(x[0]), {}
    for f in range(4):
        for t, target in enumerate(targets):
            classes = np.flatnonzero(present[t, f])
            zt, yt = z[folds != f], np.searchsorted(classes, target[folds != f])
            c = (2.0 if len(classes) == 2 else 1.0) / (alpha * len(yt))
            model = LogisticRegression(C=c, tol=1e-10, max_iter=100000).fit(zt, yt)
            w_ref, b_ref = model.coef_.T, model.intercept_
            if len(classes) == 2:  # one weight vector for two classes: split it symmetrically
                w_ref, b_ref = np.hstack([-w_ref / 2, w_ref / 2]), np.array([-b_ref[0] / 2, b_ref[0] / 2])
            best[f, t] = _multinomial_objective(zt, yt, w_ref, b_ref, alpha)
    return best


@pytest.mark.parametrize("dim,alpha", [(20, 0.01), (300, 0.1), (300, 0.01)])
@pytest.mark.parametrize("dtype,rel_gap", [(torch.float64, 1e-5), (torch.float32, 5e-4)])
def test_logistic_solver_reaches_the_optimum(dim, alpha, dtype, rel_gap):
    """Every (fold, target) problem of the dual solver ends at scikit-learn's optimum: folds of unequal size
    (padding), a class absent from a training part, 4 classes and 2, fewer and more features than samples (a Gram
    matrix with a null space, and one without). float64 shows the method is exact; float32 (what the engine runs)
    loses up to ~1e-4 to rounding where the classes are nearly separable, and must stay as close as scikit-learn's
    default tol (1e-4) gets on these problems (up to 5e-4 above the optimum)."""
    x, folds, targets, present = _optimum_problems(dim)
    layout = fold_layout(folds, targets, present, torch.device("cpu"))
    layout = layout._replace(onehot=layout.onehot.to(dtype), w=layout.w.to(dtype), m_f=layout.m_f.to(dtype))
    system, _ = fold_kernels(x, layout, torch.device("cpu"), dtype)
    reg = 2 * alpha * layout.m_f
    system.diagonal(dim1=-2, dim2=-1).add_(reg[:, None])
    coef, bias, _, converged, _ = solve_logistic(system, reg, _inverse(system), layout, alpha, 1000)
    assert converged.all()
    z = standardize(x[0])
    for (f, t), best in _sklearn_optima(dim, alpha).items():
        classes, train = np.flatnonzero(present[t, f]), folds != f
        zt, mean = z[train], z[train].mean(0)
        dual = coef[0, f, t][classes, : train.sum()].double().numpy()  # (class, m)
        weights = (zt - mean).T @ dual.T  # W = X_train^T A on centred features
        ours = _multinomial_objective(zt, np.searchsorted(classes, targets[t, train]), weights,
                                      bias[0, f, t, classes].double().numpy() - mean @ weights, alpha)
        assert best - 1e-9 <= ours <= best * (1 + rel_gap), (f, t, ours, best)


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
