"""`cos search`: test-time scaling at equal compute on an organism task run — majority vote of n samples, the
early-planning search (keep the seed whose early x̂0 agrees with most others), latent ensembles, the noise-mean
control and the plain model at other step counts, each with the forward passes it spends; ``derived/search*``.

Owns argument parsing, the progress bar and the printed one-line JSON summary; the measurement is
`cos_core.experiments.search.run_search`. Every table is computed before any is written; never streamlit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .common import (add_execution, add_instances, add_noise, add_runs_dir, command, default_device, instances,
                     int_list, open_run, split, workers)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..experiments.ensemble import METHODS

    p.add_argument("run", help="an organism task run: a directory, or a run id under --runs-dir")
    add_runs_dir(p)
    p.add_argument("--n", default="1,2,4,8", help="samples (seeds) per instance, comma list (default 1,2,4,8)")
    p.add_argument("--prune-steps", default="1,2,4",
                   help="k: steps every seed runs before the early search keeps one (default 1,2,4)")
    p.add_argument("--merges", default=",".join(METHODS),
                   help=f"latent ensembles and the control to add, comma list of {', '.join(METHODS)} (default all; "
                        "'' for none)")
    p.add_argument("--k", default="1,2,4", help="steps merged by the ensembles, comma list (default 1,2,4)")
    p.add_argument("--step-counts", default="",
                   help="also sample the plain model with these numbers of steps, e.g. '1,2,4,8' (default none)")
    p.add_argument("--steps", type=int, default=None, help="S, the sampling steps of every method (default: the run's)")
    add_instances(p, default="the run's own instances")
    p.add_argument("--seed-base", type=int, default=0, help="member m draws noise seed SEED_BASE + m (default 0)")
    add_noise(p)
    add_execution(p, batch_size=128)


def config_from_args(args: argparse.Namespace, device: str):
    from ..experiments.search import SearchConfig

    n_instances, first = instances(args)
    ns = int_list(args.n, "--n")
    if not ns:
        raise ValueError("--n must name at least one sample count, e.g. '1,4'")
    return SearchConfig(ns=ns, prune_steps=int_list(args.prune_steps, "--prune-steps"), merges=split(args.merges),
                        ks=int_list(args.k, "--k"), step_counts=int_list(args.step_counts, "--step-counts"),
                        steps=args.steps, instances=n_instances, first_instance=first, seed_base=args.seed_base,
                        noise=args.noise.replace("-", "_"), batch_size=args.batch_size, workers=workers(args, device))


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..analysis.publish import publish
    from ..experiments.replay import load_replay
    from ..experiments.search import SAMPLES_TABLE, TABLE, config_json, run_search

    device = default_device(args.device)
    config = config_from_args(args, device)
    archive = open_run(args)
    replay = load_replay(archive, device=device, dtype=getattr(torch, args.dtype), model_dir=args.model_dir)
    steps = int(config.steps or replay.n_steps)
    config.check(steps)
    print(f"search on {archive.run_id} ({device}, {steps} steps)", file=sys.stderr)
    start = time.perf_counter()
    table, samples = run_search(replay, config, progress=lambda it: tqdm(list(it), desc=archive.run_id,
                                                                          unit="call", leave=False))
    seconds = round(time.perf_counter() - start, 3)
    extra = {"command": command(args, "search"), "device": device, "dtype": args.dtype, "seconds": seconds}
    for name, frame in ((TABLE, table), (SAMPLES_TABLE, samples)):
        frame.attrs["cos_config"] = config_json(config, replay, steps, table=name, **extra)
    publish(archive, {TABLE: table, SAMPLES_TABLE: samples}, producer="cos search")
    single = table[table["method"] == "single"]["accuracy"]
    print(json.dumps({"run": str(archive.path), "written": {TABLE: len(table), SAMPLES_TABLE: len(samples)},
                      "task": replay.task.name, "steps": steps, "n_instances": int(table["n_instances"].max()),
                      "single_accuracy": float(single.iloc[0]) if len(single) else None, "seconds": seconds}))
    return 0
