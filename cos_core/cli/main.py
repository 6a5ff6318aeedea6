"""The `cos` command: `cos capture | train | analyze | intervene | patch | ensemble | search | steps | report`, one
module of this package each.

Owns only dispatch and error reporting: a ValueError from the library (bad input, a damaged archive) and an OSError
(a full disk, a read-only folder, a file where a folder belongs) become one line naming the file and the fix, exit
code 2, never a traceback (the library leaves finished work in place). A subcommand module has `add_arguments(parser)`
and `run(args) -> int`, imported when the parser is built, library imports inside `run`. Only `cli` imports this.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

# subcommand -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS = {
    "capture": ("cos_core.cli.capture", "run a video diffusion pipeline with capture on and write an archive"),
    "train": ("cos_core.cli.train", "train the small Wan-architecture organism on the reasoning tasks"),
    "analyze": ("cos_core.cli.analyze", "compute probe grids, step dynamics and memory tables into derived/"),
    "intervene": ("cos_core.cli.intervene", "re-run an organism run with noise at a step/frame or a layer swapped; "
                  "write intervention and CKA propagation tables into derived/"),
    "patch": ("cos_core.cli.patch", "patch one block's activations from another run (seed -> seed, instance -> "
              "instance) beside a self-patch, a random update and a same-answer donor; write derived/patching"),
    "ensemble": ("cos_core.cli.ensemble", "merge n seeds' latents during the first K steps and score the result "
                 "against single seeds and the noise-mean control; write derived/ensemble"),
    "search": ("cos_core.cli.search", "test-time scaling at equal forward passes: majority vote, early-planning "
               "search, latent ensembles and more steps; write derived/search"),
    "steps": ("cos_core.cli.steps", "the organism's accuracy vs number of sampling steps per task, as a table"),
    "report": ("cos_core.cli.report", "regenerate docs/findings.md from archived tables (--check: fail when they "
               "disagree)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cos", description="cos-lab: watch video diffusion models reason along "
                                     "their denoising steps (Chain-of-Steps).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # the exact command, recorded in manifests
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except ValueError as err:  # bad input: say what is wrong, no traceback
        print(f"cos {args.command}: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine said no: name the file and what to do
        print(f"cos {args.command}: error: {_one_line(os_problem(err))}", file=sys.stderr)
        return 2


# errno -> what to do about it
FIXES = {errno.ENOSPC: "the disk is full: free space (or choose another --runs-dir) and rerun the same command; "
                       "finished work is kept and resumed",
         errno.EDQUOT: "the disk quota is exceeded: free space and rerun the same command; finished work is kept",
         errno.EROFS: "the file system is read-only: choose a writable --runs-dir, or work on a writable copy of the "
                      "run",
         errno.EACCES: "permission denied: choose a folder you can write (--runs-dir) or fix its permissions",
         errno.EPERM: "not permitted: choose a folder you own (--runs-dir) or fix its permissions",
         errno.ENOTDIR: "a file stands where a folder belongs: move it away",
         errno.EISDIR: "a folder stands where a file belongs: move it away",
         errno.EEXIST: "it already exists: move it away or choose another name",
         errno.ENOENT: "no such file or folder: check the path"}


def os_problem(err: OSError) -> str:
    """`<file>: <what the system said> (<what to do>)`."""
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror or err}" + (f" ({FIXES[err.errno]})" if err.errno in FIXES else "")


def _one_line(text: str) -> str:
    return " ".join(text.split())
