"""The reference probe engine, slow and simple on purpose (the batched torch engine is checked against it): one
scikit-learn estimator per (cell, fold, label), ``LogisticRegression(C=1/(alpha n))`` (``2/(alpha n)`` when a training
part holds two classes: scikit-learn then fits one weight vector, not two symmetric ones) or
``RidgeClassifier(alpha=alpha n)``, n = training samples of the fold, minimising `probes.ProbeGrid`'s objective.
Imports numpy, scikit-learn and `stats`; never `probes`, which calls this engine.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from .stats import standardize

LOGISTIC_TOL = 1e-4  # scikit-learn's default gradient tolerance
LOGISTIC_MAX_ITER = 1000  # at least this many L-BFGS iterations (scikit-learn's default of 100 often stops early)


def _fit_cell(x: np.ndarray, targets: np.ndarray, folds: np.ndarray, kind: str, alpha: float,
              max_iter: int) -> tuple[np.ndarray, int, bool]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, RidgeClassifier

    z = standardize(x)  # (sample, feature)
    pred = np.empty_like(targets)
    n_iter, converged = 0, True
    for f in range(int(folds.max()) + 1):
        train, test = folds != f, folds == f
        m = int(train.sum())
        for t in range(len(targets)):
            y = targets[t, train]
            classes = np.unique(y)
            if len(classes) == 1:  # a training part with one class predicts it
                pred[t, test] = classes[0]
                continue
            if kind == "ridge":
                model = RidgeClassifier(alpha=alpha * m)
            else:
                c = (2.0 if len(classes) == 2 else 1.0) / (alpha * m)
                model = LogisticRegression(C=c, tol=LOGISTIC_TOL, max_iter=max(max_iter, LOGISTIC_MAX_ITER))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                model.fit(z[train], y)
            if any(issubclass(w.category, ConvergenceWarning) for w in caught):
                converged = False
            n_iter = max(n_iter, int(np.max(getattr(model, "n_iter_", None) or 0)))
            pred[t, test] = model.predict(z[test])
    return pred, n_iter, converged


def fit_predict_sklearn(X: np.ndarray, targets: np.ndarray, n_classes: np.ndarray, folds: np.ndarray,
                        present: np.ndarray, *, kind: str, alpha: float, max_iter: int, n_jobs: int = 1):
    """Held-out predictions (cell, target, sample), iterations and convergence per cell, and timings."""
    start = time.perf_counter()
    args = (targets, folds, kind, alpha, max_iter)
    if n_jobs == 1:
        results = [_fit_cell(X[c], *args) for c in range(len(X))]
    else:
        from joblib import Parallel, delayed

        results = Parallel(n_jobs=n_jobs)(delayed(_fit_cell)(X[c], *args) for c in range(len(X)))
    pred = np.stack([r[0] for r in results])
    n_iter = np.array([r[1] for r in results])
    converged = np.array([r[2] for r in results])
    return pred, n_iter, converged, {"solve_s": time.perf_counter() - start, "device": "cpu", "n_jobs": n_jobs}
