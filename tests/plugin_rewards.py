"""A user's TRL-style reward, referenced by import path in the end-to-end tests."""


def half_the_groups(completions, problem, **kwargs):
    """Varies within a group when the problem starts with an even digit, constant otherwise:
    dynamic sampling must drop about half the groups and keep sampling."""
    out = []
    for completion, prob in zip(completions, problem):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        out.append(float(len(text) % 2) if int(prob[0]) % 2 == 0 else 0.0)
    return out


def every_answer(completions, **kwargs):
    """1.0 for anything: as the eval reward it makes every probe pass, so the SFT early stop fires."""
    return [1.0] * len(completions)


def raises_every_time(completions, **kwargs):
    """A broken reward: raises on every call. The scorer counts errors; RewardHealth stops or drops it."""
    raise KeyError("solution")


NAMED_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "str": "0.5",
                "bool": True, "list": [1.0], "dict": {"score": 1.0}, "none": None}


def returns_named_value(completions, **kwargs):
    """The value the completion's text names in NAMED_VALUES (what careless rewards return), else 1.0."""
    out = []
    for completion in completions:
        text = completion[0]["content"] if isinstance(completion, list) else completion
        out.append(NAMED_VALUES.get(text, 1.0))
    return out


def length_parity(completions, **kwargs):
    """1.0 for a completion of odd length: varies within nearly every group, so an untrained
    policy still gets advantages (and gradients) to learn from."""
    return [float(len(c[0]["content"] if isinstance(c, list) else c) % 2) for c in completions]


def bad_answers(completions, **kwargs):
    """Claims to return (score, answer) pairs but returns plain scores: the pool reports it."""
    return [1.0] * len(completions)


bad_answers.with_answers = True


def judge_verdict(text: str):
    """A judge parser: GOOD 1.0, BAD 0.0, anything else None (no verdict)."""
    return {"GOOD": 1.0, "BAD": 0.0}.get(text.strip())


def ids_are_lists(completions, completion_ids, **kwargs):
    """1.0 where ``completion_ids`` is a list of Python ints (as TRL passes it: a function may
    concatenate or compare it), whatever the rollout carried (the generator's int32 array)."""
    return [float(type(ids) is list and all(type(t) is int for t in ids) and ids + [0] == [*ids, 0])
            for ids in completion_ids]
