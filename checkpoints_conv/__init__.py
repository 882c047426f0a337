"""Checkpoint tools: ZeRO -> safetensors, inference bundles, Wan2.1 import/export, diff (docs/CHECKPOINTS.md)."""
