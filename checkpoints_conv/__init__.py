"""Checkpoint conversion: ZeRO-3 -> safetensors, pretrained-weight import (Wan2.1), export, diff."""
