"""Cutting a slice out of an artifact: the compact model, its export, its description, the oracle."""
