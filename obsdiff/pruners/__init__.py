"""Pruning strategies for the group-wise loop: layer-wise (unstructured, N:M) and structured."""
