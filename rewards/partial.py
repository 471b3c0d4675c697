"""`digit_match`: partial credit for a numeric answer, digit by digit.

Exact-match accuracy gives a policy that is almost never right no signal at all: every
completion in a group scores 0 and the group's advantages are 0. For answers that are
strings of digits (arithmetic, counting, the tiny recipe's reversed additions) the share
of digits in the right place says how close a wrong answer is, so GRPO can prefer the
closer ones. Use it beside `accuracy`, with a smaller weight, so that only a fully right
answer earns the full reward.

Score: the number of positions where the completion's last `\\boxed{...}` and the gold's
agree, divided by the longer of the two lengths (a missing or extra digit costs as a
wrong one). Both sides are compared as written, without spaces; no `\\boxed{}` in the
completion scores 0. A gold with no `\\boxed{}` is used whole; an empty gold is None
(not applicable). Linear in the text's length.
"""

from __future__ import annotations

import re

from ._content import column, texts

_TOKENS = re.compile(r"\\boxed\{|[{}]")


def last_boxed(text: str) -> str | None:
    """The contents of the last complete `\\boxed{...}` (braces balanced), or None.

    One pass with a stack of open braces, so an unclosed box, or a hundred thousand of
    them, costs linear time; the box that opens last among the complete ones wins.
    """
    stack: list[int] = []  # per open brace: where a box's contents start, or -1
    best: tuple[int, int] | None = None
    for m in _TOKENS.finditer(text):
        tok = m.group()
        if tok == "{":
            stack.append(-1)
        elif tok == "}":
            if stack:
                begin = stack.pop()
                if begin >= 0 and (best is None or begin > best[0]):
                    best = (begin, m.start())
        else:
            stack.append(m.end())
    return None if best is None else text[best[0] : best[1]]


def _normalise(s: str) -> str:
    return "".join(s.split())


def digit_match_reward(completions, **kwargs) -> list[float | None]:
    rewards: list[float | None] = []
    for text, solution in zip(texts(completions), column(kwargs, "solution", "digit_match")):
        gold_box = last_boxed(str(solution))
        gold = _normalise(gold_box if gold_box is not None else str(solution))
        if not gold:
            rewards.append(None)
            continue
        pred = last_boxed(text)
        if pred is None:
            rewards.append(0.0)
            continue
        pred = _normalise(pred)
        same = sum(1 for a, b in zip(gold, pred) if a == b)
        rewards.append(same / max(len(gold), len(pred)))
    return rewards
