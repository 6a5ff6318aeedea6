"""Capture: run a diffusers video pipeline with hooks on and record every step's x_t, v̂, x̂0 and every block's
reduced hidden states into an archive. `from cos_core.capture import Capturer, CaptureSpec` is the public entry.

Modules: `hooks` (the one patch primitive), `capturer` (what is recorded), `run` (the loop over work items),
`families`, `reductions`, `selection`, `sources` (models and work items), `distributed` / `context_parallel`,
`tiny_pipelines`, `vbvr`. Imports torch and diffusers; never analysis, experiments, plots or streamlit.
"""

from .capturer import SITE, Capturer, CaptureSpec

__all__ = ["SITE", "Capturer", "CaptureSpec"]
