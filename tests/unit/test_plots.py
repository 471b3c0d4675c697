"""A run's curves (controllers/common/plots.py): the panels drawn are those whose figures the
run logged, each series at its steps with the non-finite values left out."""
import json
import logging

from PIL import Image

from r1ray.controllers.common.plots import GRPO_PANELS, _named, draw, draw_curves, series


def _records() -> list[dict]:
    out = []
    for s in range(1, 6):
        rec = {"step": s, "loss": 0.1 * s, "reward/mean": s / 10, "reward/accuracy/mean": s / 20,
               "reward/accuracy/calls": 8, "grad_norm": float("nan") if s == 3 else 1.0 + s,
               "util/learner/idle_ratio": 0.2, "util/generator/idle_ratio": 0.4, "samples": 16}
        if s % 2 == 0:
            rec["eval/heldout/pass@1"] = 0.25 * s
        out.append(rec)
    return out[::-1]  # series come out in step order whatever the file's order


def test_series_keeps_the_finite_values_of_the_wanted_keys_in_step_order():
    assert series(_records(), _named("grad_norm")) == {"grad_norm": ([1, 2, 4, 5], [2.0, 3.0, 5.0, 6.0])}
    assert series(_records(), _named("eval/heldout/pass@1")) == {"eval/heldout/pass@1": ([2, 4], [0.5, 1.0])}
    rewards = series(_records(), GRPO_PANELS[0][1])
    assert set(rewards) == {"reward/mean", "reward/accuracy/mean"}  # not .../calls


def test_only_the_panels_a_run_logged_are_drawn(tmp_path):
    path = tmp_path / "curves.png"
    drawn = draw(_records(), GRPO_PANELS, "GRPO", path)
    assert drawn == ["reward (mean)", "benchmarks: pass@1", "loss", "gradient norm", "idle ratio"]
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > image.height > 200
    assert not list(tmp_path.glob(".*.tmp"))  # written beside, then renamed
    assert draw([{"step": 1, "samples": 3}], GRPO_PANELS, "GRPO", tmp_path / "none.png") == []
    assert not (tmp_path / "none.png").exists()


def test_draw_curves_draws_each_jsonl_of_a_run_and_never_raises(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    (tmp_path / "sft_metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 2 / s, "lr": 1e-5, "throughput/tokens_per_s": 100.0 * s}) + "\n"
        for s in range(1, 4)))
    assert draw_curves(tmp_path) == [tmp_path / "curves.png", tmp_path / "sft_curves.png"]
    (tmp_path / "curves.png").unlink()
    (tmp_path / "curves.png").mkdir()  # cannot be written: warned, and the other picture still drawn
    with caplog.at_level(logging.WARNING, logger="r1ray"):
        assert draw_curves(tmp_path) == [tmp_path / "sft_curves.png"]
    assert any("curves.png: not drawn (IsADirectoryError" in r.getMessage() for r in caplog.records)
