"""Where every derived table cos-lab computes is written into a run: the one place to change how `derived/` is
published.

Owns `publish` (a set of tables computed together goes into the run's ``derived/`` only after all of them were
computed; each replaces the table of its name, carrying its `cos_config` metadata). `cos analyze`, `cos intervene`,
`cos ensemble`, `cos search` and `cos patch` all write through it. Imports the archive only; never torch.
"""

from __future__ import annotations

from typing import Mapping

import pandas as pd

from ..archive import Archive


def publish(archive: Archive, tables: Mapping[str, pd.DataFrame]) -> None:
    """Write `tables` ({name: table}) into `archive`'s ``derived/``, one atomic file each (the archive's writer)."""
    for name, table in tables.items():
        archive.write_derived(name, table)
