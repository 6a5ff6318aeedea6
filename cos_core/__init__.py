"""cos-lab: capture, archive and analyse how video diffusion models reason along their denoising steps.

Packages, in the order data flows (docs/architecture.md): tasks, organism -> capture -> archive -> analysis,
experiments -> frames, plots; cli on top. Importing this package is cheap and imports none of them: archive,
analysis, frames and plots need numpy/pandas only; capture, experiments and the organism import torch/diffusers.
"""

__version__ = "0.1.0"
