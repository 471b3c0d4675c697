"""The reward functions in-process: hand-computed scores, TRL's calling
convention, the registry's errors. VerifierPool and the sandbox limits
are in test_rewards_isolation.py.
"""
import json
import math
import random
import re
import sys
import textwrap

import pytest
from fake_openai import FakeOpenAI

from r1ray import rewards
from r1ray.rewards.formatting import FORMAT_PATTERN, matches_code_format, matches_format

pytestmark = pytest.mark.timeout(60)

THINK_ANSWER = "<think>\nreasoning\n</think>\n<answer>\n42\n</answer>"


def chat(text):
    """A conversational completion as TRL passes it."""
    return [{"role": "assistant", "content": text}]


# ---- registry -----------------------------------------------------------


def test_names_lists_every_open_r1_reward():
    assert rewards.names() == [
        "accuracy", "boxed_math_answer", "choice_answer", "code", "code_format", "cosine", "digit_match", "format", "judge",
        "length", "math_answer", "reasoning_steps", "repetition_penalty", "soft_overlong_punishment", "tag_count",
    ]


def test_unknown_name_is_named_and_accepted_names_listed():
    with pytest.raises(ValueError) as e:
        rewards.get("acuracy")
    assert "'acuracy'" in str(e.value)
    assert "accuracy" in str(e.value) and "tag_count" in str(e.value)


@pytest.mark.parametrize("name, params, error, mentions", [
    ("format", {"language": "python"}, ValueError, "language"),
    ("cosine", {"max_length": 10}, ValueError, "max_length"),
    ("cosine", {"max_len": "long"}, TypeError, "max_len"),
    ("cosine", {"max_len": 0}, ValueError, "max_len"),
    ("repetition_penalty", {"max_penalty": 0.5}, ValueError, "max_penalty"),
    ("repetition_penalty", {"ngram_size": 0}, ValueError, "ngram_size"),
    ("repetition_penalty", {"language": "zh"}, ValueError, "language"),
    ("soft_overlong_punishment", {"max_completion_len": 10, "soft_punish_cache": 20}, ValueError, "soft_punish_cache"),
    ("soft_overlong_punishment", {"max_completion_len": 1.5}, TypeError, "max_completion_len"),
    ("code", {"timeout_s": -1}, ValueError, "timeout_s"),
    ("code", {"memory_mb": True}, TypeError, "memory_mb"),
    ("code_format", {"language": ""}, ValueError, "language"),
])
def test_bad_params_fail_at_get_time_naming_the_param(name, params, error, mentions):
    with pytest.raises(error, match=mentions):
        rewards.get(name, **params)


def test_bad_import_paths_are_value_errors():
    with pytest.raises(ValueError, match="no_such_module_r1ray"):
        rewards.get("no_such_module_r1ray:fn")
    with pytest.raises(ValueError, match="no_such_fn"):
        rewards.get("json:no_such_fn")
    with pytest.raises(ValueError, match="not callable"):
        rewards.get("json:__doc__")
    with pytest.raises(ValueError, match="package.module:function"):
        rewards.get(":fn")


PLUGIN = textwrap.dedent('''
    """A user's TRL-style reward module."""
    def _text(c):
        return c if isinstance(c, str) else c[-1]["content"]

    def word_count(completions, **kwargs):
        return [float(len(_text(c).split())) for c in completions]

    def scaled_length(completions, factor=1.0, **kwargs):
        return [factor * len(_text(c)) for c in completions]

    def exact(completions, solution):
        return [float(_text(c) == s) for c, s in zip(completions, solution)]
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "r1ray_plugin_inproc.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "r1ray_plugin_inproc"
    sys.modules.pop("r1ray_plugin_inproc", None)


def test_import_path_runs_the_user_function_unchanged(plugin):
    fn = rewards.get(f"{plugin}:word_count")
    assert fn(["one two", chat("a b c")], prompts=["p", "p"], solution=["x", "y"]) == [2.0, 3.0]


def test_import_path_params_are_bound_with_partial(plugin):
    fn = rewards.get(f"{plugin}:scaled_length", factor=2.0)
    assert fn(["abc"], prompts=["p"]) == [6.0]
    assert fn.__name__ == "scaled_length"  # TRL logs rewards under __name__


def test_import_path_params_are_checked_where_possible(plugin):
    with pytest.raises(ValueError, match="'factor'"):
        rewards.get(f"{plugin}:exact", factor=2.0)  # no such parameter, no **kwargs
    with pytest.raises(ValueError, match="completions"):
        rewards.get(f"{plugin}:scaled_length", completions=["x"])


# ---- calling convention ---------------------------------------------------

CALL_KWARGS = {
    "prompts": ["p"],
    "completion_ids": [[1, 2, 3]],
    "solution": ["$42$"],
    "answer": ["42"],  # the benchmark judges' gold
    "verification_info": [{"language": "python", "test_cases": [{"input": "", "output": "42", "type": "stdin_stdout"}]}],
    "some_other_column": ["ignored"],
}


@pytest.mark.parametrize("name", rewards.names())
def test_every_reward_takes_trl_kwargs_and_both_completion_shapes(name):
    # the judge needs an endpoint: the fake OpenAI server, grading whether 42 is in the answer
    server = FakeOpenAI(lambda prompt, i: "CORRECT" if "42" in prompt.split("Student's")[-1] else "INCORRECT") \
        if name == "judge" else None
    fn = rewards.get(name, **({"model": "judge", "base_url": server.url} if server else {}))
    text = THINK_ANSWER.replace("42", "\\boxed{42}\n```python\nprint(42)\n```")
    try:
        as_string = fn(completions=[text], **CALL_KWARGS)
        as_chat = fn(completions=[chat(text)], **CALL_KWARGS)
    finally:
        if server:
            fn.close()
            server.close()
    assert len(as_string) == 1 and as_string == as_chat
    score = as_string[0]
    if getattr(fn, "with_answers", False):  # the benchmark judges: (score, extracted answer)
        score, answer = score
        assert answer is None or isinstance(answer, str)
    assert score is None or isinstance(score, float)


# ---- format, tag_count, reasoning_steps, code_format --------------------------


@pytest.mark.parametrize("text, score", [
    ("<think>x</think><answer>y</answer>", 1.0),
    (THINK_ANSWER, 1.0),
    (THINK_ANSWER + "\n", 1.0),  # `$` allows one final newline
    ("<think>\nx\n</think><answer>y</answer>", 1.0),
    ("<think>x</think>\n\n<answer>y</answer>", 0.0),  # only one newline between the blocks
    ("<think>x</think><answer>y</answer> trailing", 0.0),
    (" <think>x</think><answer>y</answer>", 0.0),
    ("<think>x</think>", 0.0),
    ("<answer>y</answer>", 0.0),
    ("", 0.0),
])
def test_format(text, score):
    fn = rewards.get("format")
    assert fn([text]) == [score]
    assert fn([chat(text)]) == [score]


def test_format_scan_agrees_with_the_regex():
    # The linear scans must give what Open-R1's regexes would.
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "\n", "x", "```python", "```"]
    code_pattern = r"^<think>\n?.*?\n?</think>\n?<answer>\n?.*?```python.*?```.*?\n?</answer>$"
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        for prefix, suffix in (("", ""), ("<think>", "</answer>"), ("<think>", "</answer>\n")):
            candidate = prefix + text + suffix
            assert matches_format(candidate) == bool(re.match(FORMAT_PATTERN, candidate, re.DOTALL)), candidate
            assert matches_code_format(candidate, "python") == bool(re.match(code_pattern, candidate, re.DOTALL)), candidate


@pytest.mark.parametrize("text, score", [
    (THINK_ANSWER, 1.0),
    ("<think>x</think><answer>y</answer>", 1.0),
    ("<think>x</think>", 0.5),
    ("<think><think>x</think><answer>y</answer>", 0.75),
    ("no tags", 0.0),
])
def test_tag_count(text, score):
    assert rewards.get("tag_count")([text, chat(text)]) == [score, score]


@pytest.mark.parametrize("text, score", [
    ("Step 1: a. Step 2: b. Step 3: c.", 1.0),
    ("Step 1: a. Step 2: b.", 2 / 3),
    ("First, a. Next, b. Finally, c. Second, d.", 1.0),  # capped at 1
    ("1. a\n- b\n* c", 1.0),  # "^1." at the start, then "\n-" and "\n*"
    ("intro\n1. a\n2. b", 0.0),  # Open-R1's "^" without MULTILINE: only the very start
    ("nothing here", 0.0),
])
def test_reasoning_steps(text, score):
    assert rewards.get("reasoning_steps")([text, chat(text)]) == pytest.approx([score, score])


def test_code_format():
    good = "<think>plan</think><answer>```python\nprint(1)\n```</answer>"
    fn = rewards.get("code_format")
    assert fn([good, chat(good)]) == [1.0, 1.0]
    assert fn(["<think>plan</think><answer>print(1)</answer>"]) == [0.0]
    assert rewards.get("code_format", language="cpp")([good]) == [0.0]
    # A `language` column overrides the parameter per sample.
    assert fn([good, good], language=["python", "rust"]) == [1.0, 0.0]


# ---- repetition_penalty, soft_overlong_punishment -----------------------------


def test_repetition_penalty():
    fn = rewards.get("repetition_penalty", ngram_size=3, max_penalty=-1.0)
    # a b c a b c -> 3-grams abc, bca, cab, abc: 3 distinct of 4 -> (1 - 3/4) * -1
    assert fn(["a b c a b c", chat("A b C a B c")]) == [-0.25, -0.25]
    assert fn(["all different words here"]) == [0.0]
    assert fn(["two words", ""]) == [0.0, 0.0]  # fewer words than ngram_size
    assert rewards.get("repetition_penalty", ngram_size=1, max_penalty=-2.0)(["x x x x"]) == [-1.5]


def test_soft_overlong_punishment_uses_token_counts():
    fn = rewards.get("soft_overlong_punishment", max_completion_len=10, soft_punish_cache=4)
    ids = [[0] * n for n in (3, 6, 7, 8, 10, 11)]
    assert fn(completions=["x"] * 6, completion_ids=ids) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    no_cache = rewards.get("soft_overlong_punishment", max_completion_len=10, soft_punish_cache=0)
    assert no_cache(completions=["x", "x"], completion_ids=[[0] * 10, [0] * 11]) == [0.0, -1.0]
    with pytest.raises(ValueError, match="completion_ids"):
        fn(completions=["x"])


# ---- accuracy, cosine, length (math-verify) -----------------------------------


def test_accuracy_right_wrong_and_conversational():
    fn = rewards.get("accuracy")
    completions = ["so \\boxed{42}", "so \\boxed{41}", chat("The answer is \\boxed{\\frac{1}{2}}"),
                   "The final answer is 42", "no answer at all"]
    solutions = ["$42$", "$42$", "$\\frac{1}{2}$", "$42$", "$42$"]
    assert fn(completions, solution=solutions, prompts=["p"] * 5) == [1.0, 0.0, 1.0, 1.0, 0.0]


def test_accuracy_requires_well_formed_latex_in_the_answer():
    # malformed_operators=False: "\frac12" is not repaired into 1/2.
    assert rewards.get("accuracy")(["\\boxed{\\frac12}"], solution=["$\\frac{1}{2}$"]) == [0.0]


def test_accuracy_is_none_when_the_gold_cannot_be_parsed():
    fn = rewards.get("accuracy")
    # The gold is parsed with LatexExtractionConfig only: text without
    # LaTeX, including a bare "42", is not applicable rather than wrong.
    assert fn(["\\boxed{42}", "\\boxed{42}", "\\boxed{1}"], solution=["no math here", "42", ""]) == [None, None, None]


def test_accuracy_calls_verify_gold_first():
    # math-verify is asymmetric: a relation gold accepts an interval answer,
    # an interval gold does not accept a relation answer.
    fn = rewards.get("accuracy")
    assert fn(["\\boxed{(1,2)}"], solution=["$1 < x < 2$"]) == [1.0]
    assert fn(["\\boxed{1<x<2}"], solution=["$(1,2)$"]) == [0.0]


def test_math_rewards_work_off_the_main_thread():
    # math-verify's alarm-based timeouts need the main thread; elsewhere
    # they are switched off rather than raising.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as thread:
        scores = thread.submit(rewards.get("accuracy"), ["\\boxed{42}"], solution=["$42$"]).result()
    assert scores == [1.0]


def test_cosine_hand_computed():
    fn = rewards.get("cosine", max_len=100)
    right = "\\boxed{42}"  # 10 characters: progress 0.1
    c = math.cos(0.1 * math.pi)
    expected_right = 0.5 + 0.5 * (1.0 - 0.5) * (1 + c)
    expected_wrong = -0.5 + 0.5 * (-1.0 + 0.5) * (1 + c)
    scores = fn([right, chat("\\boxed{41}"), right], solution=["$42$", "$42$", "words"])
    assert scores[0] == pytest.approx(expected_right)
    assert scores[1] == pytest.approx(expected_wrong)
    assert scores[2] is None
    # Half-way (progress 0.5): midpoints; at and past max_len: the ends.
    half = "x" * 40 + "\\boxed{42}"
    assert fn([half], solution=["$42$"]) == [pytest.approx(0.75)]
    assert fn(["x" * 90 + "\\boxed{42}", "x" * 290 + "\\boxed{42}"], solution=["$42$"] * 2) == [
        pytest.approx(0.5), pytest.approx(0.5)]
    assert fn(["x" * 290 + "\\boxed{41}"], solution=["$42$"]) == [pytest.approx(-0.5)]


def test_cosine_calls_verify_gold_first():
    fn = rewards.get("cosine")
    assert fn(["\\boxed{(1,2)}"], solution=["$1 < x < 2$"])[0] > 0
    assert fn(["\\boxed{1<x<2}"], solution=["$(1,2)$"])[0] < 0


def test_length_kimi_hand_computed():
    fn = rewards.get("length")
    completions = ["\\boxed{42}", "abc \\boxed{42}", "abcdefgh \\boxed{41}", chat("x \\boxed{41}"), "\\boxed{7}"]
    # lengths 10, 14, 19, 12, 9 -> min 9, max 19; lambda = 0.5 - (len - 9) / 10
    scores = fn(completions, solution=["$42$"] * 4 + ["plain words"])
    assert scores == [pytest.approx(0.4), pytest.approx(0.0), pytest.approx(-0.5), 0.0, None]
    assert fn(["\\boxed{1}", "\\boxed{2}"], solution=["$1$", "$1$"]) == [0.0, 0.0]  # same length
    assert fn(["\\boxed{(1,2)}", "\\boxed{1<x<2} xx"], solution=["$1 < x < 2$", "$(1,2)$"]) == [0.5, -0.5]
    assert rewards.get("length").group_relative is True


# ---- code -------------------------------------------------------------------

ECHO_SUM = "```python\nprint(sum(map(int, input().split())))\n```"
SUM_INFO = {"language": "python", "test_cases": [
    {"input": "1 2\n", "output": "3\n", "type": "stdin_stdout"},
    {"input": "5 5\n", "output": "10", "type": "stdin_stdout"},
    {"input": "0 0\n", "output": "1", "type": "stdin_stdout"},  # a wrong expectation: fails
]}


def test_code_scores_the_fraction_of_test_cases_passed():
    fn = rewards.get("code", timeout_s=10.0)
    completions = [
        "<think>add</think><answer>" + ECHO_SUM + "</answer>",
        chat("first try\n```python\nprint(0)\n```\nbetter:\n" + ECHO_SUM),  # the last block counts
        "no code block",
        "```python\nraise SystemExit(1)\n```",
    ]
    scores = fn(completions, verification_info=[SUM_INFO, json.dumps(SUM_INFO), SUM_INFO, SUM_INFO])
    assert scores == [pytest.approx(2 / 3), pytest.approx(2 / 3), 0.0, 0.0]


def test_code_is_none_without_test_cases_and_rejects_other_languages():
    fn = rewards.get("code")
    assert fn([ECHO_SUM], verification_info=[{"language": "python", "test_cases": []}]) == [None]
    with pytest.raises(ValueError, match="cpp"):
        fn([ECHO_SUM], verification_info=[{"language": "cpp", "test_cases": SUM_INFO["test_cases"]}])


# ---- digit_match (partial credit) --------------------------------------------


@pytest.mark.parametrize("completion, solution, score", [
    ("<answer>\\boxed{975}</answer>", "\\boxed{975}", 1.0),
    ("<answer>\\boxed{965}</answer>", "\\boxed{975}", 2 / 3),
    ("<answer>\\boxed{9751}</answer>", "\\boxed{975}", 3 / 4),   # an extra digit costs one
    ("<answer>\\boxed{97}</answer>", "\\boxed{975}", 2 / 3),     # a missing one too
    ("\\boxed{1} then \\boxed{9 7 5}", "\\boxed{975}", 1.0),    # last box, spaces ignored
    ("no box 975", "\\boxed{975}", 0.0),
    ("\\boxed{975} and \\boxed{97", "\\boxed{975}", 1.0),       # unclosed last box: the earlier one
    ("\\boxed{\\frac{1}{2}}", "\\boxed{\\frac{1}{2}}", 1.0),  # nested braces
    ("\\boxed{42}", "42", 1.0),                                    # plain gold used whole
    ("\\boxed{42}", "  ", None),                                   # empty gold: not applicable
])
def test_digit_match(completion, solution, score):
    got = rewards.get("digit_match")([completion], solution=[solution])
    assert got == [pytest.approx(score)] if score is not None else got == [None]


def test_digit_match_is_linear_on_hostile_text():
    fn = rewards.get("digit_match")
    assert fn(["\\boxed{" * 100_000, "{" * 1_000_000 + "\\boxed{1}"], solution=["\\boxed{1}"] * 2) == [0.0, 1.0]
    assert fn([chat("\\boxed{12}")], solution=["\\boxed{13}"]) == [0.5]
