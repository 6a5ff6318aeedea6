"""The `cos` command line: `main.py` dispatches to one module per subcommand (capture, train, analyze, intervene,
ensemble); `common.py` holds what they share (runs directory, list and range parsing, device and dtype defaults).

The top layer: it may import every other package and is imported by none. The only place in cos_core that imports
argparse or prints; the library logs. `cos = "cos_core.cli:main"` (pyproject) and `python -m cos_core.cli` enter here.
"""

from .main import main

__all__ = ["main"]
