"""The metric networks of one evaluation run: command-line flags, loading from user paths (every path
is checked before any work starts), or tiny random instances of the same classes (--random-models)."""
from __future__ import annotations

import argparse
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dualforce_mega.encoders.liveportrait import LivePortraitMotionExtractor
from dualforce_mega.metrics import fvd
from dualforce_mega.metrics.arcface import ArcFace, write_tiny_arcface
from dualforce_mega.metrics.fid import FrameFeatures
from dualforce_mega.metrics.inception import FIDInception
from dualforce_mega.metrics.r3d import R3D18
from dualforce_mega.metrics.sync import SyncScorer
from dualforce_mega.metrics.syncnet import SyncNet
from dualforce_mega.metrics.weights import RANDOM_PRESETS, require_file, warn_random
from dualforce_mega.preprocess.motion import LivePortraitMotion

log = logging.getLogger(__name__)

METRICS = ("fid", "fvd", "fvd_r3d18", "csim", "sync", "apd")
TINY_WIDTH_DIV = 16           # random smoke models: every channel count / 16
# metric -> (flag, args attribute, what the file is)
WEIGHT_FLAGS = {
    "fid": ("--fid-inception", "fid_inception", "FID Inception weights (pytorch-fid pt_inception-2015-12-05-6726825d.pth)"),
    "fvd": ("--i3d", "i3d", "I3D TorchScript (stylegan-v i3d_torchscript.pt)"),
    "fvd_r3d18": ("--r3d18", "r3d18", "R3D-18 weights (torchvision r3d_18-b3b3357e.pth)"),
    "csim": ("--arcface", "arcface", "ArcFace ONNX model (insightface, e.g. w600k_r50.onnx)"),
    "sync": ("--syncnet", "syncnet", "SyncNet weights (syncnet_v2.model)"),
}


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("metric networks (local files; docs/EVAL.md says where to get each)")
    for flag, dest, what in WEIGHT_FLAGS.values():
        g.add_argument(flag, dest=dest, help=what)
    g.add_argument("--motion-extractor", help="LivePortrait motion_extractor.pth: APD from its pose heads instead "
                                              "of MediaPipe FaceMesh + PnP")
    g.add_argument("--random-models", choices=RANDOM_PRESETS,
                   help="tiny RANDOM networks of the same classes instead of weight files (smoke runs; "
                        "the numbers are meaningless and marked so)")
    g.add_argument("--device", help="default: cuda when available")


@dataclass
class MetricModels:
    device: torch.device
    random: Optional[str]
    fid: Optional[FrameFeatures] = None
    fvd: Optional[fvd.VideoFeatures] = None
    fvd_r3d18: Optional[fvd.VideoFeatures] = None
    arcface: Optional[ArcFace] = None
    sync: Optional[SyncScorer] = None
    pose: Optional[LivePortraitMotion] = None     # None: MediaPipe FaceMesh + PnP


def check_weight_paths(args: argparse.Namespace, metrics: list[str]) -> None:
    """Fails on the first missing file, naming its flag (before anything is decoded or generated)."""
    if "apd" in metrics and getattr(args, "motion_extractor", None):
        require_file(args.motion_extractor, "--motion-extractor", "LivePortrait motion extractor")
    if getattr(args, "random_models", None):
        return
    for m in metrics:
        if m in WEIGHT_FLAGS:
            flag, dest, what = WEIGHT_FLAGS[m]
            require_file(getattr(args, dest, None), flag, what)


def load_models(args: argparse.Namespace, metrics: list[str]) -> MetricModels:
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"--metrics: unknown {unknown}; choose from {METRICS}")
    check_weight_paths(args, metrics)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    random = getattr(args, "random_models", None)
    models = MetricModels(device=device, random=random)
    div = TINY_WIDTH_DIV
    if "fid" in metrics:
        net = FIDInception(div) if random else FIDInception.from_file(args.fid_inception)
        models.fid = FrameFeatures(net, device)
    if "fvd" in metrics:
        net = fvd.tiny_i3d().to(device) if random else fvd.load_i3d(args.i3d, device)
        models.fvd = fvd.VideoFeatures("i3d", net, device)
    if "fvd_r3d18" in metrics:
        net = R3D18(div) if random else R3D18.from_file(args.r3d18)
        models.fvd_r3d18 = fvd.VideoFeatures("r3d18", net.to(device).eval(), device)
    if "csim" in metrics:
        path = getattr(args, "arcface", None)
        if random:
            path = write_tiny_arcface(Path(tempfile.mkdtemp(prefix="tiny_arcface_")) / "arcface.onnx")
        models.arcface = ArcFace(path, device=device.type)
    if "sync" in metrics:
        net = SyncNet(div) if random else SyncNet.from_file(args.syncnet)
        models.sync = SyncScorer(net, device)
    if "apd" in metrics and getattr(args, "motion_extractor", None):
        net = LivePortraitMotionExtractor.from_pretrained(require_file(args.motion_extractor, "--motion-extractor",
                                                                       "LivePortrait motion extractor"))
        models.pose = LivePortraitMotion(net.to(device))
    if random:
        for m in metrics:
            if m in WEIGHT_FLAGS:
                warn_random(f"{m} network")
    return models
