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
