"""The run archive: the schema (`schema`), the lazy reader (`reader`) and its checks (`manifest`, `tables`, `shards`),
safe file access (`files`), the atomic, resumable writer (`writer`), the derived-table set (`derived`), labels
(`labels`) and runs directories (`runs`). `from cos_core.archive import Archive, ArchiveError, publish_derived`.

Imports numpy, pandas and safetensors only: never torch, diffusers or streamlit, and nothing from cos_core outside
this package, so every other layer can read and write archives.
"""

from .derived import publish_derived
from .reader import Archive
from .runs import list_runs
from .schema import ArchiveError

__all__ = ["Archive", "ArchiveError", "list_runs", "publish_derived"]
