"""Rewards that check a math answer with math-verify: `accuracy`, `cosine`,
`length` (Open-R1's accuracy_reward, get_cosine_scaled_reward, len_reward).

math-verify (and sympy behind it) is imported on first use, not at import
time, so that a verifier worker or a scorer that never checks math starts
fast. A gold solution that math-verify cannot parse makes the sample "not
applicable": its score is None, which TRL and our scorer skip, instead of
a 0 that would punish the policy for a bad label.
"""

from __future__ import annotations

import functools
import logging
import math
import threading

from . import _checks
from ._content import column, texts

logger = logging.getLogger("r1ray.rewards")

# math-verify's own per-call timeouts (signal.alarm, whole seconds). They
# only work in a main thread; elsewhere we pass None and rely on the
# caller's wall-clock limit (VerifierPool kills the worker).
_MATH_VERIFY_TIMEOUT_S = 5


class _DropEquationsDeprecation(logging.Filter):
    # latex2sympy2 logs this on every normalisation when equations=True,
    # which Open-R1's answer config asks for (it still trims "a = b = 3"
    # to "3"). One warning per completion is noise, not news.
    def filter(self, record: logging.LogRecord) -> bool:
        return "equations=True in NormalizationConfig is deprecated" not in record.getMessage()


@functools.lru_cache(maxsize=1)
def _math_verify():
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    logging.getLogger("latex2sympy2_extended.math_normalization").addFilter(_DropEquationsDeprecation())
    gold_config = [LatexExtractionConfig()]
    answer_config = [
        LatexExtractionConfig(
            # Answers must be well-formed LaTeX: no "\frac12" repairs.
            normalization_config=NormalizationConfig(
                nits=False,
                malformed_operators=False,
                basic_latex=True,
                equations=True,
                boxed="all",
                units=True,
            ),
            boxed_match_priority=0,  # a \boxed{} answer wins over any other match
            try_extract_without_anchor=False,
        ),
        ExprExtractionConfig(),
    ]
    return parse, verify, gold_config, answer_config


def _timeout() -> int | None:
    return _MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def parse_gold(solution) -> list | None:
    """The parsed gold answer, or None when math-verify finds nothing in it."""
    parse, _, gold_config, _ = _math_verify()
    parsed = parse(str(solution), extraction_config=gold_config, extraction_mode="first_match",
                   parsing_timeout=_timeout())
    return parsed or None


def answer_is_correct(gold: list, text: str) -> bool:
    """verify(gold, answer): gold first, because math-verify is not symmetric."""
    parse, verify, _, answer_config = _math_verify()
    answer = parse(text, extraction_config=answer_config, extraction_mode="first_match",
                   parsing_timeout=_timeout())
    try:
        return bool(verify(gold, answer, timeout_seconds=_timeout()))
    except Exception:  # math-verify catches its own errors; this is a last guard
        logger.debug("math-verify raised while verifying an answer", exc_info=True)
        return False


def accuracy_reward(completions, **kwargs) -> list[float | None]:
    """1.0 if the answer equals the `solution` column, 0.0 if not, None if the gold is unparseable."""
    rewards: list[float | None] = []
    for text, solution in zip(texts(completions), column(kwargs, "solution", "accuracy")):
        gold = parse_gold(solution)
        rewards.append(None if gold is None else float(answer_is_correct(gold, text)))
    return rewards


def make_cosine(
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    max_len: int = 1000,
):
    """Cosine-scaled correctness (arXiv:2502.03373): short right answers earn
    most, short wrong answers lose most. Length is in characters, as in Open-R1.
    """
    name = "cosine"
    min_value_wrong = _checks.number(name, "min_value_wrong", min_value_wrong)
    max_value_wrong = _checks.number(name, "max_value_wrong", max_value_wrong)
    min_value_correct = _checks.number(name, "min_value_correct", min_value_correct)
    max_value_correct = _checks.number(name, "max_value_correct", max_value_correct)
    max_len = _checks.integer(name, "max_len", max_len, minimum=1)

    def cosine_scaled_reward(completions, **kwargs) -> list[float | None]:
        rewards: list[float | None] = []
        for text, solution in zip(texts(completions), column(kwargs, "solution", name)):
            gold = parse_gold(solution)
            if gold is None:
                rewards.append(None)
                continue
            if answer_is_correct(gold, text):
                start, end = max_value_correct, min_value_correct
            else:
                start, end = min_value_wrong, max_value_wrong
            # Clamped, unlike Open-R1: cos() is periodic, and an unclamped
            # schedule would start rewarding length again past max_len.
            progress = min(1.0, len(text) / max_len)
            rewards.append(end + 0.5 * (start - end) * (1.0 + math.cos(progress * math.pi)))
        return rewards

    cosine_scaled_reward.warm_up = _math_verify
    return cosine_scaled_reward


def length_reward(completions, **kwargs) -> list[float | None]:
    """Kimi 1.5's length reward (arXiv:2501.12599), relative to the batch.

    With lambda = 0.5 - (len - min_len) / (max_len - min_len) over the
    completions passed together: a right answer scores lambda, a wrong one
    min(0, lambda). All the same length: 0 for all. The score depends on
    the sibling completions, hence `group_relative` below.
    """
    contents = texts(completions)
    correct: list[bool | None] = []
    for text, solution in zip(contents, column(kwargs, "solution", "length")):
        gold = parse_gold(solution)
        correct.append(None if gold is None else answer_is_correct(gold, text))
    if not contents:
        return []
    lengths = [len(t) for t in contents]
    shortest, longest = min(lengths), max(lengths)
    rewards: list[float | None] = []
    for length, ok in zip(lengths, correct):
        if ok is None:
            rewards.append(None)  # unparseable gold: not applicable (still counts for min/max)
        elif longest == shortest:
            rewards.append(0.0)
        else:
            lam = 0.5 - (length - shortest) / (longest - shortest)
            rewards.append(lam if ok else min(0.0, lam))
    return rewards


# VerifierPool reads these: `warm_up` runs before its clock starts (the
# sympy import is slow), and a `group_relative` function is scored on the
# whole group in one call instead of one completion at a time.
accuracy_reward.warm_up = _math_verify
length_reward.warm_up = _math_verify
length_reward.group_relative = True
