"""GPU correctness of the merged attention and the static streaming path, before they are timed.

  kernels    every merged piece kernel (cudnn, flash, efficient) through the merged path vs the fp64
             dense reference (the check ``choose_kernel`` runs on first use), and which one auto picks
  attention  merged vs the dense reference at the benchmark shape (12 heads / P x 128, 1024 tokens per
             latent frame), forward + backward, bf16 (``gpu_checks.attention_check``: at most SLACK x the
             bf16 dense reference's own error)
  model      the whole model (both towers, bridges, window) merged vs sdpa, forward + backward: relative
             error of outputs and gradients vs an fp32 sdpa reference, against the bf16 sdpa error
  static     static ring cache + captured chunk forward vs the eager KV cache (tiny model, fp32)

Prints one line per check as it goes; exit status 1 if any failed.

  python benchmarks/gpu_17_checks.py
  python benchmarks/gpu_17_checks.py --cpu-smoke     # tiny shapes on CPU (exercises the script)
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Optional

import torch

from common import csv_list, dump_json  # noqa: I100
from dualforce_mega.config import DiffusionConfig, model_preset
from dualforce_mega.diffusion.sampler import ARSampler, SampleInputs
from dualforce_mega.models.dualforce import DualForceModel
from dualforce_mega.timeline import Timeline
from dualforce_mega.models.merged_attention import KERNELS, candidate_kernels, choose_kernel, verify_kernel
from gpu_checks import SLACK, Check, Setup, attention_check

CHECKS: list[Check] = []


def report(name: str, passed: bool, detail: str) -> None:
    CHECKS.append(Check(name, passed, detail=detail))
    print(f"CHECK {name}: {'PASS' if passed else 'FAIL'} {detail}", flush=True)


def guarded(name: str, fn: Callable[[], None]) -> None:
    """A check that raises fails alone; the others still run."""
    start = time.perf_counter()
    try:
        fn()
    except Exception as err:  # noqa: BLE001
        report(name, False, f"raised {type(err).__name__}: {str(err).splitlines()[0][:160]}")
    print(f"# {name} took {time.perf_counter() - start:.1f} s", flush=True)


def kernels_check(setup: Setup) -> None:
    tol = max(8 * torch.finfo(setup.dtype).eps, 1e-5)
    for name in candidate_kernels(setup.device, setup.dtype):
        try:
            err = verify_kernel(KERNELS[name], setup.device, setup.dtype, setup.head_dim)
            report(f"kernel {name}", err <= tol, f"rel. error {err:.2e} (bound {tol:.1e})")
        except RuntimeError as e:
            report(f"kernel {name}", False, f"unusable: {str(e).splitlines()[0][:160]}")
    print(f"# auto picks: {choose_kernel(setup.device, setup.dtype, setup.head_dim).name}", flush=True)


def attention_checks(setup: Setup, frames: list[int], sps: list[int]) -> None:
    for f in frames:
        for sp in sps:
            for c in attention_check(setup, f, sp, backward=True, only=["merged"]):
                report(c.name, c.passed, f"{c.value:.2f} of bound; {c.detail}" if c.value is not None else c.detail)


def _model_run(model: DualForceModel, inputs: dict, backend: str) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.set_attention_backend(backend)
    out = model(**inputs, window_blocks=2)
    (out.video.float().square().mean() + out.struct.float().square().mean()).backward()
    grads = [p.grad.float().flatten() for p in model.parameters() if p.grad is not None]
    return [out.video.detach().float().flatten(), out.struct.detach().float().flatten(), torch.cat(grads)]


def model_check(setup: Setup, preset: str, frames: int, hw: int) -> None:
    torch.manual_seed(0)
    with torch.device(setup.device):  # initialised on the device: fast for the large presets
        ref_model = DualForceModel(model_preset(preset))
        low_model = DualForceModel(model_preset(preset)).to(setup.dtype)
    with torch.no_grad():  # trained-like: no zero heads, bridges or gates
        for p in ref_model.parameters():
            if p.abs().max() == 0:
                p.normal_(0.0, 0.02)
    low_model.load_state_dict(ref_model.state_dict())
    cfg = ref_model.cfg
    g = torch.Generator().manual_seed(1)
    n = Timeline(stride=cfg.vae_temporal_stride).video_frames(frames)
    inputs = dict(video_latent=torch.randn(1, cfg.in_channels, frames, hw, hw, generator=g),
                  sigma_video=torch.rand(1, frames, generator=g), struct=torch.randn(1, n, cfg.motion_dim, generator=g),
                  audio=torch.randn(1, n * cfg.audio_rate // cfg.fps, cfg.audio_dim, generator=g))
    inputs = {k: v.to(setup.device) for k, v in inputs.items()}
    ref = _model_run(ref_model, inputs, "sdpa")
    low = _model_run(low_model, inputs, "sdpa")
    got = _model_run(low_model, inputs, "merged")
    for label, r, lo, m in zip(("video", "struct", "grads"), ref, low, got):
        e_low, e_m = float((lo - r).norm() / r.norm()), float((m - r).norm() / r.norm())
        bound = SLACK * e_low + 1e-6
        report(f"model {preset} F={frames} {label}", e_m <= bound,
               f"merged rel. error {e_m:.2e}, sdpa {str(setup.dtype).replace('torch.', '')} {e_low:.2e}")


def static_check(setup: Setup) -> None:
    torch.manual_seed(0)
    with torch.device(setup.device):
        model = DualForceModel(model_preset("tiny")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.abs().max() == 0:
                p.normal_(0.0, 0.1)
    g = torch.Generator().manual_seed(2)
    n_latent = 8
    n = Timeline(stride=model.cfg.vae_temporal_stride).video_frames(n_latent)
    inputs = SampleInputs(torch.randn(1, 16, 4, 4, generator=g), n_latent, [0],
                          audio=torch.randn(1, 2 * n, model.cfg.audio_dim, generator=g),
                          kp_canonical=torch.randn(1, model.cfg.kp_dim, generator=g))
    for cfg_audio, tag in ((1.0, ""), (2.0, ", batched audio CFG")):
        cfg = DiffusionConfig(sample_steps=2, window_blocks=2, cfg_audio=cfg_audio)
        v_ref, s_ref = ARSampler(model, cfg).sample(inputs)
        sampler = ARSampler(model, cfg, static=True)
        v, s = sampler.sample(inputs)
        v2, s2 = sampler.sample(inputs)  # a second generation replays the same graphs
        diff = max(float((v - v_ref).abs().max()), float((s - s_ref).abs().max()),
                   float((v2 - v_ref).abs().max()), float((s2 - s_ref).abs().max()))
        replays = sum(f.replays for f in sampler._forwards.values())
        graphs = setup.device.type == "cuda"
        report(f"static graphs == eager cache{tag}", diff < 1e-4 and (replays > 0 or not graphs),
               f"max |diff| {diff:.2e}, {replays} graph replays")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="kernels,attention,model,static")
    p.add_argument("--frames", default="8", help="latent frames of the attention check")
    p.add_argument("--sp", default="1,4")
    p.add_argument("--model-preset", default="lite")
    p.add_argument("--json", default="", help="write the checks here (benchmarks/summarize.py reads them)")
    p.add_argument("--cpu-smoke", action="store_true")
    args = p.parse_args(argv)
    setup = Setup.detect(args.cpu_smoke)
    if args.cpu_smoke:
        torch.set_num_threads(1)
        args.model_preset, args.sp = "tiny", "1,2"  # 2 heads in the smoke shapes
    parts = csv_list(args.parts)
    print(f"# gpu_17 checks on {setup.device} ({str(setup.dtype).replace('torch.', '')})", flush=True)
    if "kernels" in parts:
        guarded("kernels", lambda: kernels_check(setup))
    if "attention" in parts:
        guarded("attention", lambda: attention_checks(setup, csv_list(args.frames, int), csv_list(args.sp, int)))
    if "model" in parts:
        guarded("model", lambda: model_check(setup, args.model_preset, frames=5, hw=8))
    if "static" in parts:
        guarded("static", lambda: static_check(setup))
    failed = sum(not c.passed for c in CHECKS)
    print(f"# {failed} of {len(CHECKS)} check(s) failed", flush=True)
    dump_json(args.json, {"device": str(setup.device), "checks": CHECKS})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
