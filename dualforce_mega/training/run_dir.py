"""What a run directory already holds, checked before any rank starts (torch-free: ``preflight`` imports it).

A run directory is one run: ``config.yaml`` describes the model its checkpoints hold. Starting again in it
resumes that run, so the model and the phase must be the ones it was trained with; a different model
config is refused with the keys that differ, before anything is written (``config.yaml`` is only written
once this check has passed). A run whose latest checkpoint already reached ``train.steps`` is finished:
the launch stops before starting any rank.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config import Config, ConfigError

CHECKPOINTS = "checkpoints"
CONFIG_NAME = "config.yaml"
LATEST = "latest"
_TAG_RE = re.compile(r"^step(\d+)$")
# keys that fix what a checkpoint holds: a run resumed with others would load into a different model
RESUME_SECTIONS = ("model",)
RESUME_KEYS = ("train.phase", "run.task")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    m = _TAG_RE.match(tag)
    if not m:
        raise ValueError(f"checkpoint tag {tag!r} is not of the form stepNNNNNNNN")
    return int(m.group(1))


def latest_step(run_dir: Path) -> Optional[int]:
    """Step of the checkpoint ``<run_dir>/checkpoints/latest`` names, None without one."""
    latest = Path(run_dir) / CHECKPOINTS / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    try:
        return step_of(tag)
    except ValueError as e:
        raise ConfigError(f"{latest}: {e}") from None


def flat(d: dict[str, Any]) -> dict[str, Any]:
    """``{"model": {"dim": 64}}`` -> ``{"model.dim": 64}`` (one level: the config's sections)."""
    return {f"{s}.{k}": v for s, body in d.items() if isinstance(body, dict) for k, v in body.items()}


def _resume_relevant(key: str) -> bool:
    return key.split(".", 1)[0] in RESUME_SECTIONS or key in RESUME_KEYS


def config_differences(saved: dict[str, Any], cfg: Config, derived: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """key -> (saved value, new value) for the model / phase keys that differ. Keys the saved config does
    not have (written by an older version) are not compared, nor ``derived`` keys left empty (a task fills
    them in from its data, e.g. FaceFormer's ``model.subjects``)."""
    new = flat(cfg.to_dict())
    old = flat(saved)
    return {k: (old[k], new[k]) for k in sorted(new) if _resume_relevant(k) and k in old and old[k] != new[k]
            and not (k in derived and new[k] in (None, "", [], ()))}


def check_run_dir(cfg: Config, derived: tuple[str, ...] = ()) -> Optional[int]:
    """Raise ``ConfigError`` when ``run.dir`` holds checkpoints of a different model / phase; returns the
    step of its latest checkpoint (None for a fresh run)."""
    run_dir = Path(cfg.run.dir)
    step = latest_step(run_dir)
    if step is None:
        return None
    saved_path = run_dir / CONFIG_NAME
    if not saved_path.is_file():
        raise ConfigError(f"run.dir: {run_dir} holds checkpoints but no {CONFIG_NAME}, so what they hold cannot "
                          f"be checked; restore {saved_path} or start in a new run.dir")
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{saved_path}: cannot read the run's config ({e})") from None
    diff = config_differences(saved, cfg, derived)
    if diff:
        shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items())
        raise ConfigError(
            f"run.dir: {run_dir} holds a run of another model/phase ({shown}; checkpoint step {step}), and "
            f"resuming would load it into a different model. Continue it with its own config ({saved_path}), "
            f"start fresh in a new run.dir, or start a new run from its weights: --set run.dir=NEW "
            f"--set train.init_from={run_dir}")
    return step
