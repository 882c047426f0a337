"""Evaluation: generation from checkpoints, metrics (FID, FVD, CSIM, Sync-C/D, APD, LVE), reports."""
