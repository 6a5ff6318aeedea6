"""`cos ensemble`: measure the latent ensemble on an organism task run and write ``derived/ensemble*.parquet``.

Owns argument parsing, the resolved run path, the progress bar and the printed one-line JSON summary. The
measurement itself is `cos_core.experiments.ensemble.ensemble_run`; the library only logs. Never imports
streamlit.
"""

from __future__ import annotations

import argparse
import json
import sys

from .common import (add_execution, add_instances, add_noise, add_runs_dir, command, default_device, instances,
                     int_list, open_run, split, workers)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..experiments.ensemble import METHODS

    p.add_argument("run", help="an organism task run: a directory, or a run id under --runs-dir")
    add_runs_dir(p)
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma list of {', '.join(METHODS)} (default all; the plain model 'none' is always in)")
    p.add_argument("--k", default="0,1,2,4", help="steps merged, comma list (default 0,1,2,4)")
    p.add_argument("--n", default="1,2,4", help="seeds per ensemble, comma list (default 1,2,4)")
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the run's)")
    add_instances(p, default="the run's own instances")
    p.add_argument("--seed-base", type=int, default=0, help="member m draws noise seed SEED_BASE + m (default 0)")
    add_noise(p)
    add_execution(p, batch_size=128)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    values = int_list(text, flag)
    if not values:
        raise ValueError(f"{flag} {text!r} names no value")
    return values


def config_from_args(args: argparse.Namespace, device: str):
    from ..experiments.ensemble import EnsembleConfig

    n_instances, first = instances(args)
    return EnsembleConfig(methods=split(args.methods), ks=_ints(args.k, "--k"), ns=_ints(args.n, "--n"),
                          steps=args.steps, instances=n_instances, first_instance=first, seed_base=args.seed_base,
                          noise=args.noise.replace("-", "_"), batch_size=args.batch_size, workers=workers(args, device))


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..experiments.ensemble import SAMPLES_TABLE, TABLE, ensemble_run

    device = default_device(args.device)
    config = config_from_args(args, device)
    archive = open_run(args)
    print(f"ensemble on {archive.run_id} ({device}, {args.dtype})", file=sys.stderr)
    table, samples = ensemble_run(
        archive, config, device=device, dtype=getattr(torch, args.dtype), model_dir=args.model_dir,
        command=command(args, "ensemble"),
        progress=lambda it: tqdm(list(it), desc=archive.run_id, unit="call", leave=False))
    base = table[table["method"] == "none"]["accuracy"]
    best = table.sort_values("accuracy", ascending=False, kind="stable").iloc[0]
    print(json.dumps({"run": str(archive.path), "written": {TABLE: len(table), SAMPLES_TABLE: len(samples)},
                      "task": str(table["task"].iloc[0]), "steps": int(table["num_inference_steps"].iloc[0]),
                      "n_instances": int(table["n_instances"].max()),
                      "baseline_accuracy": float(base.iloc[0]) if len(base) else None,
                      "best": {"method": str(best["method"]), "k": int(best["k"]), "n": int(best["n"]),
                               "accuracy": float(best["accuracy"])}}))
    return 0
