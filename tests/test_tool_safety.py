"""No tool writes into or deletes its own input; user errors end with one line (``--debug``: traceback);
``plan`` and ``eval.generate`` validate their inputs before doing any work (issue 15, probe cases).

The run directory here is built by the test in the trainer's layout (``config.yaml``, ``metrics.jsonl``,
synthetic shards, a ZeRO-3 tag in DeepSpeed's file layout via ``test_conversion_streaming.write_zero3``),
so ``export_bundle`` really exports it: without the overlap check, ``export_bundle RUN RUN --overwrite``
would replace the whole run by the bundle (the probe's data loss).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dualforce_mega.cli import run_main
from dualforce_mega.config import load_config, save_config
from dualforce_mega.fsutil import OverlapError, refuse_overlap

REPO = Path(__file__).resolve().parents[1]
OVERLAP = "a tool never writes into or deletes its input"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    from test_conversion_streaming import write_zero3

    run = tmp_path / "runs" / "x"
    shards = run / "synthetic_shards"
    shards.mkdir(parents=True)
    (shards / "index.json").write_text('{"shards": [], "stats": {"struct": {"mean": [0.0], "std": [1.0]}}}')
    (shards / "shard-000000.tar").write_bytes(b"tar bytes")
    save_config(load_config(None, ["model.preset=tiny", f"run.dir={run}", f"data.shards={shards}"]),
                run / "config.yaml")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    write_zero3(run / "checkpoints" / "step00000001", {"a.weight": (3, 2), "a.bias": (3,)}, world=2)
    return run


def _export(run: Path, out: Path, *extra: str) -> int:
    from checkpoints_conv.export_bundle import main
    return run_main(main, [str(run), str(out), *extra])


def test_export_bundle_into_its_own_run_is_refused(run_dir: Path, capsys) -> None:
    before = _tree(run_dir.parent)
    for out in (run_dir, run_dir / "checkpoints", run_dir / "bundle", run_dir.parent,
                run_dir / "synthetic_shards"):
        assert _export(run_dir, out, "--overwrite") == 2, out
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: OUT_DIR") and OVERLAP in err[0], err
        assert _tree(run_dir.parent) == before, out          # nothing deleted, nothing written
    # the same input exports fine to a place outside it (so the refusals above guarded a real export)
    assert _export(run_dir, run_dir.parent.parent / "bundle") == 0
    assert (run_dir.parent.parent / "bundle" / "model.safetensors").is_file()
    assert _tree(run_dir.parent) == before


def test_export_bundle_refuses_to_replace_the_training_shards(run_dir: Path, tmp_path: Path, capsys) -> None:
    """data.shards outside the run: an OUT that is (or contains) the shard folder would be deleted."""
    shards = tmp_path / "data" / "shards"
    (run_dir / "synthetic_shards").rename(shards.parent.mkdir(parents=True) or shards)
    save_config(load_config(str(run_dir / "config.yaml"), [f"data.shards={shards}"]), run_dir / "config.yaml")
    assert _export(run_dir, shards.parent, "--overwrite") == 2
    assert "the input data.shards" in capsys.readouterr().err
    assert (shards / "shard-000000.tar").is_file()


def test_cli_user_error_is_one_line_and_debug_shows_the_traceback(run_dir: Path) -> None:
    cmd = [sys.executable, "-m", "checkpoints_conv.export_bundle", str(run_dir), str(run_dir), "--overwrite"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: OUT_DIR")
    assert "Traceback" not in out.stderr
    debug = subprocess.run(cmd + ["--debug"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "OverlapError" in debug.stderr
    assert (run_dir / "checkpoints" / "latest").is_file()


def test_overlap_relations(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(src)
    for out in (src, src / "sub", src / "new" / "file", tmp_path / "link" / "x"):
        with pytest.raises(OverlapError):
            refuse_overlap({"OUT": out}, {"SRC": src})
    refuse_overlap({"OUT": tmp_path}, {"SRC": src})                       # adds files next to the input
    with pytest.raises(OverlapError, match="contains the input"):
        refuse_overlap({"OUT": tmp_path}, {"SRC": src}, replaced=True)  # ... but would delete it if replaced
    refuse_overlap({"OUT": tmp_path / "src2"}, {"SRC": src, "none": None}, replaced=True)


def _tools(tmp_path: Path) -> list[tuple[str, list[str], Path]]:
    """(module, argv, input) of every tool with an output inside (or equal to) its input."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.png").write_bytes(b"x")
    (d / "a.wav").write_bytes(b"x")
    (d / "model.safetensors").write_bytes(b"x")
    return [
        ("checkpoints_conv.zero_to_safetensors", [str(d), str(d / "out")], d),
        ("checkpoints_conv.import_wan", [str(d), str(d)], d),
        ("checkpoints_conv.export_wan", [str(d), str(d / "wan")], d),
        ("data_tools.prepare", ["--src", str(d), "--out", str(d / "prepared")], d),
        ("data_tools.download", ["hdtf", "--meta", str(d), "--out", str(d / "clips")], d),
        ("eval.generate", ["--batch", str(d), "--out-dir", str(d), "--random-preset", "tiny"], d),
        ("eval.generate", ["--ref", str(d / "a.png"), "--audio", str(d / "a.wav"), "--out", str(d / "a.wav"),
                           "--random-preset", "tiny"], d / "a.wav"),
        ("eval.run_eval", ["--generated", str(d), "--out", str(d / "results"), "--random-models", "tiny"], d),
        ("eval.baselines.latentsync", ["--input_dir", str(d), "--output_dir", str(d / "o"), "--unet_config_path",
                                       str(tmp_path / "unet.yaml"), "--random-models", "tiny"], d),
        ("eval.metrics.lve", ["--pred", str(d), "--gt", str(tmp_path), "--lip-vertices", str(tmp_path / "l.txt"),
                              "--out", str(d / "lve.json")], d),
    ]


def test_no_tool_writes_into_its_input(tmp_path: Path, capsys, caplog) -> None:
    import importlib

    for module, argv, inp in _tools(tmp_path):
        before = _tree(tmp_path / "in")
        main = importlib.import_module(module).main
        caplog.clear()
        assert run_main(main, argv) == 2, module
        # one line: printed by run_main, or logged by a tool that reports its own errors (run_eval)
        lines = capsys.readouterr().err.strip().splitlines() + [r.getMessage() for r in caplog.records
                                                               if r.levelname == "ERROR"]
        assert lines and OVERLAP in lines[-1], (module, lines)
        assert _tree(tmp_path / "in") == before, module


def test_plan_rejects_impossible_hardware(capsys) -> None:
    from dualforce_mega.plan import main
    for flags, key in ((["--gpus", "0"], "--gpus"), (["--gpu-mem-gib", "-5"], "--gpu-mem-gib"),
                       (["--nodes", "0"], "--nodes"), (["--sp", "0"], "--sp"), (["--micro-batch", "0"], "--micro-batch")):
        assert main(["--preset", "tiny", "--frames", "33", *flags]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {key}:") and "must be positive" in err, err


def test_generate_checks_inputs_before_building_the_model(tmp_path: Path, monkeypatch, capsys) -> None:
    import eval.generate as gen
    from test_generate import write_inputs

    def no_model(*a, **k):
        raise AssertionError("the model was built before the inputs were checked")

    monkeypatch.setattr(gen, "build_pipeline", no_model)
    image, audio = write_inputs(tmp_path, "a", seconds=0.2)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    cases = [
        (["--ref", str(tmp_path / "missing.png"), "--audio", str(audio)], "missing.png: image file not found"),
        (["--ref", str(broken), "--audio", str(audio)], "broken.png: cannot read image"),
        (["--ref", str(image), "--audio", str(broken)], "broken.png: cannot read audio"),
        (["--ref", str(image), "--audio", str(audio), "--kp-canonical", str(tmp_path / "kp.npy")],
         "--kp-canonical"),
    ]
    for flags, message in cases:
        rc = run_main(gen.main, [*flags, "--out", str(tmp_path / "o.mp4"), "--random-preset", "tiny"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and message in err[-1], (flags, err)
        assert not (tmp_path / "o.mp4").exists()
