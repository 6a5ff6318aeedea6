"""`python -m cos_core.cli ...`: the `cos` command without the console script (tests, torchrun, uninstalled trees).

Owns nothing but the call; see `main.py`.
"""

import sys

from .main import main

sys.exit(main())
