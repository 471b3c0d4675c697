"""A user's tools and environments, referenced by import path in the tests: tools with type
hints and an Args: docstring (transformers' get_json_schema convention)."""
import os
import time
from pathlib import Path


def boom(x: int) -> int:
    """Always raises.

    Args:
        x: anything
    """
    raise ZeroDivisionError(f"{x} / 0")


def sleepy(seconds: float) -> str:
    """Sleeps, then answers.

    Args:
        seconds: how long to sleep
    """
    time.sleep(seconds)
    return "awake"


def chatty(megabytes: int) -> None:
    """Prints a lot and returns nothing.

    Args:
        megabytes: how much to print
    """
    print("x" * (megabytes * 2**20))


def slow_calculator(expression: str) -> str:
    """The calculator, after saying that it started (a file named by R1RAY_TEST_TOOL_STARTED) and
    waiting for R1RAY_TEST_TOOL_GO to exist (at most 30 s).

    Args:
        expression: arithmetic
    """
    from r1ray.actors.tools import calculator

    Path(os.environ["R1RAY_TEST_TOOL_STARTED"]).touch()
    for _ in range(300):
        if Path(os.environ["R1RAY_TEST_TOOL_GO"]).exists():
            break
        time.sleep(0.1)
    return calculator(expression)


def no_docstring(x: int) -> int:
    return x


class Checker:
    """An environment that answers back: the row's problem as the opening turn; after each
    answer, "done" when it holds the row's solution, else a user turn saying it is wrong."""

    def reset(self, row: dict) -> list[dict]:
        self.solution, self.steps = row["solution"], 0
        return [{"role": "user", "content": row["problem"]}]

    def step(self, messages: list[dict]) -> tuple[list[dict], bool]:
        self.steps += 1
        assert messages[-1]["role"] == "assistant"
        if self.solution in messages[-1]["content"]:
            return [], True
        return [{"role": "user", "content": "wrong, try again"}], False


class Broken(Checker):
    """An environment whose step raises."""

    def step(self, messages: list[dict]) -> tuple[list[dict], bool]:
        raise KeyError("score")


class NoStep:
    def reset(self, row: dict) -> list[dict]:
        return []


class NeedsLevel(Checker):
    """An environment that reads a column the tiny world does not have."""

    def reset(self, row: dict) -> list[dict]:
        return [{"role": "user", "content": f"level {row['level']}"}]
