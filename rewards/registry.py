"""Find a reward function by name: `get("accuracy")`, `get("cosine", max_len=2000)`
or a user's TRL-style function by import path, `get("my_pkg.rewards:fn")`.

Every reward follows TRL's calling convention,
`fn(completions, **kwargs) -> list[float | None]`, where kwargs hold
`prompts`, `completion_ids` and every dataset column, aligned with
`completions`. Parameters are checked here, when the reward is built, so
a bad recipe fails before training starts.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

from .answers import boxed_math_answer, choice_answer, math_answer
from .code_reward import make_code
from .formatting import format_reward, make_code_format, reasoning_steps_reward, tag_count_reward
from .judge import Judge
from .math_rewards import accuracy_reward, length_reward, make_cosine
from .partial import digit_match_reward
from .penalties import make_repetition_penalty, make_soft_overlong_punishment
from .plugins import import_callable

RewardFn = Callable[..., list]


def _without_params(fn: RewardFn) -> Callable[[], RewardFn]:
    def factory() -> RewardFn:
        return fn

    return factory


# name -> factory(**params) -> reward function. The factory's signature
# is the list of parameters the reward accepts.
_FACTORIES: dict[str, Callable[..., RewardFn]] = {
    "accuracy": _without_params(accuracy_reward),
    "boxed_math_answer": _without_params(boxed_math_answer),
    "choice_answer": _without_params(choice_answer),
    "code": make_code,
    "code_format": make_code_format,
    "cosine": make_cosine,
    "digit_match": _without_params(digit_match_reward),
    "format": _without_params(format_reward),
    "judge": Judge,  # an LLM grades each completion (rewards/judge.py)
    "length": _without_params(length_reward),
    "math_answer": _without_params(math_answer),
    "reasoning_steps": _without_params(reasoning_steps_reward),
    "repetition_penalty": make_repetition_penalty,
    "soft_overlong_punishment": make_soft_overlong_punishment,
    "tag_count": _without_params(tag_count_reward),
}

# Keyword arguments the caller fills in on every call; a parameter with
# one of these names would collide with them.
_CALL_ARGUMENTS = frozenset({"completions", "prompts", "completion_ids"})


def names() -> list[str]:
    """The registered reward names."""
    return sorted(_FACTORIES)


def get(name: str, **params) -> RewardFn:
    """The reward function called `name`, built with `params`.

    `name` is a registered name (see `names()`) or an import path
    "package.module:function" to a TRL-style function, which runs
    unchanged (with `params` bound by functools.partial).
    Raises ValueError for an unknown name, TypeError or ValueError naming
    the parameter for bad parameters.
    """
    if not isinstance(name, str):
        raise TypeError(f"reward name must be a string, got {name!r}")
    if name in _FACTORIES:
        factory = _FACTORIES[name]
        accepted = list(inspect.signature(factory).parameters)
        _reject_unknown(name, params, accepted)
        return factory(**params)
    if ":" in name:
        return _from_import_path(name, params)
    raise ValueError(
        f"unknown reward {name!r}; accepted: {', '.join(names())}, "
        "or an import path 'package.module:function'"
    )


def _reject_unknown(name: str, params: dict, accepted: list[str]) -> None:
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"reward {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"accepted: {', '.join(accepted) if accepted else 'none'}"
        )


def _from_import_path(name: str, params: dict) -> RewardFn:
    target = import_callable(name, "reward")
    if not params:
        return target
    _check_plugin_params(name, target, params)
    bound = functools.partial(target, **params)
    functools.update_wrapper(bound, target)  # keeps __name__ (TRL logs it) and flags
    return bound


def _check_plugin_params(name: str, fn: Callable, params: dict) -> None:
    clashing = sorted(_CALL_ARGUMENTS & set(params))
    if clashing:
        raise ValueError(f"reward {name!r}: parameter {', '.join(map(repr, clashing))} is filled in on every call")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C function: nothing to check against
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return
    _reject_unknown(name, params, list(signature.parameters))
