"""The CLI refuses a bad recipe before Ray starts, and `r1ray check` prints the resolved one."""
import r1ray_cli
import yaml

TINY = "configs/tiny-cpu.yaml"


def test_cli_rejects_bad_config_before_ray_starts(tmp_path):
    out = tmp_path / "run"
    proc = r1ray_cli.run("train", TINY, "--output-dir", out, "--set", "learner.zero_stage=4", timeout=120)
    assert proc.returncode == 2
    assert "learner.zero_stage" in proc.stderr and "one of 0, 1, 2, 3" in proc.stderr
    assert not out.exists()  # nothing was created, no actor started
    ok = r1ray_cli.run("check", TINY, "--set", "grpo.steps=3", timeout=120)
    assert ok.returncode == 0 and yaml.safe_load(ok.stdout)["grpo"]["steps"] == 3
