"""Where every derived table cos-lab computes is written into a run: the one place that decides how `derived/` is
published.

Owns `publish`: a set of tables computed together goes into the run's ``derived/`` as one new set (the archive's
`publish_derived`: readers see the old set or the new one), each table carrying its `cos_config` metadata. `cos
analyze`, `cos intervene`, `cos patch`, `cos ensemble` and `cos search` all write through it. Never imports torch.
"""

from __future__ import annotations

from typing import Mapping

import pandas as pd

from ..archive import Archive, publish_derived


def publish(archive: Archive, tables: Mapping[str, pd.DataFrame], *, producer: str) -> None:
    """Publish `tables` ({name: table}) into `archive`'s ``derived/`` as one set; `producer` is the command that
    made them (e.g. 'cos intervene'). Nothing to publish is no change."""
    if tables:
        publish_derived(archive, tables, producer=producer)
