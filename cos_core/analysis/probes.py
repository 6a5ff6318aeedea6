"""Linear probes for every (layer, step) cell at once: one estimator, two engines, honest cross-validation.

Owns `ProbeGrid` (scikit-learn contract: hyper-parameters in ``__init__``, data in ``fit``, fitted attributes end in
``_``), folds grouped by task instance (stratified by label), control tasks (Hewitt & Liang 2019), chance level and
bootstrap intervals over instances. Engines: `probe_torch.py` (batched, GPU) and `probe_sklearn.py` (reference),
imported only when used, as are torch and scikit-learn. Must not import streamlit, capture or experiments.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import numpy as np

from .stats import N_BOOT, bootstrap_weights, encode_groups, group_mean_ci

log = logging.getLogger(__name__)

KINDS = ("logistic", "ridge")
ENGINES = ("auto", "torch", "sklearn")


class ProbeGrid:
    """Cross-validated linear probes for many cells (e.g. layer x step) sharing samples, labels and folds.

    Objective per cell, fold and label, on features standardised per cell (mean 0, std 1 over all samples; no
    labels involved): ``kind="logistic"``: mean multinomial cross-entropy + alpha/2 |W|^2 (intercept free);
    ``kind="ridge"``: one-vs-rest +-1 targets, mean squared error/2 + alpha/2 |W|^2 (scikit-learn's
    ``RidgeClassifier`` with ``alpha * n_train``). Both engines minimise the same objective on the same folds.
    """

    def __init__(self, kind: str = "logistic", alpha: float = 0.1, n_folds: int = 5, control: bool = True,
                 n_boot: int = N_BOOT, max_iter: int = 300, engine: str = "auto", device: str | None = None,
                 n_jobs: int = 1, random_state: int = 0):
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not allowed; use one of {KINDS}")
        if not (isinstance(alpha, (int, float)) and np.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha={alpha!r} must be a positive finite number (L2 strength)")
        if not (isinstance(n_folds, int) and n_folds >= 2):
            raise ValueError(f"n_folds={n_folds!r} must be an int >= 2")
        if not (isinstance(n_boot, int) and n_boot >= 100):
            raise ValueError(f"n_boot={n_boot!r} must be an int >= 100 (bootstrap replicates for intervals)")
        if not (isinstance(max_iter, int) and max_iter >= 1):
            raise ValueError(f"max_iter={max_iter!r} must be a positive int")
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r} is not allowed; use one of {ENGINES}")
        self.kind, self.alpha, self.n_folds, self.control = kind, float(alpha), n_folds, bool(control)
        self.n_boot, self.max_iter, self.engine, self.device = n_boot, max_iter, engine, device
        self.n_jobs, self.random_state = n_jobs, random_state

    # ---- fitting -----------------------------------------------------------------------------------------
    def fit(self, X: Any, labels: Mapping[str, np.ndarray] | np.ndarray, groups: np.ndarray,
            types: np.ndarray | None = None) -> "ProbeGrid":
        """X: (cell, sample, feature) numpy array or torch tensor; labels: {name: (sample,) ints} or one array;
        groups: (sample,) instance of each sample (samples of one instance never cross folds); types: (sample,)
        what the control task assigns random labels to (default: the groups, i.e. the instances)."""
        labels = {"label": labels} if not isinstance(labels, Mapping) else dict(labels)
        n_cells, n, n_features = check_features(X)
        self.label_names_ = list(labels)
        y, self.classes_ = encode_labels(labels, n)  # (label, sample)
        self.group_, self.n_groups_ = encode_groups(np.asarray(groups))
        if len(self.group_) != n:
            raise ValueError(f"groups has {len(self.group_)} entries, X has {n} samples")
        if self.n_groups_ < 2:
            raise ValueError(f"cross-validation grouped by instance needs >= 2 instances, found {self.n_groups_} "
                             "(all samples come from one task instance)")
        self.n_folds_ = min(self.n_folds, self.n_groups_)
        if self.n_folds_ < self.n_folds:
            log.warning("only %d instances: using %d folds (leave one instance out)", self.n_groups_, self.n_folds_)
        rng = np.random.default_rng(self.random_state)
        self.folds_ = group_folds(self.group_, y[0], self.n_folds_, rng)
        if types is None:
            types_ = self.group_
        else:
            types_, _ = encode_groups(np.asarray(types))
            if len(types_) != n:
                raise ValueError(f"types has {len(types_)} entries, X has {n} samples")
        targets = np.concatenate([y, control_labels(y, types_, rng)]) if self.control else y
        n_classes = np.array([len(c) for c in self.classes_] * (2 if self.control else 1))
        present = fold_class_mask(targets, n_classes, self.folds_, self.n_folds_)  # (target, fold, class)
        self._warn_missing(present[: len(y)])
        self.engine_ = self._resolve_engine()
        start = time.perf_counter()
        pred, self.n_iter_, self.converged_, self.timings_ = self._run_engine(X, targets, n_classes, present)
        self.timings_["fit_s"] = time.perf_counter() - start
        self.n_samples_, self.n_features_, self.n_cells_ = n, n_features, n_cells
        self._summarise(pred, targets, len(y))
        return self

    def _resolve_engine(self) -> str:
        if self.engine != "auto":
            return self.engine
        try:
            import torch  # noqa: F401
        except ImportError:
            return "sklearn"
        return "torch"

    def _run_engine(self, X, targets, n_classes, present):
        common = dict(kind=self.kind, alpha=self.alpha, max_iter=self.max_iter)
        if self.engine_ == "torch":
            from .probe_torch import fit_predict_torch

            return fit_predict_torch(X, targets, n_classes, self.folds_, present, device=self.device, **common)
        from .probe_sklearn import fit_predict_sklearn

        return fit_predict_sklearn(np.asarray(X), targets, n_classes, self.folds_, present, n_jobs=self.n_jobs,
                                   **common)

    def _warn_missing(self, present: np.ndarray) -> None:
        for t, name in enumerate(self.label_names_):
            k = len(self.classes_[t])
            absent = [(f, self.classes_[t][c]) for f in range(present.shape[1]) for c in range(k)
                      if not present[t, f, c]]
            if absent:
                log.warning("label %r: classes absent from some training folds (fold, class): %s; those folds "
                            "cannot predict them", name, absent[:8])

    def _summarise(self, pred: np.ndarray, targets: np.ndarray, n_labels: int) -> None:
        """pred: (cell, target, sample) held-out predictions -> accuracies, intervals, selectivity, chance."""
        correct = pred == targets[None]  # (cell, target, sample)
        self.correct_ = correct[:, :n_labels]
        weights = bootstrap_weights(self.n_groups_, self.n_boot, self.random_state)
        acc, lo, hi = group_mean_ci(self.correct_, self.group_, self.n_groups_, weights)
        self.accuracy_, self.ci_low_, self.ci_high_ = acc, lo, hi  # (cell, label)
        if self.control:
            ctrl = correct[:, n_labels:]
            self.control_accuracy_ = ctrl.mean(-1)
            diff = self.correct_.astype(np.float64) - ctrl
            self.selectivity_, self.selectivity_ci_low_, self.selectivity_ci_high_ = group_mean_ci(
                diff, self.group_, self.n_groups_, weights)
        majority = majority_predictions(targets[:n_labels], self.folds_, self.n_folds_)  # (label, sample)
        self.chance_ = (majority == targets[:n_labels]).mean(-1)
        self.n_classes_ = np.array([len(c) for c in self.classes_])

    # ---- reporting ---------------------------------------------------------------------------------------
    def table(self, cells: "Any | None" = None):
        """Long table, one row per (cell, label); `cells` (a DataFrame, one row per cell) is joined in front."""
        import pandas as pd

        n_cells, n_labels = self.accuracy_.shape
        rows = {
            "cell": np.repeat(np.arange(n_cells), n_labels),
            "label": np.tile(self.label_names_, n_cells),
            "kind": self.kind, "engine": self.engine_, "alpha": self.alpha,
            "n": self.n_samples_, "n_instances": self.n_groups_, "n_folds": self.n_folds_,
            "n_features": self.n_features_, "n_classes": np.tile(self.n_classes_, n_cells),
            "accuracy": self.accuracy_.ravel(), "ci_low": self.ci_low_.ravel(), "ci_high": self.ci_high_.ravel(),
            "chance": np.tile(self.chance_, n_cells), "chance_uniform": np.tile(1.0 / self.n_classes_, n_cells),
        }
        if self.control:
            rows.update(control_accuracy=self.control_accuracy_.ravel(), selectivity=self.selectivity_.ravel(),
                        selectivity_ci_low=self.selectivity_ci_low_.ravel(),
                        selectivity_ci_high=self.selectivity_ci_high_.ravel())
        rows.update(converged=np.repeat(self.converged_, n_labels), n_iter=np.repeat(self.n_iter_, n_labels))
        out = pd.DataFrame(rows)
        if cells is not None:
            if len(cells) != n_cells:
                raise ValueError(f"cells has {len(cells)} rows, the grid has {n_cells} cells")
            out = pd.concat([cells.reset_index(drop=True).iloc[out["cell"]].reset_index(drop=True),
                             out.drop(columns="cell")], axis=1)
        return out


# ---- validation and shared pieces (both engines use exactly these) ---------------------------------------------
def check_features(X: Any) -> tuple[int, int, int]:
    """(cell, sample, feature) shape of a numpy array or torch tensor, with every value finite."""
    shape = tuple(X.shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"features must have shape (cell, sample, feature) with no empty axis, got {shape}")
    if hasattr(X, "detach"):  # torch, checked on its own device
        bad = (~X.isfinite()).flatten(1).sum(1).cpu().numpy()
    else:
        bad = (~np.isfinite(X)).reshape(shape[0], -1).sum(1)
    if bad.any():
        cells = np.flatnonzero(bad)
        raise ValueError(f"features hold NaN/inf in {len(cells)} of {shape[0]} cells (cell index: count) "
                         f"{ {int(c): int(bad[c]) for c in cells[:10]} }; probes need finite activations")
    return shape


def encode_labels(labels: Mapping[str, np.ndarray], n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """{name: (n,) labels} -> dense class indices (label, n) and the original class values per label."""
    if not labels:
        raise ValueError("no labels given to probe")
    encoded, classes = [], []
    for name, values in labels.items():
        values = np.asarray(values)
        if values.shape != (n,):
            raise ValueError(f"label {name!r} has shape {values.shape}; expected ({n},), one per sample")
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise ValueError(f"label {name!r} is missing for samples {np.flatnonzero(~np.isfinite(values))[:10]}")
        if values.dtype.kind not in "iub" and not (values.dtype.kind == "f" and np.all(values == np.round(values))):
            raise ValueError(f"label {name!r} must hold integer classes, got dtype {values.dtype}")
        uniq, index = np.unique(values.astype(np.int64), return_inverse=True)
        if len(uniq) < 2:
            raise ValueError(f"label {name!r} has only one class ({uniq.tolist()}) in these samples: nothing to "
                             "probe")
        encoded.append(index)
        classes.append(uniq)
    return np.stack(encoded).astype(np.int64), classes


def group_folds(group: np.ndarray, y: np.ndarray, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold of each sample: whole instances per fold, instances dealt round-robin after sorting by their label
    (so every fold sees each class where possible), order within a class random."""
    n_groups = int(group.max()) + 1
    first = np.full(n_groups, -1)
    first[group[::-1]] = np.arange(len(group))[::-1]  # first sample of each group
    order = rng.permutation(n_groups)
    order = order[np.argsort(y[first[order]], kind="stable")]
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    fold_of_group[order] = np.arange(n_groups) % n_folds
    return fold_of_group[group]


def control_labels(y: np.ndarray, group: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Control task per label (Hewitt & Liang 2019): every type (instance) takes the label of another random type
    (a permutation, so class frequencies stay), all its samples sharing it; a probe can fit it only by memorising
    types. Under CV grouped by the same types it is a permutation baseline. (label, sample)."""
    n_groups = int(group.max()) + 1
    first = np.full(n_groups, -1)
    first[group[::-1]] = np.arange(len(group))[::-1]
    out = np.empty_like(y)
    for t in range(len(y)):
        out[t] = y[t, first[rng.permutation(n_groups)]][group]
    return out


def fold_class_mask(targets: np.ndarray, n_classes: np.ndarray, folds: np.ndarray, n_folds: int) -> np.ndarray:
    """present[t, f, k]: class k of target t occurs in the training part of fold f. (target, fold, max class)."""
    present = np.zeros((len(targets), n_folds, int(n_classes.max())), dtype=bool)
    for f in range(n_folds):
        train = folds != f
        for t in range(len(targets)):
            present[t, f, np.unique(targets[t, train])] = True
    return present


def majority_predictions(y: np.ndarray, folds: np.ndarray, n_folds: int) -> np.ndarray:
    """The chance baseline under the same folds: predict each training part's most frequent class."""
    out = np.empty_like(y)
    for f in range(n_folds):
        train, test = folds != f, folds == f
        for t in range(len(y)):
            out[t, test] = np.bincount(y[t, train]).argmax()
    return out
