"""bench/ is not an installed package (pyproject lists the library's packages only): import it from the checkout."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
