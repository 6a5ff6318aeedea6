"""The model organism: a small Wan-architecture video DiT trained on cos_core.tasks, its pipeline and training.

`presets` is plain Python (the CLI reads it without torch); the pipeline, training and evaluation import torch and
diffusers, so they load lazily on first attribute access.
"""

from .presets import PRESETS

__all__ = ["PRESETS", "OrganismPipeline", "build_pipeline"]


def __getattr__(name: str):
    if name in ("OrganismPipeline", "build_pipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
