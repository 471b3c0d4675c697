"""Benchmark answer judges: the extracted answer and whether it is right, as Open-R1 evaluates.

``math_answer`` follows Open-R1's evaluation metric (its ``evaluate.py`` on lighteval): the gold
answer is parsed as LaTeX (a bare ``\\frac{14}{3}`` or ``204`` is tried as ``$...$`` and then as
an expression), the prediction with expression and LaTeX extraction, ``\\boxed{}`` first
(``boxed_match_priority=0``), the first match wins; equality is math-verify's ``verify(gold,
pred)`` to 5 decimals. ``choice_answer`` reads a multiple-choice letter (GPQA-Diamond) in the
forms models write it: ``Answer: C``, ``**Answer:** (C)``, ``\\boxed{C}``, ``the answer is
(C)``, a last line that is only the letter.

Both are reward functions in TRL's convention (score 1.0 / 0.0, None when the gold cannot be
parsed) that also return the extracted answer: ``with_answers = True`` makes the
``VerifierPool`` keep it, so evaluation can take majority votes (maj@k) over the canonical
answers and write them per completion. Both read the gold from the ``answer`` column.
"""
from __future__ import annotations

import functools
import re

from ._content import column, texts
from .math_rewards import _timeout

CHOICE_LETTERS = "ABCD"
_FLOAT_ROUNDING = 5  # lighteval's precision=5, as Open-R1 configures it


@functools.lru_cache(maxsize=1)
def _configs():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    return parse, verify, [LatexExtractionConfig()], [ExprExtractionConfig()], \
        [ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0)]


def parse_gold_answer(gold) -> list | None:
    """The gold answer parsed as LaTeX; a bare answer (``\\frac{1}{2}``, ``204``) is tried
    between ``$`` and then as an expression. None: math-verify finds nothing."""
    parse, _, latex, expr, _ = _configs()
    text = str(gold).strip()
    tries = [(text, latex)]
    if "\\" in text or not re.search(r"[A-Za-z]{2,}", text):  # LaTeX without its $; prose is not a product n*o*...
        tries.append((f"${text}$", latex))
    tries.append((text, expr))
    for candidate, config in tries:
        parsed = parse(candidate, extraction_config=config, extraction_mode="first_match", fallback_mode="no_fallback",
                       parsing_timeout=_timeout())
        if parsed:
            return parsed
    return None


def extract_math(text: str) -> list:
    """math-verify's parse of a completion with Open-R1's evaluation config ([] when nothing is found)."""
    parse, _, _, _, pred = _configs()
    return parse(text, extraction_config=pred, extraction_mode="first_match", parsing_timeout=_timeout())


def canonical(parsed: list) -> str | None:
    """The answer majority votes count: math-verify's sympy form (``\\frac{1}{2}``, ``0.5`` and
    ``1/2`` are one answer), else the extracted string."""
    if not parsed:
        return None
    expr = parsed[0]
    try:  # math-verify leaves some forms unevaluated: 50\% is 50*(1/100), \sqrt{8} stays sqrt(8)
        expr = expr.doit() if hasattr(expr, "doit") else expr
    except Exception:  # noqa: BLE001 - keep the form as parsed
        pass
    return str(expr)


def judge_math(gold: list, text: str) -> tuple[bool, str | None]:
    """(right, canonical answer) of one completion against a parsed gold answer."""
    _, verify, _, _, _ = _configs()
    pred = extract_math(text)
    if not pred:
        return False, None
    try:
        right = bool(verify(gold, pred, float_rounding=_FLOAT_ROUNDING, timeout_seconds=_timeout()))
    except Exception:  # noqa: BLE001 - math-verify catches its own errors; this is a last guard
        right = False
    return right, canonical(pred)


def math_answer(completions, **kwargs) -> list[tuple[float | None, str | None]]:
    """(1.0 or 0.0, the canonical answer) per completion; (None, answer) when the gold is unparseable."""
    out = []
    for text, gold_text in zip(texts(completions), column(kwargs, "answer", "math_answer")):
        gold = parse_gold_answer(gold_text)
        if gold is None:
            out.append((None, canonical(extract_math(text))))
            continue
        right, answer = judge_math(gold, text)
        out.append((float(right), answer))
    return out


def boxed_math_answer(completions, **kwargs) -> list[tuple[float | None, str | None]]:
    """``math_answer`` for a completion that puts its answer in ``\\boxed{}``; one without any
    scores 0.0 with no answer (rejection sampling of distilled traces keeps only boxed ones, as
    Open-R1 filtered OpenR1-Math)."""
    comps = texts(completions)
    out = math_answer(completions, **kwargs)
    return [(0.0 if score is not None else None, None) if "\\boxed" not in text else (score, answer)
            for text, (score, answer) in zip(comps, out)]


_LETTER = r"\(?\s*\\?(?:text\{|textbf\{|mathrm\{)?\s*\(?([A-D])\)?\s*\}?\s*\)?"
_BOXED = re.compile(r"\\boxed\{\s*(?:\\text\{|\\textbf\{|\\mathrm\{)?\s*\(?([A-D])\)?\s*\}?\s*\}")
_ANCHORED = re.compile(r"(?i:answer|option|choice)(?:\s+is)?\s*[*_]*\s*(?::|is|=|-)?\s*[*_$]*\s*" + _LETTER + r"(?![A-Za-z])")
# A lower-case letter only right after "answer:" and alone (not "the answer is a tough one").
_LOWER = re.compile(r"(?i:answer)\s*[*_]*\s*:\s*[*_]*\s*\(?([a-d])\)?(?=[\s.*_]*$|[\s.*_]*\n)", re.MULTILINE)
_BARE_LINE = re.compile(r"^[\s*_$.:]*\(?\s*([A-D])\s*\)?[\s*_$.:]*$")


def extract_letter(text: str, letters: str = CHOICE_LETTERS) -> str | None:
    """The chosen option's letter: the last ``\\boxed{}`` letter, else the last one after
    "answer"/"option"/"choice" (``Answer: C``, ``**Answer:** (C)``, ``the answer is c``), else a
    last non-empty line that is only a letter; None when there is none."""
    for pattern in (_BOXED, _ANCHORED, _LOWER):
        found = [m.group(1).upper() for m in pattern.finditer(text)]
        found = [x for x in found if x in letters]
        if found:
            return found[-1]
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if lines and (m := _BARE_LINE.match(lines[-1])) and m.group(1) in letters:
        return m.group(1)
    return None


def choice_answer(completions, **kwargs) -> list[tuple[float | None, str | None]]:
    """(1.0 or 0.0, the letter read) per completion against the ``answer`` column's letter."""
    out = []
    for text, gold in zip(texts(completions), column(kwargs, "answer", "choice_answer")):
        gold = str(gold).strip().upper() if gold is not None else ""
        letter = extract_letter(text)
        out.append((None if gold not in CHOICE_LETTERS or not gold else float(letter == gold), letter))
    return out


math_answer.with_answers = choice_answer.with_answers = boxed_math_answer.with_answers = True
math_answer.warm_up = boxed_math_answer.warm_up = _configs
