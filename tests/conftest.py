"""Shared pytest setup."""

import os
import tempfile

# Run Triton kernels through its CPU interpreter in tests; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Files verified by the tests (and their subprocesses) are remembered here, not in the user's cache.
os.environ.setdefault("GISP_DEPLOY_CACHE", tempfile.mkdtemp(prefix="gisp-deploy-verified-"))
