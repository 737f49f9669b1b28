"""Shared pytest setup."""

import os

# Run Triton kernels through its CPU interpreter in tests; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
