"""The propagation map (paper Fig. 3c-style sensitivity): how far a perturbation injected at one step carries.

Owns `propagation_table`: 1 - linear CKA between the clean and the perturbed runs' block outputs (token means, one
row per sample) at every measure step >= the inject step, per layer and averaged over layers (`layer` = -1). The
runs themselves are made by `cos_core.experiments.interventions`. Pure numpy/pandas; must not import torch,
streamlit or experiments.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from .cka import linear_cka

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
