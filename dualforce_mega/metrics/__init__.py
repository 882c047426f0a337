"""Evaluation metrics as a library: the networks (FID Inception, I3D / R3D-18, ArcFace, SyncNet) with
loaders for their official weight files, and the math (Fréchet distance, CSIM / ACD, Sync-C / Sync-D,
APD, LVE / FDD). ``eval/metrics/`` holds the command lines; the data pipeline and the baselines import
from here. Definitions and the references they match: docs/EVAL.md."""
