"""`cos analyze`: fill an archive's ``derived/`` tables (probe grid, convergence, dynamics, memory) from the CLI.

Owns argument parsing, finding runs (paths, ids under --runs-dir, or --all), progress bars and the printed summary
(one JSON line per run). The analyses themselves are `cos_core.analysis.analyze_run`; the library only logs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_runs_dir, command, int_list, run_dir, split


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..analysis.analyze import ANALYSES
    from ..analysis.probes import ENGINES, KINDS

    p.add_argument("runs", nargs="*", help="run directories, or run ids under --runs-dir")
    add_runs_dir(p)
    p.add_argument("--all", action="store_true", help="analyse every complete run under --runs-dir")
    p.add_argument("--which", default="", help=f"comma list of {', '.join(ANALYSES)} (default: all that apply)")
    feat = p.add_argument_group("probe features")
    feat.add_argument("--site", default="block_out", help="captured site (default block_out)")
    feat.add_argument("--reduction", default="frame_mean", help="captured reduction (default frame_mean)")
    feat.add_argument("--branches", default="", help="CFG branches to probe, comma list (default: all captured)")
    feat.add_argument("--frames", default="", help="latent frames of the reduction to use, e.g. '0,3' (default all)")
    feat.add_argument("--pool", default="flatten", choices=["flatten", "mean"],
                      help="flatten the selected frames into one vector, or average them")
    feat.add_argument("--labels", default="", help="labels to probe, comma list (default: every label_* column)")
    probe = p.add_argument_group("probes")
    probe.add_argument("--kind", default="logistic", choices=KINDS, help="probe objective (default logistic)")
    probe.add_argument("--alpha", type=float, default=0.1, help="L2 strength on the mean loss (default 0.1)")
    probe.add_argument("--folds", type=int, default=5, help="cross-validation folds, grouped by instance")
    probe.add_argument("--engine", default="auto", choices=ENGINES, help="auto: torch if installed, else sklearn")
    probe.add_argument("--device", default=None, help="torch device for the torch engine (default cuda if any)")
    probe.add_argument("--max-iter", type=int, default=300, help="logistic iterations at most (default 300)")
    probe.add_argument("--no-control", action="store_true", help="skip the control tasks (no selectivity)")
    dyn = p.add_argument_group("dynamics")
    dyn.add_argument("--persist", type=int, default=2, help="steps an event's new state must hold (default 2)")
    dyn.add_argument("--min-gain", type=float, default=0.1, help="score rise that counts as enhancement")


def _config(args: argparse.Namespace):
    from ..analysis.analyze import AnalyzeConfig
    from ..analysis.dynamics import DynamicsConfig
    from ..analysis.features import FeatureSpec

    frames = int_list(args.frames, "--frames", "frame indices") or None
    probe = {"kind": args.kind, "alpha": args.alpha, "n_folds": args.folds, "engine": args.engine,
             "device": args.device, "max_iter": args.max_iter, "control": not args.no_control}
    return AnalyzeConfig(features=FeatureSpec(site=args.site, reduction=args.reduction, frames=frames, pool=args.pool),
                         branches=split(args.branches) or None, labels=split(args.labels) or None, probe=probe,
                         dynamics=DynamicsConfig(persist=args.persist, min_gain=args.min_gain))


def _runs(args: argparse.Namespace) -> list[Path]:
    from ..archive import list_runs

    if args.all:
        good, bad = list_runs(args.runs_dir)
        for name, err in bad.items():
            print(f"cos analyze: skipping {name}: {err}", file=sys.stderr)
        if not good:
            raise ValueError(f"no complete runs under {args.runs_dir}")
        return [a.path for a in good]
    if not args.runs:
        raise ValueError("name at least one run (a directory or a run id under --runs-dir), or pass --all")
    return [run_dir(run, args.runs_dir) for run in args.runs]


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..analysis.analyze import analyze_run
    from ..archive import Archive

    config = _config(args)
    which = split(args.which) or None
    for path in _runs(args):
        archive = Archive.open(path)
        print(f"analysing {archive.run_id} ({archive.n_samples} samples)", file=sys.stderr)
        tables, skipped = analyze_run(archive, which, config, command=command(args, "analyze"),
                                      progress=lambda it: tqdm(list(it), desc=archive.run_id, unit="sample",
                                                               leave=False))
        print(json.dumps({"run": str(archive.path), "written": {name: len(t) for name, t in tables.items()},
                          "skipped": skipped}))
    return 0
