"""Baseline methods run from their official weights (docs/BASELINES.md)."""
