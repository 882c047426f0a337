"""The ablation study: train every ablation config, export an inference bundle for each, and evaluate
them all into one comparison table.

    python -m eval.ablations --study study.yaml --out runs/ablations \\
        [--configs launch/configs/ablations] [--only fusion_depth_4,sigma_s_0.5] [--set train.steps=20000] \\
        [--launcher "bash launch/train_dualforce.sh"] [--vae P --audio-encoder P] [metric network flags]

The base run (``dualforce_lite.yaml``) and the 7 seed ablations run sequentially. An ablation whose
resolved config differs from the base only in sampling keys (``long_sequence_eval``) is not trained: it
evaluates the base run's bundle with its sampler settings. Everything resumes: a finished bundle is not
retrained, an interrupted run continues from its last checkpoint (the trainer resumes from
``run.dir``), and generated videos are not generated again. The study YAML supplies test sets, lengths,
metrics and networks (its ``models`` are replaced by the ablations). Output: OUT/runs/NAME,
OUT/bundles/NAME, OUT/study.yaml and OUT/results/ (results.md is the comparison table).
"""
from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

from dualforce_mega.cli import run_main
from dualforce_mega.config import load_config
from dualforce_mega.fsutil import refuse_overlap

from .metrics.models import add_model_arguments

log = logging.getLogger("eval.ablations")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ROOT / "launch" / "configs" / "ablations"
BASE = "dualforce_lite"
ABLATIONS = ("no_struct_stream", "unidirectional_bridge", "fusion_depth_4", "fusion_depth_12", "sigma_s_0.5",
             "sigma_s_1.0", "long_sequence_eval")
# DiffusionConfig fields that only the sampler reads: changing them needs no training
SAMPLER_KEYS = ("sample_steps", "sample_shift", "chunk_blocks", "window_blocks", "ar_step", "cfg_audio")
DEFAULT_LAUNCHER = "bash launch/train_dualforce.sh"


def _flat(cfg) -> dict:
    return {f"{s}.{k}": v for s, body in cfg.to_dict().items() for k, v in body.items()}


def sampler_only(base: dict, abl: dict) -> Optional[dict]:
    """The sampler overrides when ``abl`` differs from ``base`` in sampling keys only, else None."""
    diff = {k: v for k, v in abl.items() if base.get(k) != v and not k.startswith("run.")}
    if diff and all(k.startswith("diffusion.") and k.split(".", 1)[1] in SAMPLER_KEYS for k in diff):
        return {k.split(".", 1)[1]: v for k, v in diff.items()}
    return None


def run(cmd: list[str], what: str) -> None:
    log.info("%s: %s", what, " ".join(shlex.quote(c) for c in cmd))
    rc = subprocess.call(cmd, cwd=ROOT)
    if rc != 0:
        raise RuntimeError(f"{what} failed (exit {rc}): {' '.join(cmd)}")


def train_and_export(name: str, config: Path, out: Path, overrides: list[str], launcher: str) -> Path:
    run_dir, bundle = out / "runs" / name, out / "bundles" / name
    if (bundle / "bundle.json").exists():
        log.info("%s: bundle exists, not retrained (%s)", name, bundle)
        return bundle
    sets = [a for o in overrides + [f"run.dir={run_dir}", f"run.name={name}"] for a in ("--set", o)]
    run(shlex.split(launcher) + ["--config", str(config)] + sets, f"train {name}")
    run([sys.executable, "-m", "checkpoints_conv.export_bundle", str(run_dir), str(bundle), "--overwrite"],
        f"export {name}")
    return bundle


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m eval.ablations", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", required=True, help="study YAML: test_sets, lengths, metrics, networks, generation")
    ap.add_argument("--out", required=True, help="output folder (runs/, bundles/, results/)")
    ap.add_argument("--configs", default=str(DEFAULT_CONFIGS), help="folder with dualforce_lite.yaml + ablations")
    ap.add_argument("--only", help=f"comma list of ablations (default: all of {','.join(ABLATIONS)})")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                    help="config override applied to every run (e.g. train.steps=20000)")
    ap.add_argument("--launcher", default=DEFAULT_LAUNCHER, help="training command that takes --config / --set")
    ap.add_argument("--vae", help="diffusers AutoencoderKLWan folder for generation")
    ap.add_argument("--audio-encoder", help="HuBERT / wav2vec2 folder for generation")
    add_model_arguments(ap)
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    configs, out = Path(args.configs), Path(args.out)
    refuse_overlap({"--out": out}, {"--study": args.study, "--configs": configs, "--vae": args.vae,
                                    "--audio-encoder": args.audio_encoder})
    names = [n.strip() for n in args.only.split(",")] if args.only else list(ABLATIONS)
    unknown = [n for n in names if not (configs / f"{n}.yaml").is_file()]
    if unknown or not (configs / f"{BASE}.yaml").is_file():
        log.error("%s: missing configs %s", configs, unknown or [BASE])
        return 2
    study = yaml.safe_load(Path(args.study).read_text()) or {}
    base_flat = _flat(load_config(str(configs / f"{BASE}.yaml"), args.overrides))
    # name -> sampler overrides of a sampler-only ablation, None for one that trains
    plan = {n: sampler_only(base_flat, _flat(load_config(str(configs / f"{n}.yaml"), args.overrides)))
            for n in names}
    out.mkdir(parents=True, exist_ok=True)
    bundles = {BASE: train_and_export(BASE, configs / f"{BASE}.yaml", out, args.overrides, args.launcher)}
    for n in names:
        if plan[n] is None:
            bundles[n] = train_and_export(n, configs / f"{n}.yaml", out, args.overrides, args.launcher)
        else:
            log.info("%s: sampler-only ablation %s: evaluates the %s bundle", n, plan[n], BASE)
    models = {}
    for n in [BASE] + names:
        m = {"bundle": str((bundles[n] if plan.get(n) is None else bundles[BASE]).resolve())}
        if plan.get(n):
            m["diffusion"] = plan[n]
        if args.vae:
            m["vae"] = str(Path(args.vae).resolve())
        if args.audio_encoder:
            m["audio_encoder"] = str(Path(args.audio_encoder).resolve())
        models[n] = m
    base_dir = Path(args.study).resolve().parent
    for ts in (study.get("test_sets") or {}).values():   # the written study lives in OUT: absolute paths
        for k in ("pairs", "real"):
            if ts.get(k) and not Path(ts[k]).is_absolute():
                ts[k] = str(base_dir / ts[k])
    nets = study.get("networks") or {}
    for k, v in nets.items():
        if k != "random_models" and v and not Path(v).is_absolute():
            nets[k] = str(base_dir / v)
    study.update(models=models, out=str((out / "results").resolve()))
    study_path = out / "study.yaml"
    study_path.write_text(yaml.safe_dump(study, sort_keys=False))
    from .run_eval import main as run_eval

    flags = [a for k in ("fid_inception", "i3d", "r3d18", "arcface", "syncnet", "motion_extractor", "random_models",
                         "device")
             if getattr(args, k, None) for a in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    return run_eval(["--study", str(study_path)] + flags)


if __name__ == "__main__":
    sys.exit(run_main(main))
