"""marginlab: margins, cross-entropy and adversarial examples — the helper package of the book."""
from __future__ import annotations

__version__ = "0.1.0"

# config comes first: it sets OpenMP's wait policy before torch is loaded (OpenMP reads it once, then).
from . import config  # cheap; the rest are imported on demand

# Threads sized for a CPU that may be shared (a laptop with a browser open, a CI runner beside another
# job): see config.apply_thread_policy and benchmarks/bench_threads.py. MARGINLAB_THREADS=off opts out.
config.apply_thread_policy()

__all__ = ["__version__", "config"]
