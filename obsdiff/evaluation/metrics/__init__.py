"""Quality metrics, one file each, found by name (``eval.metrics``) in :data:`base.METRICS`."""
