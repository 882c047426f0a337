"""Must-show: a trained model works at inference (issue 13).

The tiny model is overfitted on two synthetic clips of one subject (same face and voice, different
speech and head motion) with the training code's defaults (condition dropout, history blocks, reference
images from elsewhere in the clip), then generates with the AR sampler's defaults (KV cache, the sliding
window that follows the training window, moved sink, history at ``sample_history_sigma``) from a clip's
reference image, canonical keypoints, reference motion and audio -- for longer than a training window, so
the window slides and the sink is moved. The generated latents and motion must be close to the clip, and
clearly closer than when the audio of the other clip drives the same reference.
"""
from __future__ import annotations

import pytest
import torch

from dualforce_mega.config import build_config
from dualforce_mega.diffusion.sampler import ARSampler, SampleInputs
from dualforce_mega.training.single_process import (build_model, clip_normalizer, synthetic_clips,
                                                     train_single_process, window_batches)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

STEPS, BATCH = 800, 8
FRAMES = 6            # latent frames generated: twice the training window
# bounds: MSE as a fraction of the clip's variance of what follows the reference. Measured (800 steps):
# clip 0: video 0.18, motion 0.46; with the other clip's audio 2.2 and 3.2. Video error summed over both
# clips: 0.34 with the default window, 0.47 unbounded.
# The motion stream learns slower than the video at this budget (as in test_learnability), hence its bound.
VIDEO_BOUND, MOTION_BOUND = 0.25, 0.6


@pytest.fixture(scope="module")
def trained():
    cfg = build_config({}, ["data.window=3", "data.latent_height=4", "data.latent_width=4",
                            "data.synthetic_clips=2", f"data.synthetic_frames={FRAMES}",
                            "train.lr=3e-3", "train.warmup_steps=10", "train.log_every=0"])
    clips = synthetic_clips(cfg)
    model = build_model(cfg)
    history = train_single_process(cfg, window_batches(clips, cfg, batch_size=BATCH), steps=STEPS, model=model)
    return cfg, clips, model.eval(), history


def generate(cfg, clips, model, ref_clip: int, audio_clip: int, **sampler_overrides) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = clips[ref_clip][0]
    d = cfg.diffusion if not sampler_overrides else type(cfg.diffusion)(**{**vars(cfg.diffusion), **sampler_overrides})
    sampler = ARSampler(model, d, training_window=cfg.data.window, normalizer=clip_normalizer(clips, cfg))
    inputs = SampleInputs(reference=tensors["ref_latent"][0][None], num_latent=FRAMES, seeds=[7],
                          audio=clips[audio_clip][0]["audio"][None], kp_canonical=tensors["kp_canonical"][None],
                          ref_motion=tensors["struct"][0][None])
    video, struct = sampler.sample(inputs)
    return video[0], struct[0]


def relative_errors(clip: dict, video: torch.Tensor, struct: torch.Tensor) -> tuple[float, float]:
    """MSE of the generated frames after the reference over the clip's variance of those frames (all
    elements), for the latents and the motion (raw units)."""
    v_true, s_true = clip["video_latent"][:, 1:], clip["struct"][1:]
    return (float((video[:, 1:] - v_true).pow(2).mean() / v_true.var()),
            float((struct[1:] - s_true).pow(2).mean() / s_true.var()))


def test_overfitted_model_generates_its_clip_from_reference_and_audio(trained) -> None:
    cfg, clips, model, history = trained
    assert history[-1]["loss_video"] < 0.5 * history[0]["loss_video"], (history[0], history[-1])
    errors = {}
    for ref in (0, 1):
        own = errors[ref] = relative_errors(clips[ref][0], *generate(cfg, clips, model, ref, ref))
        swapped = relative_errors(clips[ref][0], *generate(cfg, clips, model, ref, 1 - ref))
        assert own[0] < VIDEO_BOUND and own[1] < MOTION_BOUND, (ref, own, swapped)
        # the other clip's audio drives the same face elsewhere: clearly further from this clip
        assert own[0] < 0.5 * swapped[0] and own[1] < 0.5 * swapped[1], (ref, own, swapped)
    # the pre-issue-13 default (unbounded attention, the sink at its own RoPE position: query-key distances
    # training never showed) generates worse from the same trained model
    unbounded = [relative_errors(clips[ref][0], *generate(cfg, clips, model, ref, ref, window_blocks=0))
                 for ref in (0, 1)]
    assert sum(e[0] for e in errors.values()) < sum(e[0] for e in unbounded), (errors, unbounded)
