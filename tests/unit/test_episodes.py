"""Tools and multi-turn episodes (actors/tools.py, actors/episodes.py) on the real engines: a
tiny model taught one tool-calling trace, so that greedy decoding calls the calculator."""
import io
import threading
import time

import pytest
import torch
from tiny_actors import ANSWER, CALL, TALK, slow_tool_files, train_env_talker, train_tool_caller, wait_until_started
from tiny_actors import learner as _learner

from r1ray.actors.episodes import RolloutConfig
from r1ray.actors.generator import Generator, GeneratorConfig, SamplingConfig
from r1ray.actors.rollout import TrainSample
from r1ray.actors.tools import ToolCall, ToolPool, calculator, parse_call, schemas
from r1ray.controllers.common.data import PromptRenderer
from r1ray.controllers.config import DataConfig, load_recipe
from r1ray.controllers.config.schema import ConfigError


# -- tools -----------------------------------------------------------------------------------
def test_calculator_is_exact_and_refuses_what_is_not_arithmetic():
    assert calculator("123 * 456 + 7") == "56095"
    assert calculator("(1 + 2) ** 3 // 4 % 5") == "1"
    assert calculator("7 / 2") == "7/2 (= 3.5)"
    assert calculator("-0.1 + 0.2") == "1/10 (= 0.1)"
    for bad in ["__import__('os')", "9 ** 9 ** 9", "2 ** 0.5", "x + 1", "1; 2"]:
        with pytest.raises((ValueError, SyntaxError)):
            calculator(bad)


def test_a_tool_call_is_parsed_from_qwen_s_format_or_refused_with_a_reason():
    assert parse_call(f"think {CALL}") == ToolCall("calculator", {"expression": "2+3"})
    assert parse_call('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>') == ToolCall("f", {"a": 1})
    assert "not JSON" in parse_call("<tool_call>{oops</tool_call>")
    assert "must be" in parse_call('<tool_call>["calculator"]</tool_call>')
    assert "arguments" in parse_call('<tool_call>{"name": "f", "arguments": [1]}</tool_call>')
    assert "no <tool_call>" in parse_call("</tool_call>")


def test_tools_are_described_from_type_hints_and_docstrings():
    [calc, boom] = schemas(["calculator", "plugin_tools:boom"])
    assert calc["function"]["name"] == "calculator"
    assert calc["function"]["parameters"]["properties"]["expression"]["type"] == "string"
    assert boom["function"]["parameters"]["properties"]["x"]["type"] == "integer"
    with pytest.raises(ValueError, match="plugin_tools:no_docstring.*docstring"):
        schemas(["plugin_tools:no_docstring"])
    with pytest.raises(ValueError, match="cannot load tool 'plugin_tools:missing'"):
        schemas(["plugin_tools:missing"])
    with pytest.raises(ValueError, match="accepted: python, calculator"):
        schemas(["abacus"])


def test_a_tool_that_raises_hangs_floods_or_is_unknown_gives_an_error_turn_and_the_pool_lives_on():
    pool = ToolPool(["calculator", "plugin_tools:boom", "plugin_tools:sleepy", "plugin_tools:chatty"],
                    num_workers=2, timeout_s=2.0, max_output_chars=100)
    try:
        t0 = time.monotonic()
        res = pool.run([ToolCall("boom", {"x": 1}), ToolCall("sleepy", {"seconds": 60}), ToolCall("chatty", {"megabytes": 10}),
                        ToolCall("abacus", {}), "the tool call is not JSON", ToolCall("calculator", {"expression": "6*7"}),
                        ToolCall("calculator", {"wrong": 1})])
        assert time.monotonic() - t0 < 30  # the hung call cost its timeout, not 60 s
        assert [r.error for r in res] == [True, True, False, True, True, False, True]
        assert res[0].text == "error: ZeroDivisionError: 1 / 0"
        assert "did not answer within 2 s" in res[1].text and res[1].seconds >= 2
        assert res[2].text.startswith("x" * 100) and "more characters cut" in res[2].text and len(res[2].text) < 200
        assert "unknown tool 'abacus'" in res[3].text and "calculator" in res[3].text
        assert res[4].text == "error: the tool call is not JSON"
        assert res[5].text == "42"
        assert "TypeError" in res[6].text
        # the worker killed for the hung call was replaced
        assert [r.text for r in pool.run([ToolCall("calculator", {"expression": "1+1"})] * 3)] == ["2"] * 3
    finally:
        pool.close()


def test_the_python_tool_runs_in_the_sandbox_without_network():
    pool = ToolPool(["python"], num_workers=1, timeout_s=30.0)
    try:
        ok, net, crash = pool.run([
            ToolCall("python", {"code": "print(sum(range(101)))"}),
            ToolCall("python", {"code": "import socket; socket.create_connection(('1.1.1.1', 53), timeout=3); print('online')"}),
            ToolCall("python", {"code": "raise SystemExit(3)"})])
        assert (ok.text, ok.error) == ("5050\n", False)
        assert net.error and "OSError" in net.text  # the connection failed: the program never printed
        assert crash.error and "exit status 3" in crash.text
    finally:
        pool.close()


# -- episodes on the hf engine -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tool_caller(tiny_model, tmp_path_factory):
    return train_tool_caller(tiny_model, tmp_path_factory.mktemp("tool-caller"))


def _generator(path, **rollout):
    cfg = RolloutConfig(**{"tools": ["calculator"], "max_turns": 4, "max_total_tokens": 160, **rollout})
    return Generator(path, GeneratorConfig(backend="hf"), seed=1, rollout=cfg)


def test_an_episode_calls_the_tool_and_trains_on_exactly_the_generated_tokens(tool_caller):
    path, prompt, turn = tool_caller
    gen = _generator(path)
    try:
        [r] = gen.generate([prompt], 1, SamplingConfig(max_new_tokens=40), greedy=True)
    finally:
        gen.close()
    assert (r.turns, r.tool_calls, r.tool_errors, r.finish_reason) == (2, 1, 0, "stop"), r.text
    assert r.messages == [{"role": "assistant", "content": CALL}, {"role": "tool", "content": "5"},
                          {"role": "assistant", "content": ANSWER}]
    n_call = next(i for i, m in enumerate(r.loss_mask) if m == 0)
    tool = [t for t, m in zip(r.completion_ids, r.loss_mask) if m == 0]
    assert tool == turn  # the tool turn: the template's tokens around the tool's answer, out of the loss
    assert r.loss_mask == [1] * n_call + [0] * len(turn) + [1] * (len(r.completion_ids) - n_call - len(turn))
    assert [v for v, m in zip(r.versions, r.loss_mask) if m == 0] == [-1] * len(turn)
    assert set(r.model_versions) == {0} and r.version == 0
    assert all(lp == 0.0 for lp, m in zip(r.logprobs, r.loss_mask) if m == 0)
    # token faithfulness: the learner's log-probs of the sampled ids, tool turn in the context,
    # equal the generator's behaviour log-probs on every model token
    from transformers import AutoModelForCausalLM

    from r1ray.actors.batching import pad_batch, token_logprobs

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    batch = pad_batch([r.prompt_ids], [r.completion_ids], 0)
    with torch.no_grad():
        [learner_lps] = batch.gather(token_logprobs(model, batch))
    model_lps = [(a, b) for a, b, m in zip(learner_lps, r.logprobs, r.loss_mask) if m]
    assert max(abs(a - b) for a, b in model_lps) < 1e-4


def test_max_turns_and_max_total_tokens_end_an_episode(tool_caller):
    path, prompt, turn = tool_caller
    one_turn = _generator(path, max_turns=1)  # (a recipe needs >= 2; the cut itself is tested here)
    short = _generator(path, max_total_tokens=len(CALL) + 3)
    try:
        [r] = one_turn.generate([prompt], 1, SamplingConfig(max_new_tokens=40), greedy=True)
        assert (r.finish_reason, r.turns, r.tool_calls, r.loss_mask) == ("max_turns", 1, 0, [1] * len(CALL))
        [r] = short.generate([prompt], 1, SamplingConfig(max_new_tokens=40), greedy=True)
        assert r.finish_reason == "length" and len(r.completion_ids) == len(CALL) + 3
        assert r.loss_mask == [1] * len(CALL) + [0] * 3 and r.tool_calls == 1
    finally:
        one_turn.close()
        short.close()


def test_weights_that_arrive_while_a_tool_runs_are_adopted_for_the_next_turn(tool_caller, tmp_path, monkeypatch):
    """A weight update in the middle of a trajectory: the first turn keeps version 0, the turn
    after the tool answers is sampled by version 1 (hf adopts staged weights between turns)."""
    path, prompt, turn = tool_caller
    started, go = slow_tool_files(tmp_path, monkeypatch)
    gen = _generator(path, tools=["plugin_tools:slow_calculator"])
    try:
        from transformers import AutoModelForCausalLM

        # the tool-caller's weights again, as version 1: the same tokens, labelled by version
        state = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
        blob = io.BytesIO()
        torch.save(state, blob)
        out = {}
        thread = threading.Thread(target=lambda: out.update(r=gen.generate([prompt], 1, SamplingConfig(max_new_tokens=40),
                                                                            greedy=True)))
        # the model calls "calculator"; the pool knows only slow_calculator, so rename it there
        gen.tools.pool.paths["calculator"] = gen.tools.pool.paths.pop("slow_calculator")
        thread.start()
        wait_until_started(started)
        gen.load_weights(blob.getvalue(), 1)  # staged: generate holds the engine
        go.touch()
        thread.join(60)
    finally:
        gen.close()
    [r] = out["r"]
    assert r.turns == 2 and r.tool_errors == 0 and r.messages[1]["content"] == "5", r.text
    first = r.loss_mask.index(0)
    assert r.versions[:first] == [0] * first
    assert r.versions[first + len(turn):] == [1] * (len(r.versions) - first - len(turn))
    assert r.version == 0 and gen.version == 1  # staleness counts the oldest model token


def test_another_request_generates_while_one_waits_for_its_tool(tool_caller, tmp_path, monkeypatch):
    """hf: the engine is released while a request's calls run, so a second request (the
    generator takes two at once with tools) is not held behind a slow tool."""
    path, prompt, turn = tool_caller
    started, go = slow_tool_files(tmp_path, monkeypatch)
    gen = _generator(path, tools=["plugin_tools:slow_calculator"], max_total_tokens=None)
    gen.tools.pool.paths["calculator"] = gen.tools.pool.paths.pop("slow_calculator")
    try:
        out = {}
        slow = threading.Thread(target=lambda: out.update(a=gen.generate([prompt], 1, SamplingConfig(max_new_tokens=160),
                                                                          greedy=True)))
        slow.start()
        wait_until_started(started)
        # three tokens: this one ends before it closes a call
        quick = threading.Thread(target=lambda: out.update(b=gen.generate([prompt], 1, SamplingConfig(max_new_tokens=3),
                                                                           greedy=True)))
        quick.start()
        quick.join(60)
        assert "b" in out and slow.is_alive(), "the second request waited for the first one's tool"
        go.touch()
        slow.join(60)
    finally:
        gen.close()
    [a], [b] = out["a"], out["b"]
    assert (a.turns, a.tool_calls, a.finish_reason) == (2, 1, "stop") and a.messages[1]["content"] == "5"
    assert (b.turns, b.finish_reason, len(b.completion_ids)) == (1, "length", 3)


def test_tool_turn_tokens_get_exactly_zero_gradient(tool_caller):
    """A learner step on an episode does not depend on anything at its tool-turn positions: the
    weights after it are equal whatever behaviour and reference log-probs sit there; without the
    loss mask they differ (so the test can fail)."""
    path, prompt, turn = tool_caller
    gen = _generator(path)
    try:
        rollouts = gen.generate([prompt], 2, SamplingConfig(max_new_tokens=40, temperature=1.0))
    finally:
        gen.close()
    assert all(0 in r.loss_mask for r in rollouts)  # both called the tool

    def step(garbage: float, masked: bool):
        samples = [TrainSample(r.prompt_ids, r.completion_ids,
                               [lp if m else garbage for lp, m in zip(r.logprobs, r.loss_mask)], a,
                               loss_mask=r.loss_mask if masked else None)
                   for r, a in zip(rollouts, [1.0, -1.0])]
        learner = _learner(path)
        learner.start_phase(lr=1e-2)
        learner.grpo_step(samples, global_denom=float(sum(s.loss_tokens for s in samples)),
                          global_tokens=float(sum(s.loss_tokens for s in samples)))
        return {k: v.clone() for k, v in learner.engine.module.state_dict().items()}

    a, b = step(0.0, True), step(-7.0, True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c, d = step(0.0, False), step(-7.0, False)
    assert not all(torch.equal(c[k], d[k]) for k in c)


# -- the recipe ------------------------------------------------------------------------------
@pytest.mark.parametrize("sets, match", [
    (["rollout.max_turns=3"], "'rollout.max_turns': got 3 with no rollout.tools"),
    (["rollout.tools=[calculator]"], "'rollout.max_turns': got 1 with rollout.tools; accepted: >= 2"),
    (["rollout.tools=[abacus]", "rollout.max_turns=2"], "'rollout.tools': tool 'abacus': accepted: python, calculator"),
    (["rollout.tools=[plugin_tools:no_docstring]", "rollout.max_turns=2"], "'rollout.tools': .*docstring"),
    (["rollout.tools=[calculator]", "rollout.max_turns=2", "rollout.max_total_tokens=4096"],
     "'rollout.max_total_tokens': got 4096; accepted: fewer than generator.max_model_len"),
    (["rollout.tools=[calculator]", "rollout.max_turns=2", "rollout.tool_timeout_s=0"], "'rollout.tool_timeout_s': got 0"),
    (["rollout.environment=plugin_tools:NoStep", "rollout.max_turns=2"],
     "'rollout.environment': environment 'plugin_tools:NoStep' must be a class with reset.row. and step.messages.; "
     "it has no step"),
    (["rollout.environment=plugin_tools:Nowhere", "rollout.max_turns=2"], "'rollout.environment': cannot load"),
    (["rollout.environment=plugin_tools:Checker"], "'rollout.max_turns': got 1 with rollout.environment; accepted: >= 2"),
])
def test_bad_rollout_settings_are_refused_naming_the_key(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe("configs/tiny-cpu.yaml", sets)


def test_tools_are_rendered_into_prompts_sft_traces_and_eval_tasks(tool_caller, tiny_world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tool_caller[0])
    # the tiny template ignores tools=; a template that renders them shows them in the prompt
    tok.chat_template = ("{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}"
                         "{% for m in messages %}{{ m.content }}{% endfor %}")
    r = load_recipe("configs/tiny-cpu.yaml", ["rollout.tools=[calculator, python]", "rollout.max_turns=2"])
    renderer = PromptRenderer(tok, DataConfig(), r.rollout.tools)
    ids = renderer.prompt({"problem": "2+3"}, "p0")["prompt_ids"]
    assert tok.decode(ids) == "[tool calculator][tool python]2+3"
    # an SFT warm-up's traces see the same tools; the assistant's tokens alone are trained
    conversation = [{"role": "user", "content": "2+3"}, {"role": "assistant", "content": "5"}]
    e = renderer.sft_example({"messages": conversation})
    assert tok.decode(e.ids) == "[tool calculator][tool python]2+35"
    assert tok.decode([t for t, m in zip(e.ids, e.trained) if m]) == "5"
    # and so do the prompts of r1ray eval's tasks (the held-out split here)
    from r1ray.controllers.evaluation.tasks import load_task

    r = load_recipe("configs/tiny-cpu.yaml", ["rollout.tools=[calculator, python]", "rollout.max_turns=2",
                                               f"model.tiny_dir={tiny_world}"])
    task = load_task(r.eval.tasks[0], 0, r, tok, 256, tiny_world)
    assert tok.decode(task.prompts[0]["prompt_ids"]).startswith("[tool calculator][tool python]")


# -- environments -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env_talker(tiny_model, tmp_path_factory):
    return train_env_talker(tiny_model, tmp_path_factory.mktemp("env-talker"))


def _env_episode(path, prompt, environment, max_turns=4):
    gen = Generator(path, GeneratorConfig(backend="hf"), seed=1,
                    rollout=RolloutConfig(environment=environment, max_turns=max_turns, max_total_tokens=120))
    try:
        [r] = gen.generate([prompt], 1, SamplingConfig(max_new_tokens=40), greedy=True)
    finally:
        gen.close()
    return r


def test_an_environment_answers_back_and_the_episode_is_the_templates_rendering(env_talker):
    """The checker says the first answer is wrong; the policy answers again; the checker ends it.
    Token-faithful: prompt + episode ids are exactly the chat template's rendering of the whole
    conversation, and the loss mask is exactly its assistant-token mask."""
    from transformers import AutoTokenizer

    from r1ray.controllers.common.chat import render_conversation

    path, prompt = env_talker
    r = _env_episode(path, prompt, "plugin_tools:Checker")
    assert (r.turns, r.tool_calls, r.finish_reason) == (2, 0, "stop"), r.text
    assert r.messages == TALK[1:]
    e = render_conversation(AutoTokenizer.from_pretrained(path), TALK)
    assert r.prompt_ids + r.completion_ids.tolist() == e.ids  # (an int32 array from the generator)
    assert r.loss_mask == e.trained[len(r.prompt_ids):]
    assert [v for v, m in zip(r.versions, r.loss_mask) if not m] == [-1] * r.loss_mask.count(0)
    # max_turns ends it after the wrong answer; a step that raises ends it, not the run
    r = _env_episode(path, prompt, "plugin_tools:Checker", max_turns=1)
    assert (r.turns, r.finish_reason, r.loss_mask.count(0)) == (1, "max_turns", 0)
    r = _env_episode(path, prompt, "plugin_tools:Broken")
    assert (r.turns, r.finish_reason, r.messages) == (1, "env_error", TALK[1:2])


def test_an_environment_gives_the_prompt_through_reset(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    row = {"problem": "2+3", "solution": "\\boxed{5}"}
    p = PromptRenderer(tok, DataConfig(system_prompt="Be brief."), environment="plugin_tools:Checker").prompt(row, "p0")
    assert p["columns"]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3"}]
    assert p["prompt_ids"] == tok.apply_chat_template(p["columns"]["prompt"], add_generation_prompt=True, tokenize=True,
                                                      return_dict=False)


def test_r1ray_eval_opens_each_task_row_through_the_environment(tiny_world):
    from transformers import AutoTokenizer

    from r1ray.controllers.evaluation.tasks import load_task

    tok = AutoTokenizer.from_pretrained(tiny_world / "model")

    def task(environment):
        r = load_recipe("configs/tiny-cpu.yaml", [f"rollout.environment={environment}", "rollout.max_turns=3",
                                                   f"model.tiny_dir={tiny_world}"])
        return load_task(r.eval.tasks[0], 0, r, tok, 256, tiny_world)

    p = task("plugin_tools:Checker").prompts[0]
    assert p["columns"]["prompt"] == [{"role": "user", "content": p["columns"]["problem"]}]
    assert p["columns"]["solution"] == p["columns"]["answer"] and "messages" in p["columns"]  # the row's own columns
    with pytest.raises(ConfigError, match=r"eval.tasks\[0\]' \(heldout\): rollout.environment's reset\(row\) failed "
                                          r"on row 0: KeyError: 'level'"):
        task("plugin_tools:NeedsLevel")


def test_a_turn_resumed_on_the_kv_cache_equals_one_generated_afresh(tiny_model):
    """hf episodes reuse the last turn's KV cache: rows taken in another order, each cut where
    its turn ended (the rest of its row masked out), new tokens of different lengths after
    them. Greedy tokens and log-probs equal a fresh batch of the whole sequences."""
    from r1ray.actors.generator import _HfEngine

    eng = _HfEngine(tiny_model, GeneratorConfig(backend="hf"), "cpu")
    prompts = [eng.tokenizer.encode(t) for t in ("1+2", "345+678=", "9")]  # left padding of different widths
    sp = SamplingConfig(max_new_tokens=12)
    first, layout = eng.generate(prompts, 1, sp, True, 0, keep=True)
    made = [len(ids) for ids, _, _ in first]
    assert min(made) >= 3
    rows, kept = [2, 0], [made[2], 3]  # the whole turn (its last token is not in the cache), and a cut
    new = [[5, 6, 7, 8, 9], [10]]
    resumed, _ = eng.resume(layout, rows, kept, new, sp, True, 1)
    fresh, _ = eng.generate([prompts[r] + first[r][0][:k] + t for r, k, t in zip(rows, kept, new)], 1, sp, True, 1)
    for (a, lps_a, why_a), (b, lps_b, why_b) in zip(resumed, fresh):
        assert a == b and why_a == why_b
        assert max(abs(x - y) for x, y in zip(lps_a, lps_b)) < 1e-4
