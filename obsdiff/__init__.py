"""obsdiff: one-shot OBS pruning of text-to-image diffusion models (OBS-Diff)."""

__version__ = "0.1.0"


def load_pruned(path, /, pipeline=None, **pipeline_kwargs):
    """Load a pruned artifact into its pipeline; see ``obsdiff.artifacts.load_pruned``."""
    from obsdiff.artifacts import load_pruned as _load

    return _load(path, pipeline, **pipeline_kwargs)


__all__ = ["__version__", "load_pruned"]
