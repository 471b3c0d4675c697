"""Multi-turn episodes: the policy generates until it closes a tool call or ends, the tool's
answer is appended as a tool turn, and the policy goes on, up to ``max_turns`` model turns and
``max_total_tokens`` tokens after the prompt.

Token-faithful by construction: a trajectory's ``completion_ids`` are the ids the engine
sampled, concatenated with the ids of each tool turn (the chat template's text around the
tool's answer, tokenised on its own); no model token is ever decoded and encoded again, so the
learner trains on exactly what the generator produced. Tool-turn tokens have loss mask 0,
behaviour log-prob 0.0 (a placeholder, never in the loss) and policy version -1; every model
token keeps the version that sampled it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .tools import CALL_CLOSE, ToolCall, ToolPool, ToolResult, parse_call


@dataclass
class RolloutConfig:
    tools: list[str] = field(default_factory=list)  # built-in names (python, calculator) or 'package.module:function'
    max_turns: int = 1  # model turns per trajectory; more than 1 needs tools
    max_total_tokens: int | None = None  # tokens after the prompt, model and tool turns; null: sampling.max_new_tokens
    tool_timeout_s: float = 10.0  # wall clock per call; a call that overruns is an error turn
    tool_workers: int = 2  # processes per generator that run tool calls
    max_tool_output_chars: int = 1000  # a tool's answer is cut to this many characters

    def budget(self, max_new_tokens: int) -> int:
        """Tokens a sample may have after its prompt: ``max_total_tokens`` for episodes with tools."""
        return (self.max_total_tokens or max_new_tokens) if self.tools else max_new_tokens


class Trajectory:
    """One sample being built: model tokens over one or more chunks and turns, and tool turns."""

    def __init__(self, prompt: list[int]):
        self.prompt, self.ids, self.lps, self.versions, self.mask = list(prompt), [], [], [], []
        self.done, self.reason = False, "length"
        self.turn_start = 0  # where the model turn being generated starts in ``ids``
        self.segments: list[tuple[str, int, int, str]] = []  # (role, start, end, tool answer) of finished turns
        self.turns, self.tool_calls, self.tool_errors, self.tool_time_s = 1, 0, 0, 0.0

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

    def add_tool_turn(self, ids: list[int], answer: str, budget: int) -> None:
        """The tool turn's ids (mask 0), cut to the budget; the next model turn starts after it."""
        self.segments.append(("assistant", self.turn_start, len(self.ids), ""))
        start = len(self.ids)
        ids = ids[: budget - len(self.ids)]
        self.ids += ids
        self.lps += [0.0] * len(ids)
        self.versions += [-1] * len(ids)
        self.mask += [0] * len(ids)
        self.segments.append(("tool", start, len(self.ids), answer))
        self.turn_start = len(self.ids)
        self.turns += 1
        if len(self.ids) >= budget:
            self.done, self.reason = True, "length"

    def messages(self, decode) -> list[dict]:
        """The trajectory as conversational messages (what rewards receive): the model turns'
        text, and each tool's answer as a ``tool`` message."""
        out = []
        for role, a, b, answer in self.segments + [("assistant", self.turn_start, len(self.ids), "")]:
            out.append({"role": role, "content": answer if role == "tool" else decode(self.ids[a:b])})
        return out


class ToolTurns:
    """What a generator needs for tool calls: where a call ends in sampled ids, the tokens of a
    tool turn (rendered by the model's own chat template), and the pool that runs the calls."""

    def __init__(self, tokenizer, cfg: RolloutConfig):
        self.tok, self.cfg = tokenizer, cfg
        self.pool = ToolPool(cfg.tools, cfg.tool_workers, cfg.tool_timeout_s, cfg.max_tool_output_chars)
        self.head, self.tail = tool_turn_template(tokenizer)

    def cut_at_call(self, q: Trajectory, ids: list[int], lps: list[float], reason: str):
        """``(ids, lps, reason)`` cut just after the token that closes a tool call in the model
        turn being generated (reason "tool"); unchanged when there is none."""
        turn = q.ids[q.turn_start:]
        if CALL_CLOSE not in self._text(turn + ids):
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
        append each answer as a tool turn; a trajectory at ``max_turns`` ends there instead."""
        calling = self.due(trajectories)
        if calling:
            for q, res in zip(calling, self.pool.run([self.call_of(q) for q in calling])):
                self.append(q, res, budget)

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
        q.add_tool_turn(ids, res.text, budget)

    def _text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def close(self) -> None:
        self.pool.close()


def tool_turn_template(tokenizer) -> tuple[str, str]:
    """The chat template's text before and after a tool's answer, from the end of an assistant
    turn that made the call to the start of the next assistant turn (Qwen2.5: ``<|im_end|>\\n
    <|im_start|>user\\n<tool_response>\\n`` ... ``\\n</tool_response><|im_end|>\\n<|im_start|>
    assistant\\n``)."""
    call, answer = "\u2063R1RAY-CALL\u2063", "\u2063R1RAY-ANSWER\u2063"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": call}, {"role": "tool", "content": answer}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if call not in text or answer not in text:
        raise ValueError("the model's chat template does not render a 'tool' message after an assistant one: "
                         "rollout.tools needs a template that does (Qwen2.5's, or a template of your own)")
    head, tail = text.split(call, 1)[1].split(answer, 1)
    return head, tail
