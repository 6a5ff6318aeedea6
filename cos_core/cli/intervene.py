"""`cos intervene`: noise probes (off and on the data distribution), the commitment curve, the propagation of a
perturbation and the layer swap on an organism run, into its ``derived/``.

Owns argument parsing, loading the replay (the archive's own samples or held-out instances), progress bars and the
printed one-line JSON summary. The measurements are `cos_core.experiments.interventions.run_interventions`; the
library only logs. Every table is computed before any is written, so an error leaves ``derived/`` as it was.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .common import (add_execution, add_instances, add_runs_dir, command, default_device, float_list, instances,
                     int_list, open_run, split, workers)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..experiments.interventions import KINDS

    p.add_argument("run", help="run directory, or run id under --runs-dir (an organism task run)")
    add_runs_dir(p)
    p.add_argument("--which", default="", help=f"comma list of {', '.join(KINDS)} (default: all)")
    what = p.add_argument_group("positions (comma lists; default: every one the run has)")
    what.add_argument("--steps", default="", help="positions of noise_step / renoise_step and the propagation inject "
                      "steps, e.g. '0,4,8'")
    what.add_argument("--frames", default="", help="positions of noise_frame / renoise_frame (latent frames)")
    what.add_argument("--layers", default="", help="blocks whose output is swapped")
    what.add_argument("--swap-step", default="0", help="step(s) at which block outputs are swapped (default 0)")
    what.add_argument("--swap", default="update", choices=["update", "output"],
                      help="carry block L's residual update (output - input) from scene B into A (default), or its "
                           "whole output (then every later block computes B's prediction, whatever L)")
    how = p.add_argument_group("noise")
    how.add_argument("--strengths", default="1",
                     help="comma list of λ for every noise kind (default 1): noise_* mix x <- (1-λ)·x + λ·ε (off the "
                          "data distribution); renoise_* keep x̂0 and redraw a fraction λ of the noise at the step's "
                          "σ (on it; renoise_step at λ = 1 is the commitment curve), e.g. '0.1,0.25,0.5,1'")
    how.add_argument("--propagation-strength", type=float, default=0.5,
                     help="λ of the renoise perturbation whose propagation is measured (default 0.5)")
    how.add_argument("--seed-base", type=int, default=0, help="seeds the noise ε (per sample and kind)")
    add_instances(p.add_argument_group("samples"))
    add_execution(p.add_argument_group("execution"), batch_size=32)


def _ints(text: str, flag: str) -> tuple[int, ...] | None:
    return int_list(text, flag) or None


def _config(args: argparse.Namespace, device: str):
    from ..experiments.interventions import KINDS, InterventionConfig

    which = split(args.which) or KINDS
    swap = _ints(args.swap_step, "--swap-step")
    if swap is None:
        raise ValueError("--swap-step must name at least one step, e.g. '0'")
    return InterventionConfig(which=which, steps=_ints(args.steps, "--steps"), frames=_ints(args.frames, "--frames"),
                              layers=_ints(args.layers, "--layers"), swap_steps=swap, swap=args.swap,
                              strengths=float_list(args.strengths, "--strengths"),
                              propagation_strength=args.propagation_strength, seed_base=args.seed_base,
                              batch_size=args.batch_size,
                              workers=workers(args, device))


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..analysis.publish import publish
    from ..experiments.interventions import run_interventions, with_instances
    from ..experiments.replay import load_replay

    device = default_device(args.device)
    config = _config(args, device)  # bad flags fail before any weights are loaded
    n_instances, first = instances(args)
    archive = open_run(args)
    replay = load_replay(archive, device=device, dtype=getattr(torch, args.dtype), model_dir=args.model_dir)
    if n_instances is not None:
        replay = with_instances(replay, first, n_instances)
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
    publish(archive, tables, producer="cos intervene")  # all computed: now publish, as one set
    summary = {"run": str(archive.path), "written": {name: len(t) for name, t in tables.items()},
               "seconds": round(seconds, 1), "device": device}
    if "interventions" in tables:
        summary["baseline"] = float(tables["interventions"]["baseline"].iloc[0])
    print(json.dumps(summary))
    return 0
