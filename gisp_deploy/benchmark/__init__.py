"""`bench`: quality, size, load time and decode speed of slices side by side, and its reports."""
