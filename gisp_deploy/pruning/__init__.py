"""The offline stage: every pruning method, its scoring passes, and one `prune` run end to end."""
