"""eval.generate --motion-extractor: kp_canonical and struct frame 0 come from the reference image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dualforce_mega.media import load_image, to_uint8_frames
from dualforce_mega.preprocess.motion import build_motion_extractor, reference_motion
from eval.generate import main
from test_generate import write_inputs

pytestmark = pytest.mark.usefixtures("single_thread")
SIZE = 64  # a multiple of VAE stride x patch (16) on which FaceMesh still finds the face


def test_reference_motion_pins_struct_frame_zero(tmp_path) -> None:
    pytest.importorskip("mediapipe")
    from skimage import data

    ref = tmp_path / "face.png"
    Image.fromarray(data.astronaut()[30:330, 100:400]).save(ref)
    _, audio = write_inputs(tmp_path, "a", seconds=0.3)
    args = ["--ref", str(ref), "--audio", str(audio), "--random-preset", "tiny", "--steps", "1", "--quiet",
            "--height", str(SIZE), "--width", str(SIZE), "--motion-extractor", "mediapipe"]
    assert main([*args, "--out", str(tmp_path / "a.mp4"), "--save-latents", str(tmp_path / "a.safetensors")]) == 0
    # the same extractor on the image the model sees (resized to the generation size)
    image = to_uint8_frames(load_image(ref, SIZE, SIZE)[:, None])[0]
    motion, kp = reference_motion(build_motion_extractor(None), image)
    struct = load_file(str(tmp_path / "a.safetensors"))["struct"]
    torch.testing.assert_close(struct[0], torch.from_numpy(motion))
    assert np.isfinite(kp).all() and kp.shape == (63,)

    # an explicit --ref-motion wins over the extractor
    given = np.linspace(-1, 1, 70, dtype=np.float32)
    np.save(tmp_path / "m.npy", given)
    assert main([*args, "--out", str(tmp_path / "b.mp4"), "--save-latents", str(tmp_path / "b.safetensors"),
                 "--ref-motion", str(tmp_path / "m.npy")]) == 0
    assert torch.equal(load_file(str(tmp_path / "b.safetensors"))["struct"][0], torch.from_numpy(given))


def test_no_face_in_reference_is_a_clear_error(tmp_path) -> None:
    pytest.importorskip("mediapipe")
    image, audio = write_inputs(tmp_path, "noise", seconds=0.2)  # random pixels: no face
    with pytest.raises(ValueError, match="no face found in the reference image"):
        main(["--ref", str(image), "--audio", str(audio), "--out", str(tmp_path / "x.mp4"), "--random-preset",
              "tiny", "--steps", "1", "--quiet", "--height", "32", "--width", "32", "--motion-extractor", "mediapipe"])
    assert not (tmp_path / "x.mp4").exists()
