"""Resume tests: kill a tool at a fixed point of its work instead of from outside after polling.

A kill from outside lands wherever the tool's next item has got to, which depends on the machine's
speed and load; here the tool SIGKILLs itself right after appending its first matching manifest row
(``dualforce_mega.preprocess.manifest.Manifest``, used by data_tools.prepare and the LatentSync runner).
"""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

_WRAPPER = """
import os, runpy, signal, sys
from dualforce_mega.preprocess.manifest import Manifest
step, kind, status, module = sys.argv[1:5]
add = Manifest.add
def add_then_die(self, step_, kind_, item, status_, *args, **kwargs):
    row = add(self, step_, kind_, item, status_, *args, **kwargs)
    if (step_, kind_, status_) == (step, kind, status):
        os.kill(os.getpid(), signal.SIGKILL)
    return row
Manifest.add = add_then_die
sys.argv = [module] + sys.argv[5:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_killed_after_first_row(module: str, args: list[str], step: str, kind: str, cwd: Path,
                               env: Optional[dict] = None, status: str = "ok",
                               timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m module *args``, killed (SIGKILL) right after its first manifest row (step, kind, status)."""
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, step, kind, status, module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, f"{module} was not killed (exit {proc.returncode}):\n" \
                                               f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc
