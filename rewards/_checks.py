"""Parameter checks shared by the reward factories.

They run when `get()` builds a reward, so a bad recipe fails before any
actor starts, with a message that names the reward and the parameter.
"""

from __future__ import annotations

import numbers


def number(reward: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"reward '{reward}': parameter '{name}' must be a number, got {value!r}")
    return float(value)


def integer(reward: str, name: str, value, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"reward '{reward}': parameter '{name}' must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"reward '{reward}': parameter '{name}' must be >= {minimum}, got {value!r}")
    return int(value)


def positive(reward: str, name: str, value) -> float:
    value = number(reward, name, value)
    if not value > 0:
        raise ValueError(f"reward '{reward}': parameter '{name}' must be > 0, got {value!r}")
    return value
