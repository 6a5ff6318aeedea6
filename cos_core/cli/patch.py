"""`cos patch`: activation patching between two runs of an organism task run at (step, layer, token region), seed
→ seed of one instance or instance → instance, beside its nulls (self-patch, a random update of the same norm, a
donor with the same answer); writes ``derived/patching`` and ``derived/patching_samples``.

Owns argument parsing, loading the replay, the progress bar and the printed one-line JSON summary; the measurement
is `cos_core.experiments.patching.run_patching`. Every table is computed before any is written; never streamlit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .common import (add_execution, add_instances, add_runs_dir, command, default_device, instances, int_list,
                     open_run, split, workers)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..experiments.patching import CARRIES, NULLS, PAIRS

    p.add_argument("run", help="an organism task run: a directory, or a run id under --runs-dir")
    add_runs_dir(p)
    p.add_argument("--pairs", default="seed", choices=PAIRS,
                   help="donor = another noise seed of the same instance (default), or another instance (adoption "
                        "only where the task's answer means the same across instances: recall, dispatch)")
    p.add_argument("--layers", default="", help="blocks patched, comma list (default: all)")
    p.add_argument("--steps", default="0", help="steps patched, comma list (default 0)")
    p.add_argument("--frames", default="", help="patch only the tokens of these latent frames (default: all tokens)")
    p.add_argument("--nulls", default=",".join(NULLS), help=f"comma list of {', '.join(NULLS)} (default all)")
    p.add_argument("--carry", default="update", choices=CARRIES,
                   help="add the donor's block update (output - input) in place of the recipient's (default), or "
                        "copy its whole output")
    add_instances(p)
    p.add_argument("--seed-base", type=int, default=0, help="seeds the random-update null")
    add_execution(p, batch_size=32)


def config_from_args(args: argparse.Namespace, device: str):
    from ..experiments.patching import PatchConfig

    return PatchConfig(pairs=args.pairs, layers=int_list(args.layers, "--layers") or None,
                       steps=int_list(args.steps, "--steps"), frames=int_list(args.frames, "--frames"),
                       nulls=split(args.nulls), carry=args.carry, seed_base=args.seed_base,
                       batch_size=args.batch_size,
                       workers=workers(args, device))


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..analysis.publish import publish
    from ..experiments.interventions import with_instances
    from ..experiments.patching import run_patching
    from ..experiments.replay import load_replay

    device = default_device(args.device)
    config = config_from_args(args, device)
    n_instances, first = instances(args)
    archive = open_run(args)
    replay = load_replay(archive, device=device, dtype=getattr(torch, args.dtype), model_dir=args.model_dir)
    if n_instances is not None:
        replay = with_instances(replay, first, n_instances)
    print(f"patching {archive.run_id} ({len(replay.items)} samples, {config.pairs} pairs, {device})", file=sys.stderr)
    start = time.perf_counter()
    tables = run_patching(replay, config, progress=lambda it: tqdm(list(it), desc=archive.run_id, unit="batch",
                                                                   leave=False))
    seconds = round(time.perf_counter() - start, 3)
    extra = {"command": command(args, "patch"), "device": device, "dtype": args.dtype, "seconds": seconds}
    for table in tables.values():
        table.attrs["cos_config"] = json.dumps({**json.loads(table.attrs["cos_config"]), **extra}, sort_keys=True)
    publish(archive, tables, producer="cos patch")
    summary = tables["patching"]
    significant = summary[summary["significant"] & (summary["null"] != "self")]
    print(json.dumps({"run": str(archive.path), "written": {name: len(t) for name, t in tables.items()},
                      "significant": len(significant), "seconds": seconds, "device": device}))
    return 0
