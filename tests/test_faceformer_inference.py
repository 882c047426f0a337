"""FaceFormer inference: one (5023, 3) float32 .npy per frame per test record in the evaluation's layout,
reruns skip finished records, and LVE / FDD equal the evaluation CLI's on the written meshes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dualforce_mega.baselines.faceformer.build import build_model
from dualforce_mega.baselines.faceformer.render import render_available
from dualforce_mega.config import load_config, save_config
from eval.baselines.faceformer import main as inference_main
from eval.metrics.lve import main as lve_main
from faceformer_fixtures import faceformer_sets, make_data_root, write_tiny_flame

pytestmark = pytest.mark.usefixtures("single_thread")

FLAME_VERTICES = 5023
CONFIG = Path(__file__).resolve().parents[1] / "launch" / "configs" / "faceformer.yaml"
# test clips: MEAD_VHAP 1.0 s at 25 fps (25 frames), MultiModal200 1.0 s at 20 fps -> 25 frames at 25 fps
EXPECTED = {("MEAD_VHAP", "M003_angry_passionate"): 25, ("MEAD_VHAP", "W777_happy_passionate"): 25,
            ("MultiModal200", "mm1_t_passionate"): 25}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, Path]:
    """A finished run by hand: the resolved config.yaml and best/model.safetensors of a random model."""
    base = tmp_path_factory.mktemp("ffinf")
    root = make_data_root(base / "data", seconds=1.2, test_seconds=1.0)
    flame = write_tiny_flame(base / "flame.npz", num_vertices=FLAME_VERTICES)
    run = base / "run"
    cfg = load_config(str(CONFIG), faceformer_sets(root, flame, run, **{"model.subjects": "[M003, dh_a, mm1]"}))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    torch.nn.init.normal_(model.motion_out.weight, std=0.05)
    (run / "best").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "best" / "model.safetensors"))
    save_config(cfg, run / "config.yaml")
    return run, root


def test_writes_the_layout_and_reruns_skip_finished(run_dir, tmp_path, capsys) -> None:
    run, root = run_dir
    out, gt = tmp_path / "out", tmp_path / "gt"
    (tmp_path / "lips.txt").write_text(" ".join(str(i) for i in range(100, 160)))
    (tmp_path / "upper.txt").write_text(" ".join(str(i) for i in range(3000, 3100)))
    args = ["--run", str(run), "--exp-name", "exp1", "--out", str(out), "--device", "cpu",
            "--gt-out", str(gt), "--lip-vertices", str(tmp_path / "lips.txt"),
            "--upper-vertices", str(tmp_path / "upper.txt")]
    os.environ.pop("DATA_ROOT", None)
    assert inference_main(args) == 0
    found = {}
    for folder in sorted((out / "exp1").glob("*/*")):
        if folder.is_dir():
            files = sorted(folder.iterdir(), key=lambda p: int(p.stem))
            assert [p.name for p in files] == [f"{i}.npy" for i in range(len(files))]
            for p in (files[0], files[-1]):
                a = np.load(p)
                assert a.shape == (FLAME_VERTICES, 3) and a.dtype == np.float32
            found[(folder.parent.name, folder.name)] = len(files)
    assert found == EXPECTED
    assert not list((out / "exp1").glob("*/.*partial"))
    metrics = json.loads((out / "exp1" / "metrics.json").read_text())
    assert metrics["sequences"] == 3 and metrics["frames"] == 75 and metrics["lve"] > 0

    # the evaluation's own CLI on the written folders gives the same numbers
    for dataset in ("MEAD_VHAP", "MultiModal200"):
        assert lve_main(["--pred", str(out / "exp1" / dataset), "--gt", str(gt / "exp1" / dataset),
                         "--lip-vertices", str(tmp_path / "lips.txt"), "--out", str(tmp_path / f"{dataset}.json"),
                         "--upper-vertices", str(tmp_path / "upper.txt"),
                         "--template", str(gt / "exp1" / "template.npy")]) == 0
    per = [json.loads((tmp_path / f"{d}.json").read_text()) for d in ("MEAD_VHAP", "MultiModal200")]
    lve = sum(p["lve"] * p["frames"] for p in per) / sum(p["frames"] for p in per)
    fdd = sum(p["fdd"] * p["sequences"] for p in per) / sum(p["sequences"] for p in per)
    assert metrics["lve"] == pytest.approx(lve, rel=1e-6) and metrics["fdd"] == pytest.approx(fdd, rel=1e-6, abs=1e-12)

    # rerun: nothing regenerated, nothing rewritten; a folder left half-written by a kill is redone
    stamp = {p: p.stat().st_mtime_ns for p in (out / "exp1").rglob("*.npy")}
    capsys.readouterr()
    assert inference_main(args) == 0
    assert "records written: 0, already finished: 3" in capsys.readouterr().out
    assert stamp == {p: p.stat().st_mtime_ns for p in (out / "exp1").rglob("*.npy")}
    victim = out / "exp1" / "MultiModal200" / "mm1_t_passionate"
    os.rename(victim, victim.with_name(".mm1_t_passionate.partial"))
    (victim.with_name(".mm1_t_passionate.partial") / "24.npy").unlink()
    assert inference_main(args) == 0
    assert len(list(victim.iterdir())) == 25 and not victim.with_name(".mm1_t_passionate.partial").exists()
    assert json.loads((out / "exp1" / "metrics.json").read_text())["lve"] == pytest.approx(metrics["lve"])


def test_broken_test_records_are_reported_and_the_rest_written(run_dir, tmp_path, capsys, caplog) -> None:
    run, root = run_dir
    records = json.loads((root / "dataset_jsons/splits/MultiModal200_test.json").read_text())
    dup = dict(records[0], id="dup")                                   # same style -> same folder
    missing = dict(records[0], id="gone", style="other", audio="nope.wav")
    (tmp_path / "Extra_test.json").write_text(json.dumps(records + [dup, missing]))
    out = tmp_path / "out"
    code = inference_main(["--run", str(run), "--out", str(out), "--exp-name", "e", "--device", "cpu", "--render",
                           "--set", f"data.test=[{tmp_path / 'Extra_test.json'}]"])
    text = capsys.readouterr().out
    assert code == 1 and "records written: 1" in text and "skipped: 2" in text
    assert "nope.wav: audio: file not found" in text and "Extra_test.json[1]: style" in text
    assert len(list((out / "e" / "Extra" / "mm1_t_passionate").iterdir())) == 25
    if render_available() is not None:      # pyrender is an optional extra: skipped cleanly without it
        assert not list(out.rglob("*.mp4")) and "render skipped" in caplog.text
    assert inference_main(["--run", str(run / "nothing")]) == 2
