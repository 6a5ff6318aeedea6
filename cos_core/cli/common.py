"""What the `cos` subcommands share: the runs-directory flag and how a run argument is found, comma lists, integer
lists and seed ranges, the torch device default, model dtypes and the command line a run or table records.

Owns only these parsing helpers. Imports argparse (the `cli` package is the only place in cos_core that does) and
the archive; torch only inside `default_device`, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..archive import Archive
from ..archive.runs import DEFAULT_RUNS_DIR

DTYPES = ("float32", "bfloat16", "float16")
Flags = Any  # an ArgumentParser or one of its argument groups


# ---- flags several commands take ---------------------------------------------------------------------------------
def add_runs_dir(p: Flags) -> None:
    p.add_argument("--runs-dir", type=Path, default=Path(DEFAULT_RUNS_DIR),
                   help=f"where runs live (default {DEFAULT_RUNS_DIR})")


def add_device(p: Flags) -> None:
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")


def add_dtype(p: Flags, help: str = "model dtype (default float32)") -> None:
    p.add_argument("--dtype", default="float32", choices=DTYPES, help=help)


def add_model_dir(p: Flags) -> None:
    p.add_argument("--model-dir", type=Path, default=None, help="organism weights (default models/organism)")


def add_instances(p: Flags, default: str = "the run's own samples") -> None:
    """--instances / --first-instance: held-out task instances instead of the run's own (check with `instances`)."""
    p.add_argument("--instances", type=int, default=None,
                   help=f"held-out task instances TEST_SEEDS[F:F+N] with the run's noise seeds (default: {default})")
    p.add_argument("--first-instance", type=int, default=None, help="F for --instances (default 0)")


def add_noise(p: Flags) -> None:
    """--noise: whether member m's noise seed is shared by every instance (as in `cos capture`'s default)."""
    p.add_argument("--noise", default="shared", choices=["shared", "per-instance"],
                   help="'shared' (default): member m draws noise seed SEED_BASE + m for every instance; "
                        "'per-instance': each instance its own, so intervals over instances also sample the noise")


def add_execution(p: Flags, batch_size: int) -> None:
    """How an experiment runs: device, dtype, videos per call, scoring processes, the organism's weights."""
    add_device(p)
    add_dtype(p)
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"videos per pipeline call at most (default {batch_size})")
    p.add_argument("--workers", type=int, default=None,
                   help="processes that read answers off finished videos while the device makes the next batch "
                        "(default: 0 on the CPU, else up to 8)")
    add_model_dir(p)


def instances(args: argparse.Namespace) -> tuple[int | None, int]:
    """(N, F) of --instances / --first-instance; ValueError for F without N."""
    if args.first_instance is not None and args.instances is None:
        raise ValueError("--first-instance needs --instances N (how many held-out instances to use)")
    return args.instances, args.first_instance or 0


def workers(args: argparse.Namespace, device: str) -> int:
    """--workers, or the default for `device` (`cos_core.experiments.scoring.default_workers`)."""
    from ..experiments.scoring import default_workers

    return default_workers(device) if args.workers is None else int(args.workers)


def float_list(text: str, flag: str) -> tuple[float, ...]:
    """'0.1, 1' -> (0.1, 1.0); ValueError naming the flag otherwise."""
    try:
        return tuple(float(x) for x in split(text))
    except ValueError:
        raise ValueError(f"{flag} {text!r} must be a comma list of numbers, e.g. '0.1,0.5,1'") from None


# ---- turning flag values into library values --------------------------------------------------------------------
def run_dir(run: str, runs_dir: Path) -> Path:
    """A run argument: a run directory, else a run id under `runs_dir`."""
    path = Path(run)
    return path if path.is_dir() else Path(runs_dir) / run


def open_run(args: argparse.Namespace) -> Archive:
    """The archive a command's `run` argument names (see `run_dir`)."""
    return Archive.open(run_dir(args.run, args.runs_dir))


def split(text: str) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c')."""
    return tuple(x.strip() for x in str(text).split(",") if x.strip())


def int_list(text: str, flag: str, what: str = "integers") -> tuple[int, ...]:
    """'0, 3' -> (0, 3); '' -> (); ValueError naming the flag otherwise."""
    try:
        return tuple(int(x) for x in split(text))
    except ValueError:
        raise ValueError(f"{flag} {text!r} must be a comma list of {what}, e.g. '0,3'") from None


def seeds(text: str) -> list[int]:
    """`--seeds`: a comma list of integers and/or ranges 'a:b' (b excluded), in the order given."""
    try:
        out = []
        for part in split(text):
            if ":" in part:
                low, high = (int(v) for v in part.split(":"))
                out.extend(range(low, high))
            else:
                out.append(int(part))
        return out
    except ValueError:
        raise ValueError(f"--seeds {text!r} must be a comma list of integers or ranges 'a:b'") from None


def default_device(requested: str | None, local_rank: int | None = None) -> str:
    """`requested`, else cuda when a GPU is there (cuda:LOCAL_RANK when a rank is given), else cpu."""
    if requested:
        return requested
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return "cuda" if local_rank is None else f"cuda:{local_rank}"


def command(args: argparse.Namespace, name: str) -> list[str]:
    """The command line recorded in manifests and table metadata: `cos` plus the exact arguments `main` parsed
    (when a subcommand's `run` is called directly: its name and this process's arguments)."""
    return ["cos", *getattr(args, "_argv", [name, *sys.argv[1:]])]
