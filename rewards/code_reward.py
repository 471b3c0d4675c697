"""`code`: run the completion's last ```python block against the sample's
test cases in the local sandbox; the score is the fraction that pass.

Test cases come from a `verification_info` column in Open-R1's shape:
{"language": "python", "test_cases": [{"input": str, "output": str,
"type": "stdin_stdout"}]} (a JSON string of that is accepted too).
Open-R1 sends the same script to E2B; we run it here, see sandbox.py.
"""

from __future__ import annotations

import json
import re

from . import _checks
from ._content import column, texts
from .sandbox import Limits, isolation, run_python

_PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    """The last ```python block, or "" when there is none."""
    blocks = _PYTHON_BLOCK.findall(text)
    return blocks[-1] if blocks else ""


def same_output(actual: str, expected: str) -> bool:
    """Line by line, ignoring surrounding whitespace on each line and blank
    lines at either end. Stricter than Open-R1's zip(), which passes a
    program that prints only the first of several expected lines.
    """
    return [line.strip() for line in actual.strip().splitlines()] == \
        [line.strip() for line in expected.strip().splitlines()]


def _test_cases(info, reward: str) -> list[dict]:
    if isinstance(info, str):
        info = json.loads(info)
    language = info.get("language", "python")
    if language != "python":
        raise ValueError(f"reward '{reward}' runs only Python locally, got language {language!r}")
    cases = info.get("test_cases") or []
    for case in cases:
        if case.get("type", "stdin_stdout") != "stdin_stdout":
            raise ValueError(f"reward '{reward}' supports only stdin_stdout test cases, got {case.get('type')!r}")
    return cases


def make_code(timeout_s: float = 5.0, memory_mb: int = 512, max_processes: int = 32):
    """Build the `code` reward.

    timeout_s: wall clock per test case (CPU time is capped just above it).
    memory_mb: address-space limit of the program.
    max_processes: processes and threads the program may have.

    A program that times out on one test case is not run on the rest: a
    program that hangs once usually hangs on every input, and this keeps
    one bad completion near timeout_s instead of timeout_s per case. Give
    VerifierPool a timeout_s above (test cases x this timeout_s).
    """
    name = "code"
    limits = Limits(
        timeout_s=_checks.positive(name, "timeout_s", timeout_s),
        memory_mb=_checks.integer(name, "memory_mb", memory_mb, minimum=16),
        max_processes=_checks.integer(name, "max_processes", max_processes, minimum=1),
    )

    def code_reward(completions, **kwargs) -> list[float | None]:
        rewards: list[float | None] = []
        for text, info in zip(texts(completions), column(kwargs, "verification_info", name)):
            cases = _test_cases(info, name)
            if not cases:
                rewards.append(None)  # nothing to check against: not applicable
                continue
            program = extract_code(text)
            rewards.append(_pass_rate(program, cases, limits) if program else 0.0)
        return rewards

    code_reward.warm_up = isolation  # VerifierPool: probe the sandbox before the clock starts
    return code_reward


def _pass_rate(program: str, cases: list[dict], limits: Limits) -> float:
    passed = 0
    for case in cases:
        result = run_python(program, str(case.get("input", "")), limits)
        if result.timed_out:
            break
        if result.returncode == 0 and same_output(result.stdout, str(case.get("output", ""))):
            passed += 1
    return passed / len(cases)
