"""Capture: run a diffusers video pipeline with hooks on and record every step's x_t, v̂, x̂0 and every block's
reduced hidden states into an archive. The public entry (docs/capture.md):
`from cos_core.capture import Capturer, CaptureSpec, capture_pipeline`.

Modules: `hooks` (the one patch primitive), `capturer` (what is recorded), `run` (work items in batches → archive),
`batching`, `families`, `reductions`, `selection`, `sources` (models and work items), `distributed` /
`context_parallel`, `tiny_pipelines`, `vbvr`. Imports torch and diffusers; never analysis, experiments, plots or
streamlit.
"""

from .capturer import SITE, Captured, Capturer, CaptureSpec
from .run import WorkItem, capture_pipeline, capture_run

__all__ = ["SITE", "Captured", "Capturer", "CaptureSpec", "WorkItem", "capture_pipeline", "capture_run"]
