"""Checks of the cluster files (``python -m cluster.validate``); the files themselves are YAML and shell."""
