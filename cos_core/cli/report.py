"""`cos report`: regenerate docs/findings.md from archived tables (`tables/<run>.<table>.parquet`, the model card's
eval.json, the shipped runs), or with --check say whether the document and the tables agree (exit 1 and the diff
when they do not). Owns argument parsing and printing; the document is `cos_core.analysis.findings.render`.
Never imports torch or streamlit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..analysis.findings import CARD, DOC, TABLES

    p.add_argument("--tables", type=Path, default=TABLES, help=f"folder of <run>.<table>.parquet (default {TABLES})")
    p.add_argument("--card", type=Path, default=CARD, help="the organism's eval.json (default: the shipped one)")
    p.add_argument("--out", type=Path, default=DOC, help=f"the document (default {DOC})")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if --out differs from the tables")


def run(args: argparse.Namespace) -> int:
    from ..analysis.findings import check, load, render
    from ..archive.writer import atomic_write

    src = load(args.tables, args.card)
    if args.check:
        diff = check(args.out, src)
        if diff:
            print("\n".join(diff[:200]), file=sys.stderr)
            print(f"{args.out} disagrees with the tables: regenerate it with `python scripts/findings.py`",
                  file=sys.stderr)
            return 1
        print(f"{args.out} agrees with the {len(src.tables)} tables in {args.tables}")
        return 0
    text = render(src)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    print(f"wrote {args.out} from {len(src.tables)} tables")
    return 0
