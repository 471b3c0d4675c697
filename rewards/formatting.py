"""Rewards that read only the shape of the text: `format`, `tag_count`,
`reasoning_steps`, `code_format` (Open-R1's names and scores).

The two format checks are written as linear scans rather than the regexes
Open-R1 uses, because those regexes (`.*?` twice, anchored at both ends)
backtrack quadratically on a long completion full of `</think><answer>`
pairs. Each scan is equivalent to the regex quoted above it; the tests
check that on many generated strings.
"""

from __future__ import annotations

import re

from ._content import texts

# ^<think>\n?.*?\n?</think>\n?<answer>\n?.*?\n?</answer>$   (re.DOTALL)
FORMAT_PATTERN = r"^<think>\n?.*?\n?</think>\n?<answer>\n?.*?\n?</answer>$"

_OPEN = "<think>"
_CLOSE = "</answer>"
_SEPARATOR = re.compile(r"</think>\n?<answer>")


def _between_outer_tags(text: str) -> str | None:
    """What lies between a leading <think> and a closing </answer>, or None.

    `$` without MULTILINE also matches before one final newline, so a
    completion may end in "</answer>\\n". The optional newlines inside the
    pattern are absorbed by the `.*?` next to them, so they need no check.
    """
    if not text.startswith(_OPEN):
        return None
    body = text[:-1] if text.endswith("\n") else text
    if not body.endswith(_CLOSE) or len(body) < len(_OPEN) + len(_CLOSE):
        return None
    return body[len(_OPEN) : len(body) - len(_CLOSE)]


def matches_format(text: str) -> bool:
    middle = _between_outer_tags(text)
    return middle is not None and _SEPARATOR.search(middle) is not None


def matches_code_format(text: str, language: str) -> bool:
    """^<think>\\n?.*?\\n?</think>\\n?<answer>\\n?.*?```{language}.*?```.*?\\n?</answer>$"""
    middle = _between_outer_tags(text)
    if middle is None:
        return False
    sep = _SEPARATOR.search(middle)
    if sep is None:
        return False
    # The earliest separator leaves the longest answer, so it is the one to try.
    answer = middle[sep.end() :]
    fence = "```" + language
    start = answer.find(fence)
    return start >= 0 and answer.find("```", start + len(fence)) >= 0


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 if the completion is <think>…</think><answer>…</answer>, newlines optional."""
    return [1.0 if matches_format(t) else 0.0 for t in texts(completions)]


def tag_count_reward(completions, **kwargs) -> list[float]:
    """0.25 for each of the four tags that appears exactly once.

    Open-R1 counts the tags with their newlines ("<think>\\n", …); we count
    the bare tags so that this reward agrees with `format`, whose newlines
    are optional.
    """
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    return [sum(0.25 for tag in tags if t.count(tag) == 1) for t in texts(completions)]


# Open-R1's pattern, including its quirk: without re.MULTILINE, `^\d+\.`
# counts a numbered item only at the very start of the completion. Kept
# as is so scores compare with Open-R1 runs.
_STEP_PATTERN = re.compile(r"(Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,)")


def reasoning_steps_reward(completions, **kwargs) -> list[float]:
    """min(1, steps / 3): three or more step markers earn the full reward."""
    return [min(1.0, len(_STEP_PATTERN.findall(t)) / 3) for t in texts(completions)]


def make_code_format(language: str = "python"):
    """`code_format`: the format above with a ```{language} block in the answer.

    A `language` dataset column, when present, overrides the parameter per
    sample (Open-R1 does the same for mixed-language training).
    """
    if not isinstance(language, str) or not language.strip():
        raise ValueError(f"code_format: language must be a non-empty string, got {language!r}")

    def code_format_reward(completions, **kwargs) -> list[float]:
        languages = kwargs.get("language") or [language] * len(completions)
        return [
            1.0 if matches_code_format(t, lang) else 0.0
            for t, lang in zip(texts(completions), languages)
        ]

    return code_format_reward
