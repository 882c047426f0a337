"""ArcFace identity embeddings through onnxruntime, from an insightface ONNX model file (e.g.
``buffalo_l/w600k_r50.onnx``, ``glintr100.onnx``): input [N, 3, 112, 112] RGB, output [N, D].

Input normalisation as insightface ``ArcFaceONNX``: when the graph starts with Sub and Mul nodes
(the converted MXNet models normalise inside) pixels go in as 0..255, otherwise (x - 127.5) / 127.5.
Crops must be aligned to the ArcFace 5-point template (``ARCFACE_TEMPLATE``, 112²): ``crops.py``.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import nn

from .weights import WeightFileError

log = logging.getLogger(__name__)

INPUT_SIZE = 112
EMBED_DIM = 512
# insightface ``face_align.arcface_dst``: eyes, nose tip, mouth corners in the 112x112 crop (x, y)
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
NORMALISATION_NODES = 8   # insightface inspects the first 8 graph nodes


def _input_normalisation(path: Path) -> tuple[float, float]:
    import onnx

    graph = onnx.load(str(path)).graph
    names = [n.name for n in graph.node[:NORMALISATION_NODES]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


class ArcFace:
    def __init__(self, path: Union[str, Path], device: str = "cpu"):
        import onnxruntime as ort

        path = Path(path)
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
            self.mean, self.std = _input_normalisation(path)
        except Exception as e:  # noqa: BLE001
            raise WeightFileError(f"{path}: not a loadable ONNX ArcFace model ({type(e).__name__}: {e})") from e
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        if len(inp.shape) != 4 or list(inp.shape[1:]) != [3, INPUT_SIZE, INPUT_SIZE]:
            raise WeightFileError(f"{path}: ArcFace input must be [N, 3, {INPUT_SIZE}, {INPUT_SIZE}], "
                                  f"found {inp.shape}")
        if len(out.shape) != 2:
            raise WeightFileError(f"{path}: ArcFace output must be [N, D] embeddings, found {out.shape}")
        self.input_name = inp.name
        self.dim = out.shape[1] if isinstance(out.shape[1], int) else None

    def embed(self, crops: np.ndarray, batch: int = 64) -> np.ndarray:
        """Aligned RGB crops uint8 [N, 112, 112, 3] -> float32 [N, D] (not normalised)."""
        if crops.ndim != 4 or crops.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"ArcFace crops must be [N, {INPUT_SIZE}, {INPUT_SIZE}, 3], got {crops.shape}")
        out = []
        for i in range(0, len(crops), batch):
            x = (crops[i:i + batch].astype(np.float32) - self.mean) / self.std
            out.append(self.session.run(None, {self.input_name: x.transpose(0, 3, 1, 2).copy()})[0])
        return np.concatenate(out).astype(np.float32)


class _TinyArcFace(nn.Module):
    def __init__(self, width: int, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(3, width, kernel_size=3, stride=2)
        self.fc = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def write_tiny_arcface(path: Union[str, Path], width: int = 8, dim: int = EMBED_DIM, seed: int = 0) -> Path:
    """A random ONNX model with the insightface ArcFace interface (input ``input.1`` [N, 3, 112, 112],
    output [N, dim]), for smoke runs and tests."""
    path = Path(path)
    torch.manual_seed(seed)
    net = _TinyArcFace(width, dim).eval()
    with warnings.catch_warnings():  # insightface models are ONNX; the legacy exporter needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE), str(path), dynamo=False,
                          input_names=["input.1"], output_names=["embedding"],
                          dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}})
    return path
