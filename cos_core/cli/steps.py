"""`cos steps`: the organism's exact accuracy vs number of sampling steps per task (which tasks are in the
Chain-of-Steps regime), measured on held-out instances or read from a model card's eval.json, as one parquet table.

Owns argument parsing, writing the table (atomically, with its command in the `cos_config` metadata) and the
printed one-line JSON summary; the measurement is `cos_core.experiments.steps.measure_steps` (torch only when it
samples). Never imports streamlit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_device, add_dtype, add_model_dir, command, default_device, int_list, split


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="parquet file to write (replaced atomically)")
    p.add_argument("--from-card", type=Path, default=None,
                   help="tabulate the accuracy_vs_steps record of this eval.json (the model card's) instead of "
                        "sampling")
    p.add_argument("--tasks", default="", help="comma list of trained tasks (default: every trained task)")
    p.add_argument("--instances", type=int, default=100, help="held-out instances per task (default 100)")
    p.add_argument("--first-instance", type=int, default=0, help="first held-out instance (default 0)")
    p.add_argument("--step-counts", default="1,2,4,8,16,32", help="numbers of sampling steps (default 1,2,4,8,16,32)")
    p.add_argument("--batch-size", type=int, default=200, help="videos per pipeline call (default 200)")
    add_device(p)
    add_dtype(p)
    add_model_dir(p)


def _from_card(path: Path):
    from ..analysis.steps import steps_table

    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"--from-card {path}: cannot read it as JSON ({err})") from None
    if "accuracy_vs_steps" not in record:
        raise ValueError(f"--from-card {path} has no accuracy_vs_steps record (evaluate the organism with `cos train` "
                         "or measure with `cos steps` without --from-card)")
    return steps_table(record["accuracy_vs_steps"], record.get("answer_is_unique"))


def run(args: argparse.Namespace) -> int:
    from .. import __version__
    from ..archive.writer import atomic_write

    if args.from_card is not None:
        table = _from_card(args.from_card)
        source = {"from_card": str(args.from_card)}
    else:
        import torch

        from ..capture.sources import ORGANISM_DIR
        from ..experiments.steps import measure_steps
        from ..organism.pipeline import OrganismPipeline

        device = default_device(args.device)
        model_dir = Path(args.model_dir or ORGANISM_DIR)
        pipe = OrganismPipeline.from_pretrained(str(model_dir)).to(device=device, dtype=getattr(torch, args.dtype))
        tasks = split(args.tasks) or tuple(pipe.config.trained_tasks)
        print(f"accuracy vs steps: {', '.join(tasks)} x {args.instances} instances on {device}", file=sys.stderr)
        table = measure_steps(pipe, tasks, args.instances, args.first_instance,
                              int_list(args.step_counts, "--step-counts"), args.batch_size)
        source = {"model_dir": str(model_dir), "device": device, "dtype": args.dtype}
    table.attrs["cos_config"] = json.dumps({"cos_version": __version__, "table": "accuracy_vs_steps",
                                            "command": command(args, "steps"), **source}, sort_keys=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: table.to_parquet(tmp, index=False))
    whole = table[table["difficulty"] == "all"]
    print(json.dumps({"out": str(args.out), "rows": len(table),
                      "accuracy": {f"{r.task}@{r.n_steps}": round(float(r.accuracy), 4) for r in whole.itertuples()}}))
    return 0
