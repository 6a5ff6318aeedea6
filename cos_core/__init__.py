"""cos-lab: capture, archive and analyse how video diffusion models reason along their denoising steps.

Importing the package is cheap and needs neither torch nor diffusers: the archive reader, analyses and plots are
numpy/pandas only. Capture (`cos_core.capture`), the organism and training import torch/diffusers lazily.
"""

__version__ = "0.1.0"
