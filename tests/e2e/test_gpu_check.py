"""benchmarks/gpu_check.py, the script for the GPU machine, kept working: its --smoke mode runs
every check on a tiny model on this CPU (gloo), and each check that has a verdict passes."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_every_check_on_a_tiny_model(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    checks = result["checks"]
    assert result["smoke"] and len(checks) == 10
    verdicts = {name: c["ok"] for name, c in checks.items() if c["ok"] is not None}
    assert len(verdicts) == 6 and all(verdicts.values()), verdicts
    accumulation = [c for name, c in checks.items() if name.startswith("grad accumulation")]
    assert len(accumulation) == 3 and min(c["cosine"] for c in accumulation) > 0.98
    assert "| check | result |" in proc.stdout
