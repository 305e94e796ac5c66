"""marginlab: margins, cross-entropy and adversarial examples — the helper package of the book."""
from __future__ import annotations

__version__ = "0.1.0"

from . import config  # noqa: F401  (cheap; the rest are imported on demand)

__all__ = ["config", "__version__"]
