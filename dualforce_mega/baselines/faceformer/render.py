"""Optional: per-frame FLAME meshes -> an mp4 (frontal view, grey shading, the clip's audio muxed in),
with pyrender + trimesh (``pip install pyrender trimesh``; headless needs ``PYOPENGL_PLATFORM=egl`` or
``osmesa``). Without them, or without an OpenGL context, rendering is skipped with a log line and
nothing is written -- the meshes themselves are the evaluation's input."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ...media import Mp4Writer

SIZE = 512
CAMERA_DISTANCE = 0.5     # metres in front of the mean vertex (FLAME is in metres)
FIELD_OF_VIEW = np.pi / 6

log = logging.getLogger(__name__)


def render_available() -> Optional[str]:
    """None when rendering can run, else why not."""
    try:
        import pyrender  # noqa: F401
        import trimesh  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or OpenGL failing to load
        return f"pyrender / trimesh unavailable ({type(e).__name__}: {e})"
    return None


def render_mp4(vertices: np.ndarray, faces: np.ndarray, out: Path, fps: int, audio: Optional[torch.Tensor] = None,
               sample_rate: int = 16000) -> Optional[Path]:
    """[T, V, 3] meshes -> ``out`` (written as ``out.partial.mp4`` then renamed); None when skipped."""
    why = render_available()
    if why is not None:
        log.warning("render skipped: %s", why)
        return None
    import pyrender
    import trimesh

    centre = vertices.reshape(-1, 3).mean(0)
    scene = pyrender.Scene(bg_color=[1.0, 1.0, 1.0, 1.0], ambient_light=[0.3, 0.3, 0.3])
    pose = np.eye(4)
    pose[:3, 3] = centre + np.array([0.0, 0.0, CAMERA_DISTANCE])
    scene.add(pyrender.PerspectiveCamera(yfov=FIELD_OF_VIEW), pose=pose)
    scene.add(pyrender.DirectionalLight(intensity=3.0), pose=pose)
    material = pyrender.MetallicRoughnessMaterial(baseColorFactor=[0.7, 0.7, 0.7, 1.0])
    try:
        renderer = pyrender.OffscreenRenderer(SIZE, SIZE)
    except Exception as e:  # noqa: BLE001 - no EGL / OSMesa context on this machine
        log.warning("render skipped: no offscreen OpenGL context (%s)", e)
        return None
    tmp = out.with_name(out.stem + ".partial.mp4")
    writer = Mp4Writer(tmp, fps, SIZE, SIZE, audio=audio, sample_rate=sample_rate)
    try:
        for frame in vertices:
            node = scene.add(pyrender.Mesh.from_trimesh(trimesh.Trimesh(frame, faces, process=False),
                                                        material=material))
            color, _ = renderer.render(scene)
            scene.remove_node(node)
            writer.write(color[None, :, :, :3])
    finally:
        writer.close()
        renderer.delete()
    tmp.rename(out)
    return out
