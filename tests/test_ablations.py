"""The ablation study runner at tiny size: the base run and two ablations (one trained, one sampler-only)
train a couple of steps, export bundles and land in one comparison table; a rerun retrains nothing."""
from __future__ import annotations

import json
import sys

import pytest
import yaml

from dualforce_mega.config import build_config
from dualforce_mega.encoders.speech import tiny_audio_encoder
from dualforce_mega.encoders.vae import tiny_vae
from eval.ablations import main as ablations
from eval.ablations import sampler_only

from eval_utils import write_pairs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

TINY_TRAINING = ["model.preset=tiny", "train.steps=2", "data.shards=", "data.window=3", "data.synthetic_clips=4",
                 "data.synthetic_frames=6", "data.synthetic_shards=1", "train.global_batch=1", "train.micro_batch=1",
                 "train.precision=fp32", "train.save_every=2", "train.warmup_steps=1",
                 "train.activation_checkpointing=false"]


def test_sampler_only_detection():
    assert sampler_only({"diffusion.window_blocks": 0, "model.x": 1}, {"diffusion.window_blocks": 8, "model.x": 1}) \
        == {"window_blocks": 8}
    assert sampler_only({"diffusion.struct_sigma_k": 1.0}, {"diffusion.struct_sigma_k": 0.5}) is None
    assert sampler_only({"model.fusion_depth": 8}, {"model.fusion_depth": 4}) is None


def test_two_ablations_train_and_compare(tmp_path):
    cfg = build_config({"model": {"preset": "tiny"}})
    tiny_vae(z_dim=cfg.model.in_channels).save_pretrained(tmp_path / "vae")
    tiny_audio_encoder(cfg.model.audio_dim).save_pretrained(tmp_path / "audio")
    pairs = write_pairs(tmp_path / "pairs", ["a"])
    study = {"metrics": ["csim", "sync"], "lengths": [12], "faces": "full",
             "generation": {"steps": 1, "height": 32, "width": 32},
             "test_sets": {"ts": {"pairs": "pairs"}}, "networks": {"random_models": "tiny"}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    out = tmp_path / "abl"
    argv = ["--study", str(tmp_path / "study.yaml"), "--out", str(out), "--only", "no_struct_stream,long_sequence_eval",
            "--launcher", f"{sys.executable} -m dualforce_mega.training.train", "--vae", str(tmp_path / "vae"),
            "--audio-encoder", str(tmp_path / "audio")] + [a for o in TINY_TRAINING for a in ("--set", o)]
    assert ablations(argv) == 0
    assert sorted(p.name for p in (out / "bundles").iterdir()) == ["dualforce_lite", "no_struct_stream"]
    assert not (out / "runs" / "long_sequence_eval").exists()      # sampler-only: evaluates the base bundle
    res = json.loads((out / "results" / "results.json").read_text())
    assert [r["model"] for r in res["rows"]] == ["dualforce_lite", "no_struct_stream", "long_sequence_eval"]
    assert all(r["videos"] == 1 and r["sync_c"] is not None for r in res["rows"])
    table = (out / "results" / "results.md").read_text()
    assert all(n in table for n in ("dualforce_lite", "no_struct_stream", "long_sequence_eval"))
    written = yaml.safe_load((out / "study.yaml").read_text())
    assert written["models"]["long_sequence_eval"]["diffusion"] == {"window_blocks": 8}
    assert (out / "results" / "comparison.png").exists()
    stamp = (out / "bundles" / "no_struct_stream" / "bundle.json").stat().st_mtime_ns
    assert ablations(argv) == 0                                    # resumed: nothing retrained
    assert (out / "bundles" / "no_struct_stream" / "bundle.json").stat().st_mtime_ns == stamp
