"""What a slice is worth and whether it is right: perplexity, task accuracy, `check`."""
