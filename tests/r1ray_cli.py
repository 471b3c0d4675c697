"""The CLI as a user runs it, for the e2e tests: ``python -m r1ray.controllers.cli ARGS`` in a
process of its own, with the environment a CPU run needs and tests/ importable (the plug-in
reward functions some runs name). ``run`` waits and returns the CompletedProcess (also the
``r1ray`` fixture of tests/e2e); ``cmd`` and ``env`` are for a run the test watches (Popen)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
R1RAY = [sys.executable, "-m", "r1ray.controllers.cli"]
# No dashboard, no SFT probe stop: what most CLI tests add to a recipe
QUIET = ["--set", "ray.dashboard=false", "--set", "sft.stop_at_pass_rate=null"]


def cmd(*args: str) -> list[str]:
    return [*R1RAY, *map(str, args)]


def env(**extra: str) -> dict:
    """This process's environment, for a CPU run that starts its own Ray (``RAY_ADDRESS``
    removed unless given in ``extra``)."""
    out = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "DS_ACCELERATOR": "cpu"}
    out.pop("RAY_ADDRESS", None)
    return {**out, **extra}


def run(*args: str, timeout: float = 600, extra_env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """``r1ray ARGS``, waited for; stdout and stderr captured as text."""
    return subprocess.run(cmd(*args), capture_output=True, text=True, timeout=timeout, env=env(**(extra_env or {})),
                          cwd=cwd)
