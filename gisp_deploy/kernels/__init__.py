"""Optional GPU kernels (Triton) for load-time slicing, with torch fallbacks."""

from .gather import HAS_TRITON, gather_cols, gather_rows, use_triton

__all__ = ["HAS_TRITON", "gather_cols", "gather_rows", "use_triton"]
