"""Serving slices with vLLM: the plugin, its model classes, weight slicing, the server process."""
