"""The propagation map (paper Fig. 3c-style sensitivity): how far a perturbation injected at one step carries.

Owns `propagation_table` (1 - linear CKA between the clean and perturbed runs' token-mean block outputs, across
samples) and `propagation_tables`, which adds the per-sample view: each perturbed run's token-level and per-frame
distance to its own clean run per inject step × measure step × layer (`propagation_samples`), their means with
instance-bootstrap intervals, and the per-inject-step sensitivity curve (`sensitivity`). The runs are made by
`cos_core.experiments.interventions`. Pure numpy/pandas; must not import torch, streamlit or experiments.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from .cka import linear_cka
from .stats import N_BOOT, bootstrap_weights, encode_groups, group_mean_ci

MIN_SAMPLES = 4  # CKA over fewer samples is dominated by the centring (2 samples: always 1)
AVERAGE_LAYER = -1


def _check(name: str, acts: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    acts = np.asarray(acts, dtype=np.float64)
    if acts.ndim != 4:
        raise ValueError(f"{name} must be (sample, step, layer, d), got shape {acts.shape}")
    if shape is not None and acts.shape != shape:
        raise ValueError(f"{name} has shape {acts.shape}; the clean activations have {shape}")
    if acts.shape[0] < MIN_SAMPLES:
        raise ValueError(f"{name} has {acts.shape[0]} samples; the propagation map needs >= {MIN_SAMPLES} for CKA")
    return acts


def dissimilarity(clean: np.ndarray, perturbed: np.ndarray) -> float:
    """1 - linear CKA of two (sample, d) representations of the same samples; 0 when they are equal."""
    return 1.0 - linear_cka(clean, perturbed)


def propagation_table(clean: np.ndarray, perturbed: Mapping[int, np.ndarray]) -> pd.DataFrame:
    """Rows (inject_step, measure_step, layer, dissimilarity, n) for every measure step >= the inject step.

    clean: (sample, step, layer, d) token-mean block outputs of the unperturbed runs; perturbed: {inject step: the
    same array from the runs perturbed at that step}. `layer` = -1 rows average the layers' dissimilarities.
    """
    clean = _check("clean", clean)
    n, n_steps, n_layers, _ = clean.shape
    rows = []
    for inject in sorted(perturbed):
        if not 0 <= int(inject) < n_steps:
            raise ValueError(f"inject step {inject} out of range; the activations have steps 0..{n_steps - 1}")
        acts = _check(f"perturbed[{inject}]", perturbed[inject], clean.shape)
        for measure in range(int(inject), n_steps):
            values = [dissimilarity(clean[:, measure, layer], acts[:, measure, layer]) for layer in range(n_layers)]
            rows += [{"inject_step": int(inject), "measure_step": measure, "layer": layer, "dissimilarity": value,
                      "n": n} for layer, value in enumerate(values)]
            rows.append({"inject_step": int(inject), "measure_step": measure, "layer": AVERAGE_LAYER,
                         "dissimilarity": float(np.mean(values)), "n": n})
    return pd.DataFrame(rows, columns=["inject_step", "measure_step", "layer", "dissimilarity", "n"])


def _ci(values: np.ndarray, group: np.ndarray, n_groups: int, weights: np.ndarray) -> tuple:
    mean, low, high = group_mean_ci(values, group, n_groups, weights)
    return np.asarray(mean, dtype=float), np.asarray(low, dtype=float), np.asarray(high, dtype=float)


def propagation_tables(clean: np.ndarray, perturbed: Mapping[int, np.ndarray], jobs: pd.DataFrame,
                       token_dist: np.ndarray, frame_dist: np.ndarray, *, strength: float, n_boot: int = N_BOOT,
                       regime: str = "", seed: int = 0) -> dict[str, pd.DataFrame]:
    """`propagation`, `propagation_samples` and `sensitivity` from one propagation sweep.

    clean / perturbed: token means as `propagation_table` takes them (CKA across samples); jobs: one row per
    perturbed run (`sample`, `inject_step`, `instance`, `final_distance` = RMS of the final video's change,
    `flipped` = the final answer changed); token_dist / frame_dist: (job, step, layer) distance of the run's block
    outputs to its clean twin's (mean over tokens, or over per-frame means, of |Δh| / mean |h_clean|)."""
    jobs = jobs.reset_index(drop=True)
    n_jobs, n_steps, n_layers = token_dist.shape
    if len(jobs) != n_jobs or frame_dist.shape != token_dist.shape:
        raise ValueError(f"{len(jobs)} jobs, token_dist {token_dist.shape}, frame_dist {frame_dist.shape} disagree")
    group, n_groups = encode_groups(jobs["instance"].astype(str).to_numpy())
    weights = bootstrap_weights(n_groups, n_boot, seed)
    inject = jobs["inject_step"].to_numpy()
    measure = np.arange(n_steps)
    rows, sample_rows, curve = [], [], []
    cka = propagation_table(clean, perturbed).set_index(["inject_step", "measure_step", "layer"])["dissimilarity"]
    for s in sorted(set(inject.tolist())):
        mine = np.flatnonzero(inject == s)
        g = group[mine]
        tok = token_dist[mine][:, s:]  # (job, measure, layer)
        frm = frame_dist[mine][:, s:]
        with_mean = np.concatenate([tok, tok.mean(-1, keepdims=True)], -1)  # (job, measure, layer + mean)
        frm_mean = np.concatenate([frm, frm.mean(-1, keepdims=True)], -1)
        dist, low, high = _ci(np.moveaxis(with_mean, 0, -1), g, n_groups, weights)  # (measure, layer + 1)
        frame_mean = frm_mean.mean(0)
        layers = list(range(n_layers)) + [AVERAGE_LAYER]
        for m_i, m in enumerate(measure[s:]):
            for l_i, layer in enumerate(layers):
                rows.append({"inject_step": int(s), "measure_step": int(m), "layer": layer,
                             "dissimilarity": float(cka.get((int(s), int(m), layer), np.nan)),
                             "distance": float(dist[m_i, l_i]), "ci_low": float(low[m_i, l_i]),
                             "ci_high": float(high[m_i, l_i]), "frame_distance": float(frame_mean[m_i, l_i]),
                             "n": len(mine)})
        j_i, m_i, l_i = np.meshgrid(np.arange(len(mine)), np.arange(n_steps - s), np.arange(n_layers), indexing="ij")
        sample_rows.append(pd.DataFrame({"sample": jobs["sample"].to_numpy()[mine][j_i.ravel()],
                                         "inject_step": int(s), "measure_step": measure[s:][m_i.ravel()],
                                         "layer": l_i.ravel(), "token_distance": tok.ravel(),
                                         "frame_distance": frm.ravel()}))
        part = jobs.iloc[mine]
        figures = {"distance_mean": tok.mean(axis=(1, 2)), "distance_last": tok[:, -1].mean(-1),
                   "final_distance": part["final_distance"].to_numpy(dtype=float),
                   "flip_rate": part["flipped"].to_numpy(dtype=float)}
        row = {"inject_step": int(s), "n": len(mine), "n_instances": int(part["instance"].nunique())}
        for name, values in figures.items():
            mean, lo, hi = _ci(values, g, n_groups, weights)
            row.update({name: float(mean), f"{name}_ci_low": float(lo), f"{name}_ci_high": float(hi)})
        curve.append(row)
    out = {"propagation": pd.DataFrame(rows), "propagation_samples": pd.concat(sample_rows, ignore_index=True),
           "sensitivity": pd.DataFrame(curve)}
    for table in out.values():
        table["strength"] = float(strength)
        table["regime"] = regime
    return out
