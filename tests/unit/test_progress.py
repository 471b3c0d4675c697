"""Progress output fit for where it goes: plain lines off a terminal, a bar on one."""
import io
import os
import re

import pytest

from r1ray.cluster.runtime import actor_env
from r1ray.controllers.common.progress import Lines, on_terminal, progress, quiet_library_bars


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_progress_is_a_plain_line_every_5_percent_and_at_the_end():
    out, clock = io.StringIO(), Clock()
    with Lines(100, "GRPO (max_staleness=1)", "step", stream=out, clock=clock) as bar:
        for step in range(1, 98):
            clock.t += 2.0
            bar.set_postfix(reward=f"{step / 100:.3f}", loss="0.0100", refresh=False)
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 19 + 1  # steps 5, 10, ..., 95, then 97 at the close
    assert re.fullmatch(r"\d\d:\d\d:\d\d GRPO \(max_staleness=1\): 5/100 steps \(5%\), reward=0\.050, loss=0\.0100 "
                        r"\| 10 s, 2 s/step, ~190 s left", lines[0]), lines[0]
    assert lines[-1].split(" ", 1)[1] == ("GRPO (max_staleness=1): 97/100 steps (97%), reward=0.970, loss=0.0100 "
                                         "| 194 s, 2 s/step, ~6 s left")


def test_a_slow_run_still_prints_once_a_minute_and_a_resumed_one_counts_from_where_it_was():
    out, clock = io.StringIO(), Clock()
    bar = Lines(1000, "SFT", "step", initial=400, stream=out, clock=clock)
    for _ in range(3):
        clock.t += 70.0  # slower than a line per 50 steps would show
        bar.update(1)
    bar.close()
    bar.close()  # closing twice prints nothing more
    lines = [line.split(" ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines == ["SFT: 401/1000 steps (40%) | 70 s, 70 s/step, ~41930 s left",
                     "SFT: 402/1000 steps (40%) | 140 s, 70 s/step, ~41860 s left",
                     "SFT: 403/1000 steps (40%) | 210 s, 70 s/step, ~41790 s left"]


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    assert isinstance(progress(10, "eval", "sample", stream=io.StringIO()), Lines)
    terminal = Terminal()
    assert on_terminal(terminal) and not on_terminal(io.StringIO())
    with progress(10, "eval", "sample", stream=terminal) as bar:
        assert not isinstance(bar, Lines)
        bar.update(10)
    assert "\r" in terminal.getvalue() and "10/10" in terminal.getvalue()


def test_library_bars_are_switched_off_off_a_terminal_and_in_every_actor(monkeypatch):
    from transformers.utils import logging as hf_logging

    for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(key, raising=False)
        assert actor_env(on_gpu=False)[key] == actor_env(on_gpu=True)[key] == "1"
    try:
        quiet_library_bars()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
        assert not hf_logging.is_progress_bar_enabled()
        bar = hf_logging.tqdm(range(3), file=(out := io.StringIO()))
        list(bar)
        assert out.getvalue() == ""
    finally:
        for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
            os.environ.pop(key, None)
        hf_logging.enable_progress_bar()
        import datasets
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()
        datasets.enable_progress_bars()


@pytest.mark.parametrize("total", [0, 1])
def test_tiny_totals_print_sensibly(total):
    out = io.StringIO()
    with Lines(total, "SFT", "step", stream=out, clock=Clock()) as bar:
        bar.update(total)
    assert out.getvalue().count("\n") == (1 if total else 0)
