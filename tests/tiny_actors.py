"""Actors on the tiny model, in-process, for the tests: a rendered prompt, a set-up learner, and
the tiny model taught to call a tool."""
from r1ray.actors.learner import LearnerConfig, LearnerRank
from r1ray.cluster.groups import free_port


def prompt(tok_path, text="321+654", pid="p0") -> dict:
    """A prompt dict as the driver makes it (chat template, generation prompt), gold 975."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_path)
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    return {"prompt_id": pid, "prompt_ids": list(ids), "columns": {"solution": "\\boxed{975}"}}


def learner(tiny_model, **kw) -> LearnerRank:
    """One DeepSpeed rank (world of 1, gloo), set up; ``kw``: LearnerConfig fields (zero_stage 2)."""
    cfg = LearnerConfig(num_ranks=1, zero_stage=kw.pop("zero_stage", 2), micro_batch_size=2, **kw)
    rank = LearnerRank(tiny_model, cfg, rank=0, world_size=1)
    rank.setup("127.0.0.1", free_port())
    return rank


CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>'
ANSWER = "<answer>\\boxed{5}</answer>"


def train_tool_caller(tiny_model, out) -> tuple[str, dict, list[int]]:
    """The tiny model trained (plain PyTorch, about 10 s) on one trace: on "2+3" it calls the
    calculator, reads the tool turn, and answers. Returns (model dir, prompt dict, tool-turn ids)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r1ray.actors.episodes import tool_turn_template

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+3"}], add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
    head, tail = tool_turn_template(tok)
    turn = tok.encode(head + "5" + tail, add_special_tokens=False)
    seq = list(prompt) + tok.encode(CALL, add_special_tokens=False) + turn + tok.encode(ANSWER, add_special_tokens=False) \
        + [tok.eos_token_id]
    _fit(model, seq, len(prompt))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out), {"prompt_id": "p0", "prompt_ids": list(prompt), "columns": {"solution": "\\boxed{5}"}}, turn


TALK = [{"role": "user", "content": "2+3"}, {"role": "assistant", "content": "<answer>\\boxed{4}</answer>"},
        {"role": "user", "content": "wrong, try again"}, {"role": "assistant", "content": "<answer>\\boxed{5}</answer>"}]


def train_env_talker(tiny_model, out) -> tuple[str, dict]:
    """The tiny model trained on one conversation with a checker that answers back (``TALK``):
    it answers 4, is told it is wrong, and answers 5. Returns (model dir, prompt dict)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r1ray.controllers.common.chat import render_conversation

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    opening = TALK[:1]
    prompt = tok.apply_chat_template(opening, add_generation_prompt=True, tokenize=True, return_dict=False)
    e = render_conversation(tok, TALK)
    _fit(model, e.ids, len(prompt), e.trained)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out), {"prompt_id": "p0", "prompt_ids": list(prompt),
                      "columns": {"problem": "2+3", "solution": "\\boxed{5}", "prompt": opening}}


def _fit(model, seq: list[int], prompt_len: int, trained: list[int] | None = None) -> None:
    """Adam on one sequence until it is memorised: the loss on the tokens after the prompt (or
    on the ``trained`` ones)."""
    import torch

    ids = torch.tensor([seq])
    labels = ids.clone()
    labels[0, :prompt_len] = -100
    if trained is not None:
        labels[0, torch.tensor(trained) == 0] = -100
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 1e-3:
            break


def slow_tool_files(tmp_path, monkeypatch):
    """(started, go) for ``plugin_tools:slow_calculator``, which touches ``started`` and waits
    for ``go``; set before the tool workers are spawned (they take the environment then)."""
    started, go = tmp_path / "started", tmp_path / "go"
    monkeypatch.setenv("R1RAY_TEST_TOOL_STARTED", str(started))
    monkeypatch.setenv("R1RAY_TEST_TOOL_GO", str(go))
    return started, go


def wait_until_started(started, seconds: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert started.exists(), "the tool never ran"


def assert_learners_policy(learner: LearnerRank, outs: list, version: int, abs_tol: float) -> list[list[float]]:
    """Greedy rollouts ``outs`` (12 new tokens at most) are the learner's policy at ``version``:
    every token labelled ``version``, the tokens the learner's own greedy decoding picks, and
    log-probs within ``abs_tol`` of the learner's. Returns the learner's log-probs."""
    import pytest
    import torch

    from r1ray.actors.batching import pad_batch, token_logprobs

    module = learner.engine.module
    module.eval()
    for out in outs:
        assert out.versions == [version] * len(out.completion_ids)
        with torch.no_grad():
            ids = module.generate(input_ids=torch.tensor([out.prompt_ids]), max_new_tokens=12, do_sample=False,
                                  pad_token_id=learner.pad_id)[0, len(out.prompt_ids):].tolist()
        assert out.completion_ids.tolist() == ids[: len(out.completion_ids)]
    packed = pad_batch([o.prompt_ids for o in outs], [o.completion_ids for o in outs], learner.pad_id)
    with torch.no_grad():
        mine = packed.gather(token_logprobs(learner.engine, packed, learner.cfg.loss.temperature).cpu())
    for o, lp in zip(outs, mine):
        assert lp == pytest.approx(o.logprobs, abs=abs_tol)
    return mine
