"""gisp-deploy: prune once with GISP, slice any sparsity at load time, deploy many."""

__version__ = "0.1.0"
