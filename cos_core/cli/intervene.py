"""`cos intervene`: noise probes, layer swap and the propagation map on an organism run, into its ``derived/``.

Owns argument parsing, loading the replay (the archive's own samples or held-out instances), progress bars and the
printed one-line JSON summary. The measurements are `cos_core.experiments.interventions.run_interventions`; the
library only logs. Every table is computed before any is written, so an error leaves ``derived/`` as it was.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .common import (add_device, add_dtype, add_model_dir, add_runs_dir, command, default_device, int_list, open_run,
                     split)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..experiments.interventions import KINDS

    p.add_argument("run", help="run directory, or run id under --runs-dir (an organism task run)")
    add_runs_dir(p)
    p.add_argument("--which", default="", help=f"comma list of {', '.join(KINDS)} (default: all)")
    what = p.add_argument_group("positions (comma lists; default: every one the run has)")
    what.add_argument("--steps", default="", help="noise_step positions and propagation inject steps, e.g. '0,4,8'")
    what.add_argument("--frames", default="", help="noise_frame positions (latent frames)")
    what.add_argument("--layers", default="", help="blocks whose output is swapped")
    what.add_argument("--swap-step", default="0", help="step(s) at which block outputs are swapped (default 0)")
    what.add_argument("--swap", default="update", choices=["update", "output"],
                      help="carry block L's residual update (output - input) from scene B into A (default), or its "
                           "whole output (then every later block computes B's prediction, whatever L)")
    how = p.add_argument_group("noise")
    how.add_argument("--strength", type=float, default=1.0,
                     help="λ in x <- (1-λ)·x + λ·ε for the noise probes (default 1: pure noise)")
    how.add_argument("--propagation-strength", type=float, default=0.5,
                     help="λ of the perturbation whose propagation is mapped (default 0.5)")
    how.add_argument("--seed-base", type=int, default=0, help="seeds the noise ε (per sample and kind)")
    which = p.add_argument_group("samples")
    which.add_argument("--instances", type=int, default=None,
                       help="use held-out task instances TEST_SEEDS[F:F+N] (with the run's noise seeds) instead of "
                            "the run's own samples")
    which.add_argument("--first-instance", type=int, default=None, help="F above (default 0)")
    run_ = p.add_argument_group("execution")
    add_device(run_)
    add_dtype(run_)
    run_.add_argument("--batch-size", type=int, default=32, help="samples per pipeline call at most (default 32)")
    add_model_dir(run_)


def _ints(text: str, flag: str) -> tuple[int, ...] | None:
    return int_list(text, flag) or None


def _config(args: argparse.Namespace):
    from ..experiments.interventions import KINDS, InterventionConfig

    which = split(args.which) or KINDS
    swap = _ints(args.swap_step, "--swap-step")
    if swap is None:
        raise ValueError("--swap-step must name at least one step, e.g. '0'")
    return InterventionConfig(which=which, steps=_ints(args.steps, "--steps"), frames=_ints(args.frames, "--frames"),
                              layers=_ints(args.layers, "--layers"), swap_steps=swap, swap=args.swap,
                              strength=args.strength,
                              propagation_strength=args.propagation_strength, seed_base=args.seed_base,
                              batch_size=args.batch_size)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..archive import publish_derived
    from ..experiments.interventions import run_interventions, with_instances
    from ..experiments.replay import load_replay

    config = _config(args)  # bad flags fail before any weights are loaded
    if args.first_instance is not None and args.instances is None:
        raise ValueError("--first-instance needs --instances N (how many held-out instances to use)")
    archive = open_run(args)
    device = default_device(args.device)
    replay = load_replay(archive, device=device, dtype=getattr(torch, args.dtype), model_dir=args.model_dir)
    if args.instances is not None:
        replay = with_instances(replay, args.first_instance or 0, args.instances)
    print(f"intervening on {archive.run_id} ({len(replay.items)} samples, {replay.n_steps} steps, {device})",
          file=sys.stderr)
    start = time.perf_counter()
    tables = run_interventions(replay, config, progress=lambda it: tqdm(list(it), desc=archive.run_id, unit="batch",
                                                                      leave=False))
    seconds = time.perf_counter() - start
    extra = {"command": command(args, "intervene"), "device": device, "dtype": args.dtype,
             "seconds": round(seconds, 3)}
    for table in tables.values():
        table.attrs["cos_config"] = json.dumps({**json.loads(table.attrs["cos_config"]), **extra}, sort_keys=True)
    publish_derived(archive, tables, producer="cos intervene")  # all computed: now publish, as one set
    summary = {"run": str(archive.path), "written": {name: len(t) for name, t in tables.items()},
               "seconds": round(seconds, 1), "device": device}
    if "interventions" in tables:
        summary["baseline"] = float(tables["interventions"]["baseline"].iloc[0])
    print(json.dumps(summary))
    return 0
