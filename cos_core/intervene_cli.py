"""`cos intervene`: noise probes, layer swap and the propagation map on an organism run, into its ``derived/``.

Owns argument parsing, loading the replay (the archive's own samples or held-out instances), progress bars and the
printed one-line JSON summary. The measurements are `cos_core.interventions.run_interventions`; the library only
logs. Every table is computed before any is written, so an error leaves ``derived/`` as it was.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .capture_cli import DEFAULT_RUNS_DIR

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .experiments.interventions import KINDS

    p.add_argument("run", help="run directory, or run id under --runs-dir (an organism task run)")
    p.add_argument("--runs-dir", type=Path, default=Path(DEFAULT_RUNS_DIR), help=f"default {DEFAULT_RUNS_DIR}")
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
    run_.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    run_.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype (default float32)")
    run_.add_argument("--batch-size", type=int, default=32, help="samples per pipeline call at most (default 32)")
    run_.add_argument("--model-dir", type=Path, default=None, help="organism weights (default the shipped ones)")


def _ints(text: str, flag: str) -> tuple[int, ...] | None:
    parts = [x.strip() for x in str(text).split(",") if x.strip()]
    try:
        values = tuple(int(x) for x in parts)
    except ValueError:
        raise ValueError(f"{flag} {text!r} must be a comma list of integers, e.g. '0,3'") from None
    return values or None


def _config(args: argparse.Namespace):
    from .experiments.interventions import KINDS, InterventionConfig

    which = tuple(x.strip() for x in args.which.split(",") if x.strip()) or KINDS
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

    from .archive import Archive
    from .experiments.interventions import run_interventions, with_instances
    from .experiments.replay import load_replay

    config = _config(args)  # bad flags fail before any weights are loaded
    if args.first_instance is not None and args.instances is None:
        raise ValueError("--first-instance needs --instances N (how many held-out instances to use)")
    path = Path(args.run)
    archive = Archive.open(path if path.is_dir() else args.runs_dir / args.run)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    replay = load_replay(archive, device=device, dtype=getattr(torch, args.dtype), model_dir=args.model_dir)
    if args.instances is not None:
        replay = with_instances(replay, args.first_instance or 0, args.instances)
    print(f"intervening on {archive.run_id} ({len(replay.items)} samples, {replay.n_steps} steps, {device})",
          file=sys.stderr)
    start = time.perf_counter()
    tables = run_interventions(replay, config, progress=lambda it: tqdm(list(it), desc=archive.run_id, unit="batch",
                                                                      leave=False))
    seconds = time.perf_counter() - start
    extra = {"command": ["cos", *getattr(args, "_argv", sys.argv[1:])], "device": device, "dtype": args.dtype,
             "seconds": round(seconds, 3)}
    for table in tables.values():
        table.attrs["cos_config"] = json.dumps({**json.loads(table.attrs["cos_config"]), **extra}, sort_keys=True)
    for name, table in tables.items():  # all computed: now write
        archive.write_derived(name, table)
    summary = {"run": str(archive.path), "written": {name: len(t) for name, t in tables.items()},
               "seconds": round(seconds, 1), "device": device}
    if "interventions" in tables:
        summary["baseline"] = float(tables["interventions"]["baseline"].iloc[0])
    print(json.dumps(summary))
    return 0
