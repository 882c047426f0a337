"""LatentSync (bytedance/LatentSync) lip-sync inference with its official checkpoints, and the seed
notes' batch runner around it (docs/BASELINES.md)."""
