#!/usr/bin/env python3
"""Regenerate docs/findings.md from the archived tables (`tables/`, the model card, the shipped runs), or check it.

    python scripts/findings.py            # rewrite docs/findings.md
    python scripts/findings.py --check    # exit 1 (and print the diff) when the document and the tables disagree

The same as `cos report [--check]`; see cos_core/analysis/findings.py for what each section reads.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cos_core.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
