"""Command lines of the baselines (python -m eval.baselines.latentsync)."""
