"""DualForce-Mega: trainer, data pipeline, sampler and evaluation for DualForce."""
