"""LatentSync's fixed mouth mask in aligned-face coordinates.

The official pipeline reads ``latentsync/utils/mask.png`` (256 x 256): everything below the nose
(both cheeks from y ~ 95, the full width from y ~ 129, narrowing to the chin at y ~ 242) is
regenerated, the rest of the aligned face is kept. The same region is drawn here as a polygon
traced from that image's outline (coordinates at 256, scaled to the resolution), so no asset file
is needed. 1 = keep, 0 = regenerate, the convention of the UNet's mask channel.
"""
from __future__ import annotations

import torch
from PIL import Image, ImageDraw

MASK_RESOLUTION = 256
MOUTH_POLYGON = (
    (9, 95), (77, 95), (77, 129), (178, 129), (178, 95), (247, 95), (247, 135), (245, 150), (245, 162),
    (243, 170), (239, 178), (234, 186), (228, 194), (222, 202), (214, 210), (204, 218), (192, 226),
    (175, 234), (152, 242), (131, 242), (95, 238), (76, 230), (60, 222), (48, 214), (38, 206), (31, 198),
    (24, 190), (19, 182), (14, 174), (12, 166), (11, 150), (10, 138), (9, 130),
)


def mouth_mask(resolution: int) -> torch.Tensor:
    """[1, resolution, resolution] float: 1 = keep, 0 = mouth region to regenerate."""
    s = resolution / MASK_RESOLUTION
    img = Image.new("L", (resolution, resolution), 255)
    ImageDraw.Draw(img).polygon([(x * s, y * s) for x, y in MOUTH_POLYGON], fill=0)
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(1, resolution, resolution).float() / 255
