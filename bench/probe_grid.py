"""Probe-grid speed: the batched torch engine vs the scikit-learn engine on every CPU core, same data, same run.

Synthetic activations generated on the device: n_layers x n_steps cells x samples x dim, float32; samples are
instances x seeds (an instance vector shared by its seeds, so grouping matters), a 16-dim high-variance shared
subspace (correlated features, as in real activations), and a class signal whose strength rises with the step and
peaks at middle layers, so cell accuracies span chance to ~100%. The torch engine fits the whole grid (5 folds
grouped by instance, control task, bootstrap CIs: everything `ProbeGrid.fit` does), timed as the median of --reps
runs after a warm-up on two cells. scikit-learn fits --sklearn-cells cells spread over the signal range (0 = all of
them) with one worker per CPU core (joblib); when that is a subset, its whole-grid time is its time per cell x the
number of cells (an extrapolation, stated as `extrapolated`). Accuracies (probe and control task) of the two engines
are compared on every cell scikit-learn fitted. The torch engine's work is also put against this device's own peaks,
measured in the same run: a large float32 matmul (FLOP/s; the Gram matrices and the inverses are matmul work) and a
large copy (bytes/s; each logistic iteration reads every (cell, fold) system and inverse once). Writes --out (JSON).

Full size, on a GPU machine:

    python bench/probe_grid.py --layers 30 --steps 50 --samples 1000 --dim 1536 \\
        --out bench/results/probe_grid_h200.json
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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_peaks(device: str) -> dict:
    """This device's float32 matmul FLOP/s and copy bandwidth, measured (best of 5 after a warm-up)."""
    n, numel = (8192, 2**28) if device.startswith("cuda") else (2048, 2**25)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)

    def best(fn):
        fn()
        _sync(device)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        return min(times)

    flops = 2 * n**3 / best(lambda: a @ b)
    bandwidth = 2 * 4 * numel / best(lambda: dst.copy_(src))  # one read and one write per element
    return {"matmul_float32_flop_per_s": flops, "copy_bytes_per_s": bandwidth,
            "how": f"best of 5: {n}x{n} float32 matmul; copy of {4 * numel / 2**30:.2f} GiB"}


def engine_work(grid: ProbeGrid, n_targets: int, kind: str) -> dict:
    """Model of the torch engine's arithmetic (FLOPs) and of the matrix traffic of its logistic iterations (bytes)."""
    n, d, cells = grid.n_samples_, grid.n_features_, grid.n_cells_
    m = n - int(np.min(np.bincount(grid.folds_)))  # the largest training part (what the engine pads to)
    tk = n_targets * int(np.max(grid.n_classes_))
    chunk = grid.timings_["chunk_cells"]
    chunk_cells = [min(chunk, cells - c0) for c0 in range(0, cells, chunk)]
    if kind == "ridge":  # one product with the inverse, then two refinements of two products each
        products = 5 * cells * grid.n_folds_
    else:  # every iteration: one product with the inverse, one with the system
        iterations = grid.timings_["iterations_per_chunk"]
        products = 2 * grid.n_folds_ * sum(c * i for c, i in zip(chunk_cells, iterations))
    return {"gram_flop": 2.0 * cells * n * n * d,
            "inverse_flop": 1.0 * cells * grid.n_folds_ * m**3,  # Cholesky, triangular inverse, product: ~m^3
            "solve_flop": 2.0 * m * m * tk * products, "solve_matrix_bytes": 4.0 * m * m * products,
            "padded_train_samples": m, "columns": tk, "matrix_products": products}


def time_torch(x, y, groups, kind, alpha, args, peaks):
    """The median of --reps whole fits (after a warm-up), with that run's breakdown and work model."""
    ProbeGrid(kind=kind, alpha=alpha, engine="torch", device=args.device).fit(x[:2], {"label": y}, groups)  # warm-up
    runs = []
    for _ in range(args.reps):
        if x.is_cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        grid = ProbeGrid(kind=kind, alpha=alpha, engine="torch", device=args.device).fit(x, {"label": y}, groups)
        runs.append((time.perf_counter() - t0, grid))
    total, grid = sorted(runs, key=lambda run: run[0])[(len(runs) - 1) // 2]
    t = grid.timings_
    work = engine_work(grid, 2, kind)  # the label and its control task
    flops = work["gram_flop"] + work["inverse_flop"]
    return grid, {
        "median_s": total, "runs_s": [run[0] for run in runs], "timings_median_run": t, "work": work,
        "outside_engine_s": total - t["fit_s"],  # checks, folds, controls, bootstrap intervals (`ProbeGrid.fit`)
        "fraction_of_peak": {
            "gram_and_inverse_flops": flops / (t["gram_s"] + t["inverse_s"]) / peaks["matmul_float32_flop_per_s"],
            "solve_matrix_bandwidth": work["solve_matrix_bytes"] / t["solve_s"] / peaks["copy_bytes_per_s"],
            "whole_fit_flops": (flops + work["solve_flop"]) / total / peaks["matmul_float32_flop_per_s"]},
        "peak_gpu_mem_GiB_incl_data": torch.cuda.max_memory_allocated() / 2**30 if x.is_cuda else None,
        "converged_cells": int(grid.converged_.sum()), "n_iter_median": float(np.median(grid.n_iter_)),
        "n_iter_max": int(grid.n_iter_.max()), "accuracy_min": float(grid.accuracy_.min()),
        "accuracy_max": float(grid.accuracy_.max()), "chance": float(grid.chance_[0])}


def time_sklearn(x_sub, y, groups, kind, alpha, jobs):
    t0 = time.perf_counter()
    grid = ProbeGrid(kind=kind, alpha=alpha, engine="sklearn", n_jobs=jobs).fit(x_sub, {"label": y}, groups)
    return grid, time.perf_counter() - t0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--seeds-per-instance", type=int, default=5)
    p.add_argument("--signal", type=float, default=4.0, help="class-mean distance at full strength")
    p.add_argument("--configs", default="logistic:0.1,logistic:0.01,ridge:0.1",
                   help="comma list of kind:alpha (alpha 0.1 is ProbeGrid's default)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sklearn-cells", type=int, default=None,
                   help="cells scikit-learn fits (default: 4 per worker; 0: every cell, no extrapolation)")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="scikit-learn parallel workers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/probe_grid.json"))
    return p.parse_args()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    return f"{names[0] if names else platform.processor()} ({os.cpu_count()} CPUs)"


def main() -> None:
    args = parse_args()
    import sklearn

    result = {"device": device_name(args.device), "torch": torch.__version__, "sklearn": sklearn.__version__,
              "float32_matmul_precision": torch.get_float32_matmul_precision(), "cpu_count": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "config": vars(args) | {"out": str(args.out)},
              "device_peaks": device_peaks(args.device), "torch_engine": {}, "sklearn_engine": {},
              "agreement": {}, "speedup": {}}
    t0 = time.perf_counter()
    x, y, groups, strength = synthetic(args, args.device)
    _sync(args.device)
    result["data"] = {"shape": list(x.shape), "GiB": x.numel() * 4 / 2**30, "generate_s": time.perf_counter() - t0}
    n_cells = x.shape[0]
    n_sub = n_cells if args.sklearn_cells == 0 else min(n_cells, args.sklearn_cells or 4 * args.jobs)
    subset = np.sort(np.argsort(strength)[np.linspace(0, n_cells - 1, n_sub).round().astype(int)])
    x_sub = x[torch.as_tensor(subset, device=x.device)].cpu().numpy()
    time_sklearn(x_sub[: args.jobs], y, groups, "ridge", 0.1, args.jobs)  # start the worker pool (not timed)
    for config in args.configs.split(","):
        kind, alpha = config.split(":")[0], float(config.split(":")[1])
        key = f"{kind}@{alpha:g}"
        grid, timing = time_torch(x, y, groups, kind, alpha, args, result["device_peaks"])
        result["torch_engine"][key] = timing
        ref, parallel_s = time_sklearn(x_sub, y, groups, kind, alpha, args.jobs)
        whole_s = parallel_s / len(subset) * n_cells
        result["sklearn_engine"][key] = {"cells": len(subset), "n_jobs": args.jobs, "parallel_s": parallel_s,
                                         "whole_grid_s": whole_s, "extrapolated": len(subset) < n_cells,
                                         "converged_cells": int(ref.converged_.sum()),
                                         "n_iter_max": int(ref.n_iter_.max())}
        diff = np.abs(grid.accuracy_[subset, 0] - ref.accuracy_[:, 0]) * 100
        ctrl = np.abs(grid.control_accuracy_[subset, 0] - ref.control_accuracy_[:, 0]) * 100
        result["agreement"][key] = {
            "cells": subset.tolist(), "torch_accuracy": grid.accuracy_[subset, 0].tolist(),
            "sklearn_accuracy": ref.accuracy_[:, 0].tolist(), "max_abs_diff_points": float(diff.max()),
            "mean_abs_diff_points": float(diff.mean()), "control_max_abs_diff_points": float(ctrl.max())}
        result["speedup"][key] = {"vs_sklearn_all_cores": whole_s / timing["median_s"],  # both: whole ProbeGrid.fit
                                  "engine_only_vs_sklearn_all_cores":  # the torch engine's fit_s, nothing around it
                                      whole_s / timing["timings_median_run"]["fit_s"]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))  # after each kind: partial results survive a timeout
        report(key, timing, result["sklearn_engine"][key], result["speedup"][key], diff, ctrl)


def report(key, timing, ref, speedup, diff, ctrl) -> None:
    t = timing["timings_median_run"]
    print(f"{key}: torch {timing['median_s']:.2f} s (runs {[round(r, 2) for r in timing['runs_s']]}; gram "
          f"{t['gram_s']:.2f} inverse {t['inverse_s']:.2f} solve {t['solve_s']:.2f} outside the engine "
          f"{timing['outside_engine_s']:.2f}; iterations max {timing['n_iter_max']}); scikit-learn, {ref['n_jobs']} "
          f"workers: {ref['parallel_s']:.1f} s for {ref['cells']} cells, {ref['whole_grid_s']:.1f} s for the grid; "
          f"x{speedup['vs_sklearn_all_cores']:.1f} (engine alone x{speedup['engine_only_vs_sklearn_all_cores']:.1f});"
          f" accuracy max diff {diff.max():.2f} points (control {ctrl.max():.2f}); fraction of peak "
          f"{ {k: round(v, 3) for k, v in timing['fraction_of_peak'].items()} }",
          flush=True)


if __name__ == "__main__":
    main()
