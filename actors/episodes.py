"""Multi-turn episodes: the policy generates until it closes a tool call or ends, the tool's
answer is appended as a tool turn, and the policy goes on, up to ``max_turns`` model turns and
``max_total_tokens`` tokens after the prompt.

An ``Environment`` (``rollout.environment``, an import path) is for what tools cannot express:
a game, a checker that answers back. One instance per trajectory::

    class Environment:
        def reset(self, row: dict) -> list[dict]:        # the opening messages of the row
        def step(self, messages: list[dict]) -> tuple[list[dict], bool]:
            # messages: the conversation so far, ending with the model's turn; returns the
            # messages to append (usually one "user" turn) and whether the episode is over

``reset`` runs in the driver to render the prompt and again in the generator for each
trajectory, so it must give the same messages for the same row. ``step`` runs after every
model turn that ends without a tool call, in the generator's process (off its event loop): it
keeps the episode's state between steps. A step that raises ends the trajectory (finish
reason "env_error"), never the run.

Token-faithful by construction: a trajectory's ``completion_ids`` are the ids the engine
sampled, concatenated with the ids of each tool turn (the chat template's text around the
tool's answer, tokenised on its own); no model token is ever decoded and encoded again, so the
learner trains on exactly what the generator produced. Tool-turn tokens have loss mask 0,
behaviour log-prob 0.0 (a placeholder, never in the loss) and policy version -1; every model
token keeps the version that sampled it.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .tools import CALL_CLOSE, ToolCall, ToolPool, ToolResult, parse_call

logger = logging.getLogger("r1ray")


@dataclass
class RolloutConfig:
    tools: list[str] = field(default_factory=list)  # built-in names (python, calculator) or 'package.module:function'
    environment: str | None = None  # 'package.module:Class' with reset(row) and step(messages)
    max_turns: int = 1  # model turns per trajectory; more than 1 needs tools or an environment
    max_total_tokens: int | None = None  # tokens after the prompt, model and tool turns; null: sampling.max_new_tokens
    tool_timeout_s: float = 10.0  # wall clock per call; a call that overruns is an error turn
    tool_workers: int = 2  # processes per generator that run tool calls
    max_tool_output_chars: int = 1000  # a tool's answer is cut to this many characters

    def budget(self, max_new_tokens: int) -> int:
        """Tokens a sample may have after its prompt: ``max_total_tokens`` for episodes with tools."""
        return (self.max_total_tokens or max_new_tokens) if self.multi_turn else max_new_tokens

    @property
    def multi_turn(self) -> bool:
        return bool(self.tools or self.environment)


class Trajectory:
    """One sample being built: model tokens over one or more chunks and turns, and tool turns."""

    def __init__(self, prompt: list[int]):
        self.prompt, self.ids, self.lps, self.versions, self.mask = list(prompt), [], [], [], []
        self.done, self.reason = False, "length"
        self.turn_start = 0  # where the model turn being generated starts in ``ids``
        # finished turns: ("assistant", start, end, []) or ("context", start, end, the messages appended)
        self.segments: list[tuple[str, int, int, list[dict]]] = []
        self.turns, self.tool_calls, self.tool_errors, self.tool_time_s = 1, 0, 0, 0.0
        self.env = None  # the trajectory's Environment while it runs
        self.opening: list[dict] = []  # the prompt's messages (an environment's reset)

    def extend(self, ids: list[int], lps: list[float], version: int | list[int], reason: str, budget: int) -> None:
        """Model tokens, sampled by policy ``version`` (one, or one per token); ``reason`` "stop"
        (EOS), "length" or "tool" (a closed tool call)."""
        room = budget - len(self.ids)
        cut = len(ids) > room
        ids, lps = ids[:room], lps[:room]
        self.ids += ids
        self.lps += lps
        self.versions += list(version[: len(ids)]) if isinstance(version, list) else [version] * len(ids)
        self.mask += [1] * len(ids)
        self.reason = "length" if cut else reason
        self.done = self.reason == "stop" or len(self.ids) >= budget or (not ids and reason != "tool")

    def add_turn(self, ids: list[int], messages: list[dict], budget: int) -> None:
        """A tool's or an environment's turn: its ids (mask 0), cut to the budget, and the
        ``messages`` they render; the next model turn starts after it."""
        self.segments.append(("assistant", self.turn_start, len(self.ids), []))
        self.done, self.reason = False, "length"
        start = len(self.ids)
        ids = ids[: budget - len(self.ids)]
        self.ids += ids
        self.lps += [0.0] * len(ids)
        self.versions += [-1] * len(ids)
        self.mask += [0] * len(ids)
        self.segments.append(("context", start, len(self.ids), messages))
        self.turn_start = len(self.ids)
        self.turns += 1
        if len(self.ids) >= budget:
            self.done, self.reason = True, "length"

    def messages(self, decode) -> list[dict]:
        """The trajectory as conversational messages (what rewards receive): the model turns'
        text, each tool's answer as a ``tool`` message, an environment's messages as it gave them."""
        out = []
        for kind, a, b, messages in self.segments + [("assistant", self.turn_start, len(self.ids), [])]:
            out += messages if kind == "context" else [{"role": "assistant", "content": decode(self.ids[a:b])}]
        return out


class ToolTurns:
    """What a generator needs between the turns of an episode: where a tool call ends in sampled
    ids, the tokens of a tool's or an environment's turn (rendered by the model's own chat
    template), the pool that runs the calls, and the environment's steps."""

    def __init__(self, tokenizer, cfg: RolloutConfig):
        self.tok, self.cfg = tokenizer, cfg
        self.pool = ToolPool(cfg.tools, cfg.tool_workers, cfg.tool_timeout_s, cfg.max_tool_output_chars) \
            if cfg.tools else None
        self.head, self.tail = tool_turn_template(tokenizer) if cfg.tools else ("", "")
        self.env_class = load_environment(cfg.environment) if cfg.environment else None
        self._steps = ThreadPoolExecutor(4, thread_name_prefix="env-step") if self.env_class else None

    def start(self, q: Trajectory, columns: dict) -> None:
        """A new trajectory of the row ``columns``: its environment, reset on the row."""
        q.opening = list(columns.get("prompt") or [])
        if self.env_class is not None:
            q.env = self.env_class()
            q.env.reset({k: v for k, v in columns.items() if k != "prompt"})

    def cut_at_call(self, q: Trajectory, ids: list[int], lps: list[float], reason: str):
        """``(ids, lps, reason)`` cut just after the token that closes a tool call in the model
        turn being generated (reason "tool"); unchanged when there is none."""
        turn = q.ids[q.turn_start:]
        if self.pool is None or CALL_CLOSE not in self._text(turn + ids):
            return ids, lps, reason
        lo, hi = 1, len(ids)  # the fewest new tokens whose text closes the call
        while lo < hi:
            mid = (lo + hi) // 2
            if CALL_CLOSE in self._text(turn + ids[:mid]):
                hi = mid
            else:
                lo = mid + 1
        return ids[:lo], lps[:lo], "tool"

    def answer(self, trajectories: list[Trajectory], budget: int) -> None:
        """Run the calls of the trajectories that stopped on one (in parallel, in the pool) and
        append each answer as a tool turn, and step the environment of those whose model turn
        ended; a trajectory at ``max_turns`` ends there instead."""
        calling, stepping = self.due(trajectories), self.env_due(trajectories)
        if calling:
            for q, res in zip(calling, self.pool.run([self.call_of(q) for q in calling])):
                self.append(q, res, budget)
        if stepping:
            talks = [self.conversation(q) for q in stepping]
            for q, step in zip(stepping, self._steps.map(env_step, stepping, talks)):
                self.env_append(q, step, budget)

    def env_due(self, trajectories: list[Trajectory]) -> list[Trajectory]:
        """The trajectories whose model turn ended (no tool call) while their environment runs."""
        return [q for q in trajectories if q.env is not None and q.reason == "stop"]

    def conversation(self, q: Trajectory) -> list[dict]:
        """What ``Environment.step`` receives: the opening messages and the trajectory's."""
        return q.opening + q.messages(lambda ids: self.tok.decode(ids, skip_special_tokens=True))

    def env_append(self, q: Trajectory, step: tuple[list[dict], bool, str | None], budget: int) -> None:
        """The environment's answer: the trajectory ends (it said done, it raised, or
        ``max_turns``), or its messages are appended as a turn (mask 0) and the policy goes on."""
        messages, done, error = step
        if error is not None or done or q.turns >= self.cfg.max_turns:
            q.env, q.done = None, True
            q.reason = "env_error" if error is not None else "stop" if done else "max_turns"
            if error is not None:
                logger.warning("rollout.environment %s: step raised %s; the trajectory ends (finish reason "
                               "env_error)", self.cfg.environment, error)
            return
        text = self.env_turn_text(messages)
        q.add_turn(self.tok.encode(text, add_special_tokens=False), messages, budget)

    def env_turn_text(self, messages: list[dict]) -> str:
        """The template's text from the end of a model turn (its end-of-turn token already
        sampled) to the start of the next assistant turn, around ``messages``."""
        text = turn_text(self.tok, messages)
        eos = self.tok.decode([self.tok.eos_token_id]) if self.tok.eos_token_id is not None else ""
        return text[len(eos):] if eos and text.startswith(eos) else text

    def due(self, trajectories: list[Trajectory]) -> list[Trajectory]:
        """The trajectories whose model turn closed a call and that may take a tool turn; one at
        ``max_turns`` ends there instead."""
        calling = [q for q in trajectories if q.reason == "tool" and not q.done]
        for q in calling:
            if q.turns >= self.cfg.max_turns:
                q.done, q.reason = True, "max_turns"
        return [q for q in calling if not q.done]

    def call_of(self, q: Trajectory) -> ToolCall | str:
        return parse_call(self._text(q.ids[q.turn_start:]))

    def append(self, q: Trajectory, res: ToolResult, budget: int) -> None:
        """The tool's answer as a tool turn: the template's text around it, tokenised on its own."""
        q.tool_calls += 1
        q.tool_errors += int(res.error)
        q.tool_time_s += res.seconds
        ids = self.tok.encode(self.head + res.text + self.tail, add_special_tokens=False)
        q.add_turn(ids, [{"role": "tool", "content": res.text}], budget)

    def _text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self._steps is not None:
            self._steps.shutdown(wait=False, cancel_futures=True)


def env_step(q: Trajectory, messages: list[dict]) -> tuple[list[dict], bool, str | None]:
    """``q``'s environment stepped on ``messages``: (messages to append, done, error or None)."""
    try:
        out, done = q.env.step(messages)
        out = checked_messages(out, "step(messages)")
        if not out and not done:
            raise ValueError("step returned no messages and done=False: the policy would have nothing to answer")
        return out, bool(done), None
    except Exception as e:  # the user's code: the trajectory ends, the run goes on
        return [], True, f"{type(e).__name__}: {e}"


def checked_messages(messages, what: str) -> list[dict]:
    """An environment's messages, copied, or TypeError naming ``what`` returned something else."""
    out = [dict(m) for m in messages]
    if not all(isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in out):
        raise TypeError(f"{what} must return messages [{{'role': str, 'content': str}}, ...]; got {out!r:.200}")
    return out


def opening_messages(env_class: type, row: dict, system_prompt: str | None) -> list[dict]:
    """A row's prompt under an environment: its ``reset(row)``, after ``system_prompt`` unless
    the environment opens with a system turn of its own (the driver's prompts and r1ray eval's)."""
    opening = checked_messages(env_class().reset(dict(row)), "reset(row)")
    if not opening:
        raise ValueError("reset(row) returned no messages: the policy would have nothing to answer")
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return opening if opening[0]["role"] == "system" else system + opening


def load_environment(spec: str) -> type:
    """The class at ``package.module:Class``, with ``reset`` and ``step``; ValueError otherwise."""
    from ..rewards.plugins import import_callable

    cls = import_callable(spec, "environment")
    missing = [m for m in ("reset", "step") if not callable(getattr(cls, m, None))]
    if not isinstance(cls, type) or missing:
        raise ValueError(f"environment {spec!r} must be a class with reset(row) and step(messages); "
                         f"it {'is not a class' if not isinstance(cls, type) else 'has no ' + ', '.join(missing)}")
    return cls


def turn_text(tokenizer, messages: list[dict]) -> str:
    """The chat template's text after an assistant turn's content, around ``messages``, up to
    the next assistant turn's start (the generation prompt)."""
    call = "\u2063R1RAY-CALL\u2063"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": call}, *messages]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if call not in text:
        raise ValueError("the model's chat template does not render an assistant turn's content")
    return text.split(call, 1)[1]


def tool_turn_template(tokenizer) -> tuple[str, str]:
    """The chat template's text before and after a tool's answer, from the end of an assistant
    turn that made the call to the start of the next assistant turn (Qwen2.5: ``<|im_end|>\\n
    <|im_start|>user\\n<tool_response>\\n`` ... ``\\n</tool_response><|im_end|>\\n<|im_start|>
    assistant\\n``)."""
    answer = "\u2063R1RAY-ANSWER\u2063"
    text = turn_text(tokenizer, [{"role": "tool", "content": answer}])
    if answer not in text:
        raise ValueError("the model's chat template does not render a 'tool' message after an assistant one: "
                         "rollout.tools needs a template that does (Qwen2.5's, or a template of your own)")
    head, tail = text.split(answer, 1)
    return head, tail
