"""Probe-grid speed: the batched torch engine on one GPU vs the scikit-learn reference engine on the same machine.

Synthetic activations generated on the device: n_layers x n_steps cells x samples x dim, float32; samples are
instances x seeds (an instance vector shared by its seeds, so grouping matters), a 16-dim high-variance shared
subspace (correlated features, as in real activations), and a class signal whose strength rises with the step and
peaks at middle layers, so cell accuracies span chance to ~100%. The torch engine fits the whole grid (5 folds
grouped by instance, control task, bootstrap CIs: everything `ProbeGrid.fit` does), timed as the median of
--reps runs after a warm-up on a few cells. scikit-learn is too slow for the whole grid, so it fits a subset of
cells spread over the signal range, in parallel over all CPU cores (joblib) and one cell serially; its whole-grid
time is that measured per-cell time x the number of cells (an extrapolation, stated as such). Accuracies of the
two engines are compared on the subset. Writes --out (JSON). Run on a GPU machine:

    python bench/probe_grid.py --layers 30 --steps 50 --samples 1000 --dim 1536
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cos_core.analysis.probes import ProbeGrid  # noqa: E402

N_SHARED = 16  # dims of the shared high-variance subspace


def synthetic(args, device):
    """Activations (cell, sample, dim) on `device`, labels (sample,), groups (sample,), signal strength (cell,)."""
    gen = torch.Generator(device).manual_seed(args.seed)
    n_inst = args.samples // args.seeds_per_instance
    groups = torch.arange(n_inst, device=device).repeat_interleave(args.seeds_per_instance)
    y = torch.randint(0, args.classes, (n_inst,), generator=gen, device=device)[groups]
    basis = torch.linalg.qr(torch.randn(args.dim, args.classes + N_SHARED, generator=gen, device=device))[0].T
    means, shared = basis[: args.classes] * args.signal, basis[args.classes:] * 3.0  # (class, d), (16, d)
    layer = torch.arange(args.layers, device=device, dtype=torch.float32)[:, None]
    step = torch.arange(args.steps, device=device, dtype=torch.float32)[None, :]
    strength = (torch.sigmoid((step - 0.5 * args.steps) / (0.1 * args.steps))
                * torch.exp(-(((layer - 0.5 * args.layers) / (0.3 * args.layers)) ** 2))).reshape(-1)  # (cell,)
    x = torch.empty(args.layers * args.steps, len(groups), args.dim, device=device)
    for c0 in range(0, len(x), 100):
        c1 = min(len(x), c0 + 100)
        inst = 0.5 * torch.randn(c1 - c0, n_inst, args.dim, generator=gen, device=device)[:, groups]
        low = torch.randn(c1 - c0, len(groups), N_SHARED, generator=gen, device=device) @ shared
        x[c0:c1] = (torch.randn(c1 - c0, len(groups), args.dim, generator=gen, device=device) + inst + low
                    + strength[c0:c1, None, None] * means[y][None])
    return x, y.cpu().numpy(), groups.cpu().numpy(), strength.cpu().numpy()


def time_torch(x, y, groups, kind, alpha, args):
    ProbeGrid(kind=kind, alpha=alpha, engine="torch", device=args.device).fit(x[:8], {"label": y}, groups)  # warm-up
    runs, grid = [], None
    for _ in range(args.reps):
        torch.cuda.reset_peak_memory_stats() if x.is_cuda else None
        t0 = time.perf_counter()
        grid = ProbeGrid(kind=kind, alpha=alpha, engine="torch", device=args.device).fit(x, {"label": y}, groups)
        runs.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if x.is_cuda else None
    acc = grid.accuracy_[:, 0]
    return grid, {"median_s": statistics.median(runs), "runs_s": runs, "timings_last": grid.timings_,
                  "peak_gpu_mem_GiB_incl_data": peak, "converged_cells": int(grid.converged_.sum()),
                  "n_iter_median": float(np.median(grid.n_iter_)), "n_iter_max": int(grid.n_iter_.max()),
                  "accuracy_min": float(acc.min()), "accuracy_max": float(acc.max()),
                  "chance": float(grid.chance_[0])}


def time_sklearn(x_sub, y, groups, kind, alpha, jobs):
    t0 = time.perf_counter()
    grid = ProbeGrid(kind=kind, alpha=alpha, engine="sklearn", n_jobs=jobs).fit(x_sub, {"label": y}, groups)
    return grid, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--seeds-per-instance", type=int, default=5)
    p.add_argument("--signal", type=float, default=4.0, help="class-mean distance at full strength")
    p.add_argument("--configs", default="logistic:0.1,ridge:0.1,logistic:0.01",
                   help="comma list of kind:alpha (alpha 0.1 is ProbeGrid's default)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sklearn-cells", type=int, default=16, help="cells fitted by scikit-learn (parallel)")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="scikit-learn parallel workers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/probe_grid.json"))
    args = p.parse_args()
    import sklearn

    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
              "torch": torch.__version__, "float32_matmul_precision": torch.get_float32_matmul_precision(), "sklearn": sklearn.__version__, "cpu_count": os.cpu_count(),
              "config": vars(args) | {"out": str(args.out)}, "torch_engine": {}, "sklearn_engine": {},
              "agreement": {}, "speedup": {}}
    t0 = time.perf_counter()
    x, y, groups, strength = synthetic(args, args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    result["data"] = {"shape": list(x.shape), "GiB": x.numel() * 4 / 2**30, "generate_s": time.perf_counter() - t0}
    subset = np.argsort(strength)[np.linspace(0, len(strength) - 1, args.sklearn_cells).round().astype(int)]
    x_sub = x[torch.as_tensor(subset, device=x.device)].cpu().numpy()
    n_cells = x.shape[0]
    time_sklearn(x_sub[: args.jobs], y, groups, "ridge", 0.1, args.jobs)  # start the worker pool (not timed)
    for config in args.configs.split(","):
        kind, alpha = config.split(":")[0], float(config.split(":")[1])
        key = f"{kind}@{alpha:g}"
        grid, timing = time_torch(x, y, groups, kind, alpha, args)
        result["torch_engine"][key] = timing
        ref, parallel_s = time_sklearn(x_sub, y, groups, kind, alpha, args.jobs)
        _, serial_s = time_sklearn(x_sub[:1], y, groups, kind, alpha, 1)
        result["sklearn_engine"][key] = {
            "cells": len(subset), "n_jobs": args.jobs, "parallel_s": parallel_s,
            "extrapolated_parallel_s": parallel_s / len(subset) * n_cells, "serial_one_cell_s": serial_s,
            "extrapolated_serial_s": serial_s * n_cells, "converged_cells": int(ref.converged_.sum())}
        diff = np.abs(grid.accuracy_[subset, 0] - ref.accuracy_[:, 0]) * 100
        ctrl = np.abs(grid.control_accuracy_[subset, 0] - ref.control_accuracy_[:, 0]) * 100
        result["agreement"][key] = {"cells": subset.tolist(), "torch_accuracy": grid.accuracy_[subset, 0].tolist(),
                                     "sklearn_accuracy": ref.accuracy_[:, 0].tolist(),
                                     "max_abs_diff_points": float(diff.max()), "mean_abs_diff_points": float(diff.mean()),
                                     "control_max_abs_diff_points": float(ctrl.max())}
        result["speedup"][key] = {
            "vs_sklearn_parallel": result["sklearn_engine"][key]["extrapolated_parallel_s"] / timing["median_s"],
            "vs_sklearn_serial": result["sklearn_engine"][key]["extrapolated_serial_s"] / timing["median_s"]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))  # after each kind: partial results survive a timeout
        print(f"{key}: torch {timing['median_s']:.2f} s (runs {[round(r, 2) for r in timing['runs_s']]}), "
              f"sklearn {args.jobs} jobs {parallel_s:.1f} s for {len(subset)} cells -> "
              f"{result['sklearn_engine'][key]['extrapolated_parallel_s']:.0f} s extrapolated, serial cell "
              f"{serial_s:.1f} s; speed-up x{result['speedup'][key]['vs_sklearn_parallel']:.0f} (parallel) "
              f"x{result['speedup'][key]['vs_sklearn_serial']:.0f} (serial); accuracy diff max "
              f"{diff.max():.2f} points; torch timings {timing['timings_last']}", flush=True)


if __name__ == "__main__":
    main()
